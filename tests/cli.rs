//! The command line through the real binary: exit codes, output, and no secrets.

mod common;
use std::os::unix::fs::MetadataExt;
use std::process::Output;

use common::*;

const SECRET: &str = "sk-ant-REAL-cli";

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn cfg_dir(body: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), free_port(), None, body);
    (dir, path)
}

fn run(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    latchkey_cmd(dir, env).args(args).output().unwrap()
}

#[test]
fn config_errors_exit_2_with_file_line_and_key() {
    let (dir, path) = cfg_dir("[proxy.filters]\nalowlist_only = true\n");
    let o = run(dir.path(), &["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains(&format!("{}:", path.display())), "{t}");
    assert!(
        t.contains(": proxy.filters.alowlist_only: unknown key")
            && t.contains("did you mean `allowlist_only`"),
        "{t}"
    );
    // run refuses before listening.
    let o = run(dir.path(), &["run", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
    // A config another user can write is refused.
    let (dir, path) = cfg_dir("");
    set_mode(&path, 0o666);
    let o = run(dir.path(), &["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("writable by other users"), "{}", text(&o));
    // Missing explicit config.
    let o = run(dir.path(), &["check", "--config", "/nonexistent/latchkey.toml"], &[]);
    assert_eq!(o.status.code(), Some(2));
}

/// A TOML syntax error names the key it is in: file:line:column: table.key: message.
#[test]
fn syntax_errors_name_file_line_column_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let src = "[proxy]\nport = 3128\n\n# Claude\n\n[credentials.anthropic]\nheader = \"x-api-key\"\nvalue = \"${ANTHROPIC_API_KEY\ndomains = [\"api.anthropic.com\"]\n";
    std::fs::write(&path, src).unwrap();
    set_mode(&path, 0o600);
    for cmd in ["check", "run"] {
        let o = run(dir.path(), &[cmd, "--config", path.to_str().unwrap()], &[]);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        let want = format!("latchkey: config error: {}:8:29: credentials.anthropic.value: ", path.display());
        assert!(String::from_utf8_lossy(&o.stderr).starts_with(&want), "{}", text(&o));
    }
}

/// `run` on a fresh machine: the active credentials, then one line for the built-in
/// providers whose variables are unset, not one line each.
#[test]
fn run_summarises_inactive_builtin_providers_in_one_line() {
    let summary = |lk: &Latchkey| -> (usize, String) {
        // The port answers as soon as it is bound, a moment before the credentials are
        // reported: wait for the line rather than race it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !lk.stderr().contains("latchkey listening on") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let log = lk.stderr();
        let line = log.lines().find(|l| l.contains("built-in providers inactive")).unwrap_or_default();
        let n =
            line.split(" built-in").next().and_then(|h| h.rsplit(' ').next()).and_then(|n| n.parse().ok());
        (n.unwrap_or(0), log)
    };
    let lk = Latchkey::start(None, "", &[]);
    let (none_set, log) = summary(&lk);
    assert!(log.contains(&format!(
        "{none_set} built-in providers inactive (set their variables to enable them; latchkey providers)"
    )));
    assert!(none_set >= 15, "{log}");
    assert!(!log.contains("inactive:"), "no line per provider: {log}");
    let lk = Latchkey::start(None, "", &[("ANTHROPIC_API_KEY", SECRET)]);
    let (one_set, log) = summary(&lk);
    assert_eq!(one_set, none_set - 1, "{log}");
    assert!(log.contains("credential anthropic active (env ANTHROPIC_API_KEY)"), "{log}");
    assert!(!log.contains(SECRET));
}

#[test]
fn check_reports_credentials_and_exit_codes() {
    let body = "[credentials.anthropic]\nheader = \"x-api-key\"\nvalue = \"${ANTHROPIC_API_KEY}\"\ndomains = [\"api.anthropic.com\"]\n";
    let (dir, path) = cfg_dir(body);
    let p = path.to_str().unwrap();
    let o = run(dir.path(), &["check", "--config", p], &[("ANTHROPIC_API_KEY", SECRET)]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("anthropic") && text(&o).contains("active"));
    let o = run(dir.path(), &["check", "--config", p], &[]);
    assert_eq!(o.status.code(), Some(1), "inactive credential is a warning: {}", text(&o));
    assert!(text(&o).contains("inactive"), "{}", text(&o));
    // The seed config: github and github_basic tie on github.com.
    // (loaded unchanged apart from the port and paths)
    let dir = tempfile::tempdir().unwrap();
    let seed = include_str!("data/seed-config.toml")
        .replace("port = 8080", &format!("port = {}\nca_dir = \"{}/ca\"", free_port(), dir.path().display()))
        .replace("~/.config/clauderon/proxy.log", &format!("{}/proxy.log", dir.path().display()));
    let path = dir.path().join("seed.toml");
    std::fs::write(&path, seed).unwrap();
    set_mode(&path, 0o600);
    let o = run(
        dir.path(),
        &["check", "--config", path.to_str().unwrap()],
        &[("ANTHROPIC_API_KEY", "a"), ("GITHUB_TOKEN", "g")],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("github and github_basic overlap on github.com"), "{}", text(&o));
    // Inline secrets warn.
    let (dir, path) =
        cfg_dir("[credentials.x]\nheader = \"k\"\nvalue = \"inline\"\ndomains = [\"a.example\"]\n");
    let o = run(dir.path(), &["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("secret written in the config") && !text(&o).contains("\"inline\""),
        "{}",
        text(&o)
    );
}

#[test]
fn explain_json_names_the_credential_never_the_secret() {
    let body = "[proxy.filters]\nblocked_domains = [\"*.evil.com\"]\n#END-PROXY\n[credentials.anthropic]\nheader = [\"x-api-key\", \"Authorization: Bearer\"]\nvalue = \"${ANTHROPIC_API_KEY}\"\ndomains = [\"api.anthropic.com\"]\n";
    let (dir, path) = cfg_dir(body);
    let p = path.to_str().unwrap();
    let env = [("ANTHROPIC_API_KEY", SECRET)];
    let j = |url: &str| {
        let o = run(dir.path(), &["explain", "--config", p, "--json", url], &env);
        assert!(o.status.success(), "{}", text(&o));
        assert!(!text(&o).contains(SECRET));
        json(&String::from_utf8_lossy(&o.stdout))
    };
    let v = j("https://api.anthropic.com/v1/messages");
    assert_eq!(v["decision"], "inject");
    assert_eq!(v["credential"], "anthropic");
    assert_eq!(v["inject"], serde_json::json!([{"header": "x-api-key"}, {"header": "authorization"}]));
    let v = j("https://example.com/");
    assert_eq!(v["decision"], "tunnel");
    assert_eq!(v["credential"], serde_json::Value::Null);
    let v = j("https://a.evil.com/");
    assert_eq!(v["decision"], "block");
    let v = j("http://api.anthropic.com/");
    assert_eq!(v["decision"], "block", "plain HTTP to a credential host");
    let v = j("http://example.com/");
    assert_eq!(v["decision"], "pass");
    let o = run(dir.path(), &["explain", "--config", p, "https://api.anthropic.com/v1/messages"], &env);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.starts_with("inject:") && t.contains("anthropic") && t.contains("ANTHROPIC_API_KEY"), "{t}");
}

#[test]
fn env_prints_the_client_side_only() {
    let (dir, path) = cfg_dir("");
    let p = path.to_str().unwrap();
    let env = [
        ("ANTHROPIC_API_KEY", SECRET),
        ("GH_TOKEN", "ghp_REAL"),
        ("OPENAI_API_KEY", "sk-oa"),
        ("NO_PROXY", "api.anthropic.com"),
    ];
    let o = run(dir.path(), &["env", "--config", p, "--format", "json"], &env);
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&String::from_utf8_lossy(&o.stdout));
    let port = std::fs::read_to_string(&path).unwrap();
    let port = port.lines().find_map(|l| l.strip_prefix("port = ")).unwrap().to_string();
    assert_eq!(v["HTTPS_PROXY"], format!("http://127.0.0.1:{port}"));
    assert_eq!(v["https_proxy"], v["HTTPS_PROXY"]);
    assert_eq!(v["NO_PROXY"], "localhost,127.0.0.1,::1", "never a credential host");
    assert_eq!(v["NODE_USE_ENV_PROXY"], "1");
    let bundle = dir.path().join("ca/bundle.pem");
    for k in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "GIT_SSL_CAINFO",
        "AWS_CA_BUNDLE",
        "CARGO_HTTP_CAINFO",
        "DENO_CERT",
    ] {
        assert_eq!(v[k], bundle.display().to_string(), "{k}");
    }
    assert_eq!(v["NODE_EXTRA_CA_CERTS"], dir.path().join("ca/ca.crt").display().to_string());
    assert_eq!(v["ANTHROPIC_API_KEY"], "latchkey-anthropic");
    assert_eq!(v["OPENAI_API_KEY"], "latchkey-openai");
    assert_eq!(v["CODEX_API_KEY"], "latchkey-openai");
    assert_eq!(v["GH_TOKEN"], "latchkey-github");
    assert_eq!(v["GITHUB_TOKEN"], "latchkey-github", "shared client-side variable, one placeholder");
    assert_eq!(v["GIT_CONFIG_KEY_0"], "url.https://github.com/.insteadOf");
    assert_eq!(v["GIT_CONFIG_VALUE_0"], "git@github.com:");
    assert!(!text(&o).contains(SECRET) && !text(&o).contains("ghp_REAL"));

    let o = run(
        dir.path(),
        &[
            "env",
            "--config",
            p,
            "--proxy-url",
            "http://latchkey:3128",
            "--ca-path",
            "/etc/latchkey/bundle.pem",
        ],
        &env,
    );
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains("export HTTPS_PROXY='http://latchkey:3128'"), "{t}");
    assert!(t.contains("export SSL_CERT_FILE='/etc/latchkey/bundle.pem'"), "{t}");
    let o = run(dir.path(), &["env", "--config", p, "--format", "fish"], &env);
    assert!(String::from_utf8_lossy(&o.stdout).contains("set -gx ANTHROPIC_API_KEY 'latchkey-anthropic'"));
    let o = run(dir.path(), &["env", "--config", p, "--format", "dotenv"], &env);
    assert!(String::from_utf8_lossy(&o.stdout).contains("ANTHROPIC_API_KEY=\"latchkey-anthropic\""));
}

#[test]
fn exec_scrubs_secrets_sets_placeholders_and_returns_the_status() {
    let up = upstream(true, None);
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), free_port(), Some(up.addr), "");
    let p = path.to_str().unwrap();
    let env = [("ANTHROPIC_API_KEY", SECRET), ("GOOGLE_APPLICATION_CREDENTIALS", "/home/me/key.json")];
    let o = run(dir.path(), &["exec", "--config", p, "--", "sh", "-c", "exit 7"], &env);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    let o = run(dir.path(), &["exec", "--config", p, "--", "env"], &env);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains("ANTHROPIC_API_KEY=latchkey-anthropic"), "{t}");
    assert!(!t.contains(SECRET) && !t.contains("key.json"), "{t}");
    assert!(t.contains("HTTPS_PROXY=http://127.0.0.1:"), "{t}");
    // A real client inside exec, through the in-process proxy.
    let script = "curl -sS -H \"x-api-key: $ANTHROPIC_API_KEY\" https://api.anthropic.com/v1/messages";
    let o = run(dir.path(), &["exec", "--config", p, "--", "sh", "-c", script], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(echoed(&String::from_utf8_lossy(&o.stdout), "x-api-key"), [SECRET]);
}

#[test]
fn exec_uses_a_running_instance() {
    let up = upstream(true, None);
    let lk = Latchkey::start(Some(&up), "", &[("ANTHROPIC_API_KEY", SECRET)]);
    // This exec runs where the secret is not (like the agent's terminal): the running
    // instance says what is active, so the placeholder is still exported, and only the
    // running instance can inject the secret.
    let script = "test \"$ANTHROPIC_API_KEY\" = latchkey-anthropic && curl -sS -H \"x-api-key: $ANTHROPIC_API_KEY\" https://api.anthropic.com/v1/messages";
    let o = latchkey_cmd(lk.dir.path(), &[])
        .args(["exec", "--config"])
        .arg(&lk.config_path)
        .args(["--", "sh", "-c", script])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(echoed(&String::from_utf8_lossy(&o.stdout), "x-api-key"), [SECRET]);
    let o = lk.cli(&["env", "--format", "json"], &[]);
    assert_eq!(json(&String::from_utf8_lossy(&o.stdout))["ANTHROPIC_API_KEY"], "latchkey-anthropic");
}

#[test]
fn ca_files_modes_and_commands() {
    let (dir, path) = cfg_dir("");
    let p = path.to_str().unwrap();
    let o = run(dir.path(), &["ca", "export", "--config", p], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let pem = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----") && !pem.contains("PRIVATE KEY"));
    let ca = dir.path().join("ca");
    assert_eq!(std::fs::metadata(&ca).unwrap().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(ca.join("ca.key")).unwrap().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(ca.join("ca.crt")).unwrap().mode() & 0o777, 0o644);
    let o = run(dir.path(), &["ca", "path", "--config", p], &[]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), ca.join("ca.crt").display().to_string());
    let o = run(dir.path(), &["ca", "regenerate", "--config", p], &[]);
    assert!(o.status.success());
    let o = run(dir.path(), &["ca", "export", "--config", p], &[]);
    assert_ne!(String::from_utf8_lossy(&o.stdout), pem, "a new CA");

    let (dir, path) = cfg_dir("generate_certs = false\n#END-PROXY\n");
    let o = run(dir.path(), &["run", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("generate_certs = false"), "{}", text(&o));
}

#[test]
fn providers_lists_the_builtin_table() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("ANTHROPIC_API_KEY", SECRET), ("PAGERDUTY_TOKEN", "pd-REAL"), ("GH_TOKEN", "ghp_REAL")];
    let o = run(dir.path(), &["providers"], &env);
    let t = String::from_utf8_lossy(&o.stdout);
    for want in [
        "anthropic",
        "api.anthropic.com",
        "OPENAI_API_KEY,CODEX_API_KEY",
        "github_git",
        "raw.githubusercontent.com",
        // Where each writes its secret: slots and prefixes, as templates.
        "x-api-key | Authorization: Bearer ",
        " api-key ",
        " x-goog-api-key ",
        "Authorization: Token token= ",
        "Authorization: Basic base64(x-access-token:…)",
    ] {
        assert!(t.contains(want), "{want}: {t}");
    }
    assert!(!t.contains(SECRET) && !t.contains("pd-REAL") && !t.contains("ghp_REAL"), "{t}");
    let header_only = t.lines().filter(|l| l.split_whitespace().nth(2) == Some("header")).count();
    assert_eq!(header_only, 0, "no provider is shown as just \"header\": {t}");
}

#[test]
fn non_loopback_bind_without_allowed_clients_is_refused() {
    let (dir, path) = cfg_dir("");
    let o = run(dir.path(), &["run", "--config", path.to_str().unwrap(), "--bind", "0.0.0.0"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("allowed_clients"), "{}", text(&o));
}

/// The log's text once it has `n` lines (waiting up to 10 s for its writer).
fn log_lines_at_least(log: &std::path::Path, n: usize) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().count() >= n || std::time::Instant::now() > deadline {
            assert!(text.lines().count() >= n, "{n} lines expected:\n{text}");
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn audit_log_is_hash_chained_across_restarts() {
    let up = upstream(true, None);
    let logdir = tempfile::tempdir().unwrap();
    let log = logdir.path().join("requests.log");
    let cfg = format!("[proxy.logging]\nlog_requests = true\nlog_file = \"{}\"\n#END-PROXY\n", log.display());
    let lk = Latchkey::start(Some(&up), &cfg, &[]);
    lk.curl(&["https://api.example.com/one"]);
    lk.curl(&["http://169.254.169.254/"]);
    // The log's writer runs behind the responses, and dropping `lk` SIGKILLs it: wait
    // for the lines to be on disk first (a loaded machine once lost them here).
    log_lines_at_least(&log, 2);
    drop(lk);
    let lk = Latchkey::start(Some(&up), &cfg, &[]);
    lk.curl(&["https://api.example.com/two"]);
    let log_text = log_lines_at_least(&log, 3);
    let o = run(lk.dir.path(), &["audit", "verify", log.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // Edit one line: the chain names the line after it.
    let tampered = log_text.replacen("\"status\":403", "\"status\":200", 1);
    assert_ne!(tampered, log_text);
    std::fs::write(&log, &tampered).unwrap();
    let o = run(lk.dir.path(), &["audit", "verify", log.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains(":3: chain broken"), "{}", text(&o));
}

#[test]
fn signed_audit_lines_expose_a_rechained_forgery() {
    use sha2_free::sha256_hex;
    let up = upstream(true, None);
    let logdir = tempfile::tempdir().unwrap();
    let (log, key) = (logdir.path().join("requests.log"), logdir.path().join("audit.key"));
    std::fs::write(&key, "0123456789abcdef0123456789abcdef").unwrap();
    set_mode(&key, 0o600);
    let cfg = format!(
        "[proxy.logging]\nlog_requests = true\nlog_file = \"{}\"\nhmac_key_file = \"{}\"\n#END-PROXY\n",
        log.display(),
        key.display()
    );
    let lk = Latchkey::start(Some(&up), &cfg, &[]);
    lk.curl(&["https://api.example.com/one"]);
    lk.curl(&["http://169.254.169.254/"]);
    lk.curl(&["https://api.example.com/two"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (logp, keyp) = (log.to_str().unwrap(), key.to_str().unwrap());
    let o = run(lk.dir.path(), &["audit", "verify", logp, "--hmac-key", keyp], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("every HMAC valid"), "{}", text(&o));

    // A forger who can write the log but not read the key: change line 2, drop the
    // signatures and recompute the whole SHA-256 chain.
    let original = std::fs::read_to_string(&log).unwrap();
    let mut prev = String::new();
    let mut forged = Vec::new();
    for (i, line) in original.lines().enumerate() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.remove("hmac");
        if i == 1 {
            obj.insert("status".into(), serde_json::json!(200));
        }
        if i > 0 {
            obj.insert("prev".into(), serde_json::json!(prev));
        }
        let text = serde_json::to_string(&v).unwrap();
        prev = sha256_hex(text.as_bytes());
        forged.push(text);
    }
    std::fs::write(&log, forged.join("\n") + "\n").unwrap();
    let o = run(lk.dir.path(), &["audit", "verify", logp], &[]);
    assert_eq!(o.status.code(), Some(0), "the unkeyed chain alone is fooled: {}", text(&o));
    let o = run(lk.dir.path(), &["audit", "verify", logp, "--hmac-key", keyp], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains(":1: chain broken: no \"hmac\""), "{}", text(&o));
}

/// SHA-256 via the `sha256sum` tool, so the test uses no hashing code of latchkey's.
mod sha2_free {
    pub fn sha256_hex(data: &[u8]) -> String {
        use std::io::Write;
        let mut c = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(data).unwrap();
        let out = c.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
    }
}

/// Does ca.key hold the key ca.crt certifies?
fn ca_pair_matches(ca_dir: &std::path::Path) -> bool {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let der = CertificateDer::from_pem_file(ca_dir.join("ca.crt")).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw()
}

/// curl through the proxy on `port`, trusting only `ca` (no public roots, no bundle).
fn curl_trusting(port: u16, ca: &std::path::Path, url: &str) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"])
        .args(["-x", &format!("http://127.0.0.1:{port}"), "--cacert"])
        .arg(ca)
        .arg(url)
        .output()
        .unwrap();
    parse_curl(out)
}

fn wait_listening(port: u16, child: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "a replica exited");
        assert!(std::time::Instant::now() < deadline, "replica on {port} did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Replicas started at the same moment on one empty ca_dir: exactly one CA pair ends
/// up on disk, and every replica's leaves chain to that ca.crt.
#[test]
fn replicas_starting_together_share_one_ca() {
    let up = upstream(true, None);
    let body =
        "[credentials.x]\nheader = \"x-token\"\nvalue = \"${X_TOKEN}\"\ndomains = [\"api.example.com\"]\n";
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), free_port(), Some(up.addr), body);
        let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
        let mut replicas: Vec<std::process::Child> = ports
            .iter()
            .map(|port| {
                latchkey_cmd(dir.path(), &[("X_TOKEN", "x-REAL")])
                    .args(["run", "--port", &port.to_string(), "--config"])
                    .arg(&config)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for (port, child) in ports.iter().zip(&mut replicas) {
            wait_listening(*port, child);
        }
        let ca = dir.path().join("ca");
        assert!(ca_pair_matches(&ca), "round {round}: ca.key and ca.crt are not one pair");
        let mut names: Vec<String> =
            std::fs::read_dir(&ca).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        // One replica holds the pid file and the jail control socket; the CA is one pair.
        names.retain(|n| n != "latchkey.pid" && n != "control.sock");
        assert_eq!(names, ["bundle.pem", "ca.crt", "ca.key", "ca.lock"], "round {round}");
        for port in &ports {
            let (code, body) = curl_trusting(*port, &ca.join("ca.crt"), "https://api.example.com/");
            assert_eq!(code, 200, "round {round}, replica on {port}: {body}");
            assert_eq!(echoed(&body, "x-token"), ["x-REAL"]);
        }
        for mut child in replicas {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `latchkey ARGS` with `dir` read-only for it: a read-only bind mount in a private
/// mount namespace as root (root ignores permission bits), mode 0500 otherwise.
fn read_only(dir: &std::path::Path, args: &[&str]) -> std::process::Command {
    let home = dir.parent().unwrap();
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        set_mode(dir, 0o500);
        let mut c = latchkey_cmd(home, &[]);
        c.args(args);
        return c;
    }
    let d = dir.display();
    let script = format!("mount --bind '{d}' '{d}' && mount -o remount,bind,ro '{d}' && exec \"$0\" \"$@\"");
    let mut c = std::process::Command::new("unshare");
    c.args(["-m", "sh", "-c", &script, bin()]).args(args);
    c.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).env("HOME", home);
    c
}

/// A read-only ca_dir must already hold a CA: a clear error otherwise; with one, the
/// proxy runs and signs with it.
#[test]
fn a_read_only_ca_dir_must_hold_a_ca() {
    let probe = std::process::Command::new("unshare").args(["-m", "true"]).status();
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        assert!(
            probe.is_ok_and(|s| s.success()),
            "this test needs `unshare -m` (util-linux) and mount rights when run as root"
        );
    }
    let up = upstream(true, None);
    let body = "[credentials.x]\nheader = \"x-token\"\nvalue = \"x-REAL\"\ndomains = [\"api.example.com\"]\n";
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, Some(up.addr), body);
    let ca = dir.path().join("ca");
    std::fs::create_dir(&ca).unwrap();
    set_mode(&ca, 0o700);
    let cfg = config.to_str().unwrap();
    let o = read_only(&ca, &["run", "--config", cfg]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("is read-only and holds no CA"), "{}", text(&o));

    set_mode(&ca, 0o700);
    let o = run(dir.path(), &["ca", "export", "--config", cfg], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let mut child = read_only(&ca, &["run", "--config", cfg])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port, &mut child);
    let (code, body) = curl_trusting(port, &ca.join("ca.crt"), "https://api.example.com/");
    let _ = child.kill();
    let _ = child.wait();
    set_mode(&ca, 0o700);
    assert_eq!(code, 200, "{body}");
}

/// Every flag and argument of every command is described in --help.
#[test]
fn help_describes_every_flag_of_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let commands: &[&[&str]] = &[
        &[],
        &["run"],
        &["reload"],
        &["exec"],
        &["env"],
        &["explain"],
        &["check"],
        &["ca"],
        &["ca", "path"],
        &["ca", "export"],
        &["ca", "regenerate"],
        &["providers"],
        &["audit"],
        &["audit", "verify"],
    ];
    for cmd in commands {
        let o = run(dir.path(), &[cmd, &["--help"][..]].concat(), &[]);
        let t = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{cmd:?}: {}", text(&o));
        let lines: Vec<&str> = t.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let spec = line.trim_start();
            let indent = line.len() - spec.len();
            if !(2..=6).contains(&indent) || !(spec.starts_with('-') || spec.starts_with('<')) {
                continue;
            }
            // Short help: "  --flag <V>  Description"; long help: the description on
            // the next, deeper-indented line.
            let inline = spec.split_once("  ").is_some_and(|(_, rest)| !rest.trim().is_empty());
            let below = lines.get(i + 1).is_some_and(|n| {
                let d = n.trim_start();
                !d.is_empty() && n.len() - d.len() > indent + 2
            });
            assert!(inline || below, "`latchkey {}`: undescribed: {line:?}\n{t}", cmd.join(" "));
        }
    }
}

const ANTHROPIC: &str = "[credentials.anthropic]\nheader = \"x-api-key\"\nvalue = \"${ANTHROPIC_API_KEY}\"\ndomains = [\"api.anthropic.com\"]\n";

/// In the agent's shell (no secrets), explain and check describe the running instance
/// (which holds them), and say so; --local, or no instance, describes this shell.
#[test]
fn explain_and_check_describe_the_running_instance() {
    let up = upstream(true, None);
    let url = "https://api.anthropic.com/v1/messages";
    let lk = Latchkey::start(Some(&up), ANTHROPIC, &[("ANTHROPIC_API_KEY", SECRET)]);
    let addr = format!("127.0.0.1:{}", lk.port);
    let o = lk.cli(&["explain", "--json", url], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(v["decision"], "inject", "{v}");
    assert_eq!(v["credential"], "anthropic");
    assert_eq!(v["inject"], serde_json::json!([{"header": "x-api-key"}]));
    assert_eq!((v["described"].as_str(), v["instance"].as_str()), (Some("running"), Some(addr.as_str())));
    let o = lk.cli(&["explain", url], &[]);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.starts_with("inject:") && t.contains(&format!("(decided by the latchkey running at {addr})")),
        "{t}"
    );
    assert!(!text(&o).contains(SECRET));
    // Another agent's view: as the proxy would treat a request carrying a header.
    let o = lk.cli(&["explain", "--json", "-H", "Origin: https://evil.example", url], &[]);
    assert_eq!(json(&String::from_utf8_lossy(&o.stdout))["decision"], "pass");
    let o = lk.cli(&["explain", "--json", "--local", url], &[]);
    let v = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!((v["decision"].as_str(), v["described"].as_str()), (Some("tunnel"), Some("config")), "{v}");

    let o = lk.cli(&["check"], &[]);
    let t = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(t.contains(&format!("credentials (as the latchkey running at {addr} has them):")), "{t}");
    assert!(t.lines().any(|l| l.contains("anthropic") && l.contains(" active ")), "{t}");
    let o = lk.cli(&["check", "--local"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("credential anthropic is inactive"), "{}", text(&o));

    // env is quiet with an instance, and warns without one.
    let o = lk.cli(&["env"], &[]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("warning"), "{}", text(&o));
    let port = lk.port;
    drop(lk);
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), port, Some(up.addr), ANTHROPIC);
    let o = run(dir.path(), &["env", "--config", path.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("warning: no latchkey with this CA answers at 127.0.0.1:{port}")), "{err}");
    let o = run(dir.path(), &["explain", "--config", path.to_str().unwrap(), url], &[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("decided from this shell's config"), "{}", text(&o));
}
