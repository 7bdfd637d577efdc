//! Client identity: `[agents]` proxy authentication (407), per-agent credentials and
//! domains, the agent in the audit log, `env/exec --agent`.

mod common;
use common::raw::tunnel;
use common::*;

const CFG: &str = r#"
[agents.coder]
token = "${CODER_TOKEN}"

[agents.reader]
token = "${READER_TOKEN}"
credentials = ["example"]
allowed_domains = ["api.example.com"]

[credentials.anthropic]
header = "x-api-key"
value = "${ANTHROPIC_API_KEY}"
domains = ["api.anthropic.com"]

[credentials.example]
auth_type = "bearer"
value = "example-REAL"
domains = ["api.example.com"]
"#;

const ENV: &[(&str, &str)] = &[
    ("ANTHROPIC_API_KEY", "sk-ant-REAL"),
    ("CODER_TOKEN", "coder-token-123"),
    ("READER_TOKEN", "reader-tok"),
];

fn start() -> (Upstream, Latchkey, std::path::PathBuf) {
    let up = upstream(true, None);
    let log = tempfile::tempdir().unwrap().keep().join("requests.log");
    let cfg =
        format!("[proxy.logging]\nlog_requests = true\nlog_file = \"{}\"\n#END-PROXY\n{CFG}", log.display());
    let lk = Latchkey::start(Some(&up), &cfg, ENV);
    (up, lk, log)
}

fn status(resp: &str) -> u16 {
    resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn curl_as(lk: &Latchkey, user: &str, url: &str) -> (u16, String) {
    let proxy = format!("http://{user}@127.0.0.1:{}", lk.port);
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-x", &proxy, "--cacert"])
        .arg(lk.bundle())
        .arg(url)
        .output()
        .unwrap();
    parse_curl(out)
}

#[test]
fn clients_must_authenticate() {
    let (up, lk, _) = start();
    let (_, head) = tunnel(lk.port, "api.anthropic.com:443");
    assert_eq!(status(&head), 407, "{head}");
    assert!(head.to_ascii_lowercase().contains("proxy-authenticate: basic realm=\"latchkey\""), "{head}");
    let (code, _) = lk.curl(&["http://api.example.com/"]);
    assert_eq!(code, 407);
    let (code, _) = curl_as(&lk, "coder:wrong-token", "https://api.anthropic.com/");
    assert_ne!(code, 200);
    let (code, _) = curl_as(&lk, "reader:coder-token-123", "https://api.example.com/");
    assert_ne!(code, 200, "another agent's token does not authenticate this name");
    assert_eq!(up.count(), 0, "nothing was contacted");
}

#[test]
fn authenticated_agents_get_their_credentials_and_are_logged() {
    let (up, lk, log) = start();
    let (code, body) = curl_as(&lk, "coder:coder-token-123", "https://api.anthropic.com/v1/messages");
    assert_eq!(code, 200, "{body}");
    assert_eq!(echoed(&body, "x-api-key"), ["sk-ant-REAL"]);
    assert!(echoed(&body, "proxy-authorization").is_empty(), "the proxy credential never goes upstream");
    // Bearer works too (raw CONNECT).
    let mut s = common::raw::connect(lk.port);
    use std::io::{Read, Write};
    write!(s, "CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\nProxy-Authorization: Bearer reader-tok\r\n\r\n").unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let audit = std::fs::read_to_string(&log).unwrap();
    let first: serde_json::Value = serde_json::from_str(audit.lines().next().unwrap()).unwrap();
    assert_eq!(first["agent"], "coder");
    assert!(!audit.contains("coder-token-123"));
    assert_eq!(up.count(), 1);
}

#[test]
fn agents_are_limited_to_their_credentials_and_domains() {
    let (up, lk, _) = start();
    let (code, body) = curl_as(&lk, "reader:reader-tok", "https://api.example.com/");
    assert_eq!(code, 200, "{body}");
    assert_eq!(echoed(&body, "authorization"), ["Bearer example-REAL"]);
    let (code, body) = curl_as(&lk, "reader:reader-tok", "https://api.anthropic.com/");
    assert_ne!(code, 200, "outside its allowed_domains: {body}");
    assert_eq!(up.count(), 1);

    // A credential the agent may not use: 403 even on an allowed host.
    let cfg = CFG.replace("credentials = [\"example\"]", "credentials = [\"anthropic\"]");
    let lk = Latchkey::start(Some(&up), &cfg, ENV);
    let (code, body) = curl_as(&lk, "reader:reader-tok", "https://api.example.com/");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("may not use credential example"), "{body}");
    assert_eq!(up.count(), 1);
}

#[test]
fn env_and_exec_take_an_agent() {
    let (_up, lk, _) = start();
    let o = lk.cli(&["env", "--agent", "coder", "--format", "json"], ENV);
    let v = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(v["HTTPS_PROXY"], format!("http://coder:coder-token-123@127.0.0.1:{}", lk.port));
    let script = "curl -sS -H \"x-api-key: $ANTHROPIC_API_KEY\" https://api.anthropic.com/v1/messages";
    let o = latchkey_cmd(lk.dir.path(), ENV)
        .args(["exec", "--agent", "coder", "--config"])
        .arg(&lk.config_path)
        .args(["--", "sh", "-c", script])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(echoed(&String::from_utf8_lossy(&o.stdout), "x-api-key"), ["sk-ant-REAL"]);
    let o = lk.cli(&["env", "--agent", "nobody"], ENV);
    assert_eq!(o.status.code(), Some(2));
}

/// `exec --agent reader` in a shell that also holds coder's token (its variable, and a
/// proxy URL carrying it under a name latchkey does not set): the child gets reader's
/// token only, inside the proxy URL, and cannot act as coder.
#[test]
fn exec_as_one_agent_never_hands_over_another_agents_token() {
    let (up, lk, _) = start();
    let mut env = ENV.to_vec();
    let coder_url = format!("http://coder:coder-token-123@127.0.0.1:{}", lk.port);
    env.push(("ALL_PROXY", &coder_url));
    env.push(("MY_COPY", "coder-token-123"));
    let o = latchkey_cmd(lk.dir.path(), &env)
        .args(["exec", "--agent", "reader", "--config"])
        .arg(&lk.config_path)
        .args(["--", "env"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let child = String::from_utf8_lossy(&o.stdout);
    assert!(!child.contains("coder-token-123"), "coder's token reached reader's child: {child}");
    for line in child.lines().filter(|l| l.contains("reader-tok")) {
        let name = line.split('=').next().unwrap();
        assert!(
            name.to_ascii_uppercase().ends_with("_PROXY"),
            "reader's token outside the proxy URL: {line}"
        );
    }
    assert!(
        child.contains(&format!("HTTPS_PROXY=http://reader:reader-tok@127.0.0.1:{}", lk.port)),
        "{child}"
    );
    // Through the child's own environment, only reader's credentials are reachable.
    let script = "curl -sS -o /dev/null -w '%{http_code}' https://api.anthropic.com/v1/messages";
    let o = latchkey_cmd(lk.dir.path(), &env)
        .args(["exec", "--agent", "reader", "--config"])
        .arg(&lk.config_path)
        .args(["--", "sh", "-c", script])
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&o.stdout), "200", "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(up.count(), 0);
}
