//! Operations through the real binary: hot reload (file rename, SIGHUP), the admin
//! endpoint, Prometheus metrics parsed by Prometheus' own parser, OTLP spans decoded with
//! the official protobuf definitions, LLM usage accounting and rate limits.

mod common;
use common::*;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

const OLD: &str = "sk-old-0123456789abcdef";
const NEW: &str = "sk-new-fedcba9876543210";

fn credential(var: &str, extra: &str) -> String {
    format!(
        "[credentials.example]\nheader = \"Authorization: Bearer\"\nvalue = \"${{{var}}}\"\ndomains = [\"api.example.com\"]\n{extra}\n"
    )
}

/// Replace the config file the way editors and Kubernetes do: write aside, rename over.
fn replace_config(lk: &Latchkey, up: &Upstream, body: &str) {
    lk.replace_config(|dir| write_config(dir, lk.port, Some(up.addr), body));
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

fn authorization_of(lk: &Latchkey) -> String {
    let (code, body) = lk.curl(&["https://api.example.com/v1/x"]);
    assert_eq!(code, 200, "{body}");
    echoed(&body, "authorization").join(",")
}

/// GET on the admin listener with the admin token (created by latchkey beside its config).
fn admin_get(lk: &Latchkey, port: u16, path: &str) -> (u16, String) {
    let token = std::fs::read_to_string(lk.dir.path().join("admin.token")).unwrap_or_default();
    let token = token.trim();
    let resp = raw::exchange(
        port,
        format!(
            "GET {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    let status = resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

fn start_with_admin(up: &Upstream, body: &str, env: &[(&str, &str)]) -> (Latchkey, u16) {
    let admin = free_port();
    let lk = Latchkey::start(Some(up), &format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n{body}"), env);
    wait_until("the admin port", || std::net::TcpStream::connect(("127.0.0.1", admin)).is_ok());
    (lk, admin)
}

#[test]
fn reload_on_rename_changes_injection_without_dropping_a_stream() {
    let up = upstream(true, None);
    let env = [("KEY_OLD", OLD), ("KEY_NEW", NEW)];
    let lk = Latchkey::start(Some(&up), &credential("KEY_OLD", ""), &env);
    assert_eq!(authorization_of(&lk), format!("Bearer {OLD}"));

    // A streaming response in flight across the reload: its first event is read before
    // the config changes, its second is released after.
    use std::io::{BufRead, Read};
    let mut stream = std::process::Command::new("curl")
        .args(["-sSN", "--max-time", "20", "-x", &lk.proxy_url(), "--cacert"])
        .arg(lk.bundle())
        .arg("https://api.example.com/sse")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(stream.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert_eq!(first, "data: one\n");

    replace_config(&lk, &up, &credential("KEY_NEW", ""));
    wait_until("the new key", || authorization_of(&lk) == format!("Bearer {NEW}"));
    assert!(lk.stderr().contains("reloaded (the config file changed)"), "{}", lk.stderr());

    up.sse_next.notify_one();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(stream.wait().unwrap().success(), "the stream was not cut");
    assert_eq!(rest, "\ndata: two\n\n", "the in-flight stream finished");
}

#[test]
fn sighup_and_latchkey_reload_apply_a_config_the_watcher_was_told_to_ignore() {
    let up = upstream(true, None);
    let env = [("KEY_OLD", OLD), ("KEY_NEW", NEW)];
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = write_config(dir.path(), port, Some(up.addr), &credential("KEY_OLD", ""));
    let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let child = latchkey_cmd(dir.path(), &env)
        .args(["run", "--no-watch", "--config"])
        .arg(&path)
        .stderr(stderr)
        .spawn()
        .unwrap();
    let lk = Latchkey { port, dir, child, config_path: path.clone(), stderr_path: Default::default() };
    wait_until("latchkey", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    replace_config(&lk, &up, &credential("KEY_NEW", ""));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(authorization_of(&lk), format!("Bearer {OLD}"), "--no-watch: not reloaded on its own");
    let out = latchkey_cmd(lk.dir.path(), &env).args(["reload", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("the new key after SIGHUP", || authorization_of(&lk) == format!("Bearer {NEW}"));
}

#[test]
fn a_broken_config_keeps_the_old_one_and_readyz_stays_ready() {
    let up = upstream(true, None);
    let (lk, admin) = start_with_admin(&up, &credential("KEY_OLD", ""), &[("KEY_OLD", OLD)]);
    // The admin port may answer a moment before the proxy is ready: that is the point.
    wait_until("ready", || admin_get(&lk, admin, "/readyz") == (200, "ready\n".into()));
    let broken = std::fs::read_to_string(&lk.config_path).unwrap() + "\n[credentials.bad]\nheadr = \"x\"\n";
    let aside = lk.dir.path().join("broken.toml");
    std::fs::write(&aside, broken).unwrap();
    std::fs::rename(&aside, &lk.config_path).unwrap();
    wait_until("the failed reload", || lk.stderr().contains("reload (the config file changed) failed"));
    assert!(lk.stderr().contains("unknown key `headr`"), "the error names the key: {}", lk.stderr());
    assert_eq!(authorization_of(&lk), format!("Bearer {OLD}"), "the last good config stays");
    assert_eq!(admin_get(&lk, admin, "/readyz"), (200, "ready\n".into()));
    let (_, metrics) = admin_get(&lk, admin, "/metrics");
    assert!(metrics.contains("latchkey_reloads_total{result=\"failed\"} 1"), "{metrics}");
}

/// Every sample of an OpenMetrics text, parsed by the Prometheus Python client.
fn parse_metrics(text: &str) -> Vec<serde_json::Value> {
    let script = "import json,sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
                  print(json.dumps([{'name': s.name, 'labels': s.labels, 'value': s.value} for f in p(sys.stdin.read()) for s in f.samples]))";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "not valid OpenMetrics: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sample(samples: &[serde_json::Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][k] == *v))
        .map(|s| s["value"].as_f64().unwrap())
        .sum()
}

#[test]
fn metrics_count_known_traffic_and_carry_no_secret() {
    let up = upstream(true, None);
    let (lk, admin) = start_with_admin(&up, &credential("KEY_OLD", ""), &[("KEY_OLD", OLD)]);
    for _ in 0..5 {
        assert_eq!(lk.curl(&["https://api.example.com/v1/x"]).0, 200);
    }
    // No credential there: a blind tunnel, counted when it closes.
    assert_eq!(lk.curl(&["-k", "https://other.example.com/"]).0, 200);
    let tunnelled = [("decision", "tunnelled"), ("credential", "none")];
    wait_until("the tunnel to be counted", || {
        sample(&parse_metrics(&admin_get(&lk, admin, "/metrics").1), "latchkey_requests_total", &tunnelled)
            == 1.0
    });
    let (code, text) = admin_get(&lk, admin, "/metrics");
    assert_eq!(code, 200);
    let s = parse_metrics(&text);
    let injected = [("decision", "injected"), ("credential", "example"), ("status", "2xx")];
    assert_eq!(sample(&s, "latchkey_requests_total", &injected), 5.0, "{text}");
    assert_eq!(sample(&s, "latchkey_upstream_response_seconds_count", &[("credential", "example")]), 5.0);
    assert!(sample(&s, "latchkey_bytes_total", &[("direction", "down"), ("credential", "example")]) > 0.0);
    assert_eq!(sample(&s, "latchkey_tls_handshakes_total", &[("result", "ok")]), 5.0);
    assert_eq!(sample(&s, "latchkey_leaf_cache_total", &[("result", "miss")]), 1.0);
    assert_eq!(sample(&s, "latchkey_leaf_cache_total", &[("result", "hit")]), 4.0);
    assert!(!text.contains("other.example.com"), "no host labels");
    assert_no_secret(&text, OLD);

    // /config names sources, never values; /ca.crt is the CA; the admin port is not a
    // destination the proxy will reach.
    let (_, config) = admin_get(&lk, admin, "/config");
    let v: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        v["credentials"].as_array().unwrap().iter().find(|c| c["name"] == "example").unwrap()["source"],
        "env KEY_OLD"
    );
    assert_no_secret(&config, OLD);
    let (_, ca) = admin_get(&lk, admin, "/ca.crt");
    assert_eq!(ca, std::fs::read_to_string(lk.dir.path().join("ca/ca.crt")).unwrap());
    let (code, _) = lk.curl(&[&format!("http://127.0.0.1:{admin}/metrics")]);
    assert_eq!(code, 403, "the admin port through the proxy");
}

fn assert_no_secret(text: &str, secret: &str) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
    assert!(!text.contains(secret) && !text.contains(&b64[..b64.len() - 4]), "secret leaked: {text}");
}

fn llm_upstream(dir: &Path) -> (PyServer, std::net::SocketAddr) {
    let (cert, key) = (dir.join("up.crt"), dir.join("up.key"));
    std::fs::write(&cert, &pki().cert_pem).unwrap();
    std::fs::write(&key, &pki().key_pem).unwrap();
    python_upstream({
        let mut c = py("llm_server.py");
        c.arg(&cert).arg(&key);
        c
    })
}

fn start_llm(extra: &str, env: &[(&str, &str)]) -> (PyServer, Latchkey, u16, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let (server, addr) = llm_upstream(tmp.path());
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin = free_port();
    let body = format!(
        "[proxy.logging]\nlog_requests = true\nlog_file = \"{}\"\n#END-PROXY\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n{extra}",
        dir.path().join("audit.jsonl").display()
    );
    let config = write_config(dir.path(), port, Some(addr), &body);
    let lk = Latchkey::spawn(dir, port, config, env);
    (server, lk, admin, tmp)
}

const LLM_CREDS: &str = "[credentials.anthropic]\nheader = \"x-api-key\"\nvalue = \"${ANTHROPIC_API_KEY}\"\ndomains = [\"api.anthropic.com\"]\n\
                         [credentials.openai]\nheader = \"Authorization: Bearer\"\nvalue = \"${OPENAI_API_KEY}\"\ndomains = [\"api.openai.com\"]\n";

fn audit_lines(lk: &Latchkey) -> Vec<serde_json::Value> {
    std::fs::read_to_string(lk.dir.path().join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn llm_usage_is_exact_in_the_log_and_the_metrics() {
    let env =
        [("ANTHROPIC_API_KEY", "sk-ant-usage-0123456789"), ("OPENAI_API_KEY", "sk-oai-usage-0123456789")];
    let (_server, lk, admin, _tmp) = start_llm(LLM_CREDS, &env);
    let (code, body) = lk.curl(&["-X", "POST", "-d", "{}", "https://api.anthropic.com/v1/messages"]);
    assert_eq!(code, 200);
    assert!(body.contains("message_stop"), "the stream reached the client whole: {body}");
    let (code, _) = lk.curl(&["-X", "POST", "-d", "{}", "https://api.openai.com/v1/chat/completions"]);
    assert_eq!(code, 200);
    wait_until("two audit lines", || audit_lines(&lk).len() >= 2);
    let lines = audit_lines(&lk);
    let usage = |cred: &str| lines.iter().find(|l| l["credential"] == cred).unwrap()["usage"].clone();
    assert_eq!(
        usage("anthropic"),
        serde_json::json!({"model": "claude-sonnet-4-5", "input_tokens": 25, "output_tokens": 15})
    );
    assert_eq!(
        usage("openai"),
        serde_json::json!({"model": "gpt-4o-2024-08-06", "input_tokens": 19, "output_tokens": 10})
    );
    let s = parse_metrics(&admin_get(&lk, admin, "/metrics").1);
    let tokens = |cred: &str, kind: &str| {
        sample(&s, "latchkey_llm_tokens_total", &[("credential", cred), ("kind", kind)])
    };
    assert_eq!((tokens("anthropic", "input"), tokens("anthropic", "output")), (25.0, 15.0));
    assert_eq!((tokens("openai", "input"), tokens("openai", "output")), (19.0, 10.0));
}

#[test]
fn requests_per_minute_answers_429_at_the_right_count_and_survives_a_reload() {
    let up = upstream(true, None);
    let creds = credential("KEY_OLD", "requests_per_minute = 3");
    let lk = Latchkey::start(Some(&up), &creds, &[("KEY_OLD", OLD)]);
    for _ in 0..3 {
        assert_eq!(lk.curl(&["https://api.example.com/v1/x"]).0, 200);
    }
    let out = std::process::Command::new("curl")
        .args(["-sS", "-D", "-", "-x", &lk.proxy_url(), "--cacert"])
        .arg(lk.bundle())
        .arg("https://api.example.com/v1/x")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    // After the proxy's own CONNECT answer, the response itself.
    let (_, response) = text.split_once("\r\n\r\n").unwrap();
    assert!(response.starts_with("http/2 429") || response.starts_with("http/1.1 429"), "{text}");
    // A bucket of 3 per minute refills one every 20 s; the wait is what is left of that,
    // which is 19 when the three requests before took over a second on a loaded machine.
    let wait: u32 =
        text.split("retry-after: ").nth(1).and_then(|t| t.lines().next()).unwrap().trim().parse().unwrap();
    assert!((1..=20).contains(&wait), "{text}");
    assert!(text.contains("x-latchkey-error: rate-limited"), "{text}");
    assert!(text.contains("latchkey: credential example is over its requests_per_minute limit"), "{text}");
    assert_eq!(up.count(), 3, "the refused request never left");

    // A reload (here: another unrelated change) keeps the bucket as it was.
    replace_config(
        &lk,
        &up,
        &format!(
            "{creds}\n[credentials.other]\nheader = \"x-k\"\nvalue = \"v-123456789\"\ndomains = [\"other.example.com\"]\n"
        ),
    );
    wait_until("the reload", || lk.stderr().contains("reloaded"));
    assert_eq!(lk.curl(&["https://api.example.com/v1/x"]).0, 429);
}

#[test]
fn a_token_budget_stops_an_agent_for_the_day() {
    let env = [
        ("ANTHROPIC_API_KEY", "sk-ant-budget-0123456789"),
        ("OPENAI_API_KEY", "sk-oai-budget-0123456789"),
        ("BOT_TOKEN", "bot-token-123456"),
    ];
    let agents = "[agents.bot]\ntoken = \"${BOT_TOKEN}\"\ntokens_per_day = 50\n";
    let (_server, lk, _admin, _tmp) = start_llm(&format!("{LLM_CREDS}{agents}"), &env);
    let proxy = format!("http://bot:bot-token-123456@127.0.0.1:{}", lk.port);
    let call = || {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                "-d",
                "{}",
                "-x",
                &proxy,
                "--cacert",
            ])
            .arg(lk.bundle())
            .arg("https://api.anthropic.com/v1/messages")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(call(), "200"); // 40 tokens
    wait_until("the usage to be charged", || !audit_lines(&lk).is_empty());
    assert_eq!(call(), "200"); // 80: over the budget after this one
    wait_until("the usage to be charged", || audit_lines(&lk).len() >= 2);
    assert_eq!(call(), "429");
}

/// An OTLP collector (tests/py/otlp_receiver.py) writing decoded spans to a file.
struct Collector {
    _server: PyServer,
    addr: std::net::SocketAddr,
    out: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Collector {
    fn start() -> Collector {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("spans.jsonl");
        let (server, addr) = python_upstream({
            let mut c = py("otlp_receiver.py");
            c.arg(&out);
            c
        });
        Collector { _server: server, addr, out, _dir: dir }
    }

    fn telemetry_config(&self, rest: &str) -> String {
        format!("[telemetry]\notlp_endpoint = \"http://{}\"\ncapture_body_bytes = 4096\n{rest}", self.addr)
    }

    /// The decoded spans file once a span arrived, and its first span.
    fn first_span(&self) -> (String, serde_json::Value) {
        wait_until("a span", || std::fs::read_to_string(&self.out).is_ok_and(|t| !t.is_empty()));
        let text = std::fs::read_to_string(&self.out).unwrap();
        let span = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        (text, span)
    }

    /// The protobuf bodies as received.
    fn raw(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.out.with_extension("jsonl.raw")).unwrap()).into_owned()
    }
}

#[test]
fn otlp_spans_reach_a_collector_with_credential_headers_redacted() {
    let up = upstream(true, None);
    let c = Collector::start();
    let body = c.telemetry_config(&credential("KEY_OLD", ""));
    let lk = Latchkey::start(
        Some(&up),
        &format!("[proxy]\nredact_responses = true\n#END-PROXY\n{body}"),
        &[("KEY_OLD", OLD)],
    );
    let (code, _) = lk.curl(&[
        "-H",
        "Authorization: Bearer placeholder",
        "-H",
        "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "https://api.example.com/reflect/body",
    ]);
    assert_eq!(code, 200);
    let (text, span) = c.first_span();
    let a = &span["attributes"];
    assert_eq!(span["name"], "GET");
    assert_eq!(span["kind"], 3);
    assert_eq!(span["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "the client's trace continues");
    assert_eq!(span["parent_span_id"], "00f067aa0ba902b7");
    assert_eq!(span["resource"]["service.name"], "latchkey");
    assert_eq!(a["http.request.method"], "GET");
    assert_eq!(a["server.address"], "api.example.com");
    assert_eq!(a["http.response.status_code"], 200);
    assert_eq!(a["latchkey.credential"], "example");
    assert_eq!(a["latchkey.decision"], "injected");
    assert_eq!(a["http.request.header.authorization"], "[redacted]");
    assert!(a["latchkey.response.body"].as_str().unwrap().contains("****"), "captured after redaction: {a}");
    assert_no_secret(&text, OLD);
    assert_no_secret(&c.raw(), OLD);
}

#[test]
fn spans_never_carry_a_secret_even_with_response_redaction_off() {
    let up = upstream(true, None);
    let c = Collector::start();
    let body = c.telemetry_config(&credential("KEY_OLD", ""));
    // redact_responses = false (the harness default): the client sees the reflection raw.
    let lk = Latchkey::start(Some(&up), &body, &[("KEY_OLD", OLD)]);
    let (code, seen) = lk.curl(&["-H", &format!("X-Leaked: {OLD}"), "https://api.example.com/reflect/body"]);
    assert_eq!(code, 200);
    assert!(seen.contains(OLD), "redaction is off for the client: {seen}");
    let (text, span) = c.first_span();
    assert!(
        span["attributes"]["http.request.header.x-leaked"].as_str().unwrap().starts_with("****"),
        "{span}"
    );
    assert!(span["attributes"]["latchkey.response.body"].as_str().unwrap().contains("****"), "{span}");
    assert_no_secret(&text, OLD);
    assert_no_secret(&c.raw(), OLD);
}
