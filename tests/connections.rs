//! Connection-level attacks, through the real binary: malformed CONNECTs and heads
//! hyper used to refuse in its own words, plain HTTP hidden in a blind tunnel, early
//! refusals a client still sending must be able to read, tunnels that lied about their
//! byte counts, an upgrade that never happened switching off the smuggling guard, one
//! HTTP/2 connection fanning out into every file descriptor, and a reload that did not
//! reach open connections. Each test fails when its defence is removed.

mod common;
use common::raw::{exchange, request, tls, tunnel};
use common::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const CRED: &str = r#"
[credentials.anthropic]
header = "x-api-key"
value = "${ANTHROPIC_API_KEY}"
domains = ["api.anthropic.com"]
"#;
const SECRET: &str = "sk-ant-REAL-0123456789";
const ENV: &[(&str, &str)] = &[("ANTHROPIC_API_KEY", SECRET)];

fn status(resp: &str) -> u16 {
    resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A refusal in latchkey's own words (SPEC 6): the status, an `X-Latchkey-Error` kind
/// and a `latchkey:` line — not hyper's bare status line.
fn assert_latchkeys(resp: &str, code: u16, what: &str) {
    assert_eq!(status(resp), code, "{what}: {resp}");
    assert!(resp.to_ascii_lowercase().contains("\r\nx-latchkey-error: "), "{what}: {resp}");
    assert!(resp.contains("\r\n\r\nlatchkey: "), "{what}: {resp}");
}

/// `[proxy.logging]` lines for a fresh request log, and its path.
fn logging() -> (String, PathBuf) {
    let path = tempfile::tempdir().unwrap().keep().join("requests.log");
    (format!("[proxy.logging]\nlog_requests = true\nlog_file = \"{}\"\n", path.display()), path)
}

fn log_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The log once `done` holds for it (a thread writes it).
fn log_until(path: &Path, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = log_lines(path);
        if done(&lines) {
            return lines;
        }
        assert!(Instant::now() < deadline, "{what}; the log has:\n{lines:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One response (head and a `Content-Length` body) from a stream kept open.
fn response<S: Read>(s: &mut S) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let length = text
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    let _ = s.read_exact(&mut body);
    text + &String::from_utf8_lossy(&body)
}

#[test]
fn malformed_connects_and_heads_get_latchkeys_refusal_and_a_blocked_line() {
    let up = upstream(true, None);
    let (log_cfg, log) = logging();
    let lk = Latchkey::start(Some(&up), &format!("{log_cfg}#END-PROXY\n{CRED}"), ENV);
    // The first six used to get hyper's bare 400: no body, no kind, no log line.
    let targets = [
        "api%2eopenai.com:443",
        "api.openai.com%00:443",
        "api.openai.com\\@attacker.example:443",
        "host.example:443/x",
        "api.open%61i.com:443",
        "api.open\tai.com:443",
        "host.example:0",
        "user@host.example:443",
        "[fe80::1%eth0]:443",
        "api..openai.com:443",
    ];
    for t in targets {
        let (_, head) = tunnel(lk.port, t);
        assert_latchkeys(&head, 400, t);
    }
    // Heads over the limits: hyper's bare 431 before.
    let big = format!(
        "CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com\r\nx-big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    assert_latchkeys(&exchange(lk.port, big.as_bytes()), 431, "a 70 kB head");
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let resp = exchange(lk.port, format!("GET http://api.example.com/ HTTP/1.1\r\n{many}\r\n").as_bytes());
    assert_latchkeys(&resp, 431, "150 headers");
    // Inside an intercepted tunnel: a header line hyper cannot parse.
    let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
    let resp = request(
        tls(s, "api.anthropic.com"),
        "GET /v1/x?q=secret HTTP/1.1\r\nHost: api.anthropic.com\r\nBad Header: x\r\n\r\n",
    );
    assert_latchkeys(&resp, 400, "a bad header line in a tunnel");
    assert_eq!(up.count(), 0, "nothing forwarded");

    let lines = log_until(&log, "a blocked line for every refusal", |l| {
        l.iter().filter(|v| v["decision"] == "blocked").count() == targets.len() + 3
    });
    let connects: Vec<&Value> =
        lines.iter().filter(|v| v["method"] == "CONNECT" && v["status"] == 400).collect();
    assert_eq!(connects.len(), targets.len(), "{lines:#?}");
    assert!(connects.iter().any(|v| v["host"] == "api%2eopenai.com" && v["port"] == 443), "{connects:#?}");
    assert_eq!(lines.iter().filter(|v| v["status"] == 431).count(), 2, "{lines:#?}");
    let inside = lines.iter().find(|v| v["host"] == "api.anthropic.com").expect("the tunnel's refusal");
    assert_eq!((inside["status"].as_u64(), inside["path"].as_str()), (Some(400), Some("/v1/x")), "no query");
}

#[test]
fn proxy_authentication_and_client_refusals_are_logged() {
    let up = upstream(true, None);
    let (log_cfg, log) = logging();
    let agents = "[agents.alice]\ntoken = \"alice-token\"\n";
    let lk = Latchkey::start(Some(&up), &format!("{log_cfg}#END-PROXY\n{agents}{CRED}"), ENV);
    let (_, head) = tunnel(lk.port, "api.anthropic.com:443");
    assert_latchkeys(&head, 407, "no Proxy-Authorization");
    use base64::Engine;
    let wrong = base64::engine::general_purpose::STANDARD.encode("alice:guess");
    let resp = exchange(
        lk.port,
        format!("CONNECT api.anthropic.com:443 HTTP/1.1\r\nProxy-Authorization: Basic {wrong}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_latchkeys(&resp, 407, "a wrong token");
    let lines = log_until(&log, "two 407 lines", |l| l.iter().filter(|v| v["status"] == 407).count() == 2);
    assert!(
        lines.iter().all(|v| v["decision"] == "blocked" && v["host"] == "api.anthropic.com"),
        "{lines:#?}"
    );
    assert!(!std::fs::read_to_string(&log).unwrap().contains("guess"), "no token in the log");

    let (log_cfg, log) = logging();
    let lk = Latchkey::start(
        Some(&up),
        &format!("allowed_clients = [\"10.0.0.0/8\"]\n{log_cfg}#END-PROXY\n"),
        &[],
    );
    let (_, head) = tunnel(lk.port, "api.example.com:443");
    assert_latchkeys(&head, 403, "a client outside allowed_clients");
    log_until(&log, "the 403 line", |l| l.iter().any(|v| v["status"] == 403 && v["decision"] == "blocked"));
}

/// A TCP server that speaks first (an SMTP-like banner), then echoes what it gets;
/// it records every byte it received.
fn banner_server() -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = got.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let (Ok(mut s), seen) = (s, seen.clone()) else { return };
            std::thread::spawn(move || {
                let _ = s.write_all(b"220 banner.example.com ESMTP ready\r\n");
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    seen.lock().unwrap().extend_from_slice(&buf[..n]);
                    let _ = s.write_all(&buf[..n]);
                }
            });
        }
    });
    (addr, got)
}

/// Read from `s` until `needle` has arrived (or fail after 5 s).
fn read_until(s: &mut TcpStream, needle: &str) -> String {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains(needle) {
        match s.read(&mut buf) {
            Ok(n @ 1..) => got.extend_from_slice(&buf[..n]),
            other => panic!("{other:?} before {needle:?}; got {:?}", String::from_utf8_lossy(&got)),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn plain_http_in_a_blind_tunnel_is_plain_http_and_other_protocols_stay_blind() {
    let up = upstream(true, None);
    let plain = upstream(false, None);
    let (banner, banner_got) = banner_server();
    let (log_cfg, log) = logging();
    let cfg = format!("{log_cfg}#END-PROXY\n\"banner.example.com:25\" = \"{banner}\"\n{CRED}");
    let lk = Latchkey::start_plain(&up, &plain, &cfg, ENV);

    // other.example.com:80 has no credential and no filter: a blind tunnel. A CONNECT
    // written inside it is refused, not relayed to whatever listens there.
    let (mut s, head) = tunnel(lk.port, "other.example.com:80");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n").unwrap();
    let resp = response(&mut s);
    assert_latchkeys(&resp, 400, "CONNECT inside a blind tunnel");
    assert!(resp.contains("CONNECT inside a tunnel"), "{resp}");
    // Plain HTTP is served (and logged) as plain HTTP to the tunnel's destination...
    let (s, _) = tunnel(lk.port, "other.example.com:80");
    let resp = request(s, "GET /hello?x=1 HTTP/1.1\r\nHost: other.example.com\r\nConnection: close\r\n\r\n");
    assert_eq!(status(&resp), 200, "{resp}");
    assert!(resp.contains("\"path\":\"/hello?x=1\""), "{resp}");
    // ...with the rules of plain HTTP: a Host naming another host is misdirected.
    let (s, _) = tunnel(lk.port, "other.example.com:80");
    let resp = request(s, "GET / HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n");
    assert_eq!(status(&resp), 421, "{resp}");
    assert_eq!(plain.count(), 1, "only the well-formed GET reached the upstream");
    let lines = log_until(&log, "the GET's line", |l| l.iter().any(|v| v["path"] == "/hello"));
    let get = lines.iter().find(|v| v["path"] == "/hello").unwrap();
    assert_eq!((get["scheme"].as_str(), get["decision"].as_str()), (Some("http"), Some("passed")), "{get}");

    // A server that speaks first is not kept waiting for a client that says nothing.
    let (mut s, head) = tunnel(lk.port, "banner.example.com:25");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    read_until(&mut s, "220 banner.example.com ESMTP ready\r\n");
    s.write_all(b"EHLO client.example\r\n").unwrap();
    read_until(&mut s, "EHLO client.example\r\n");
    // A client that speaks first, not in HTTP (an SSH banner has spaces too): relayed.
    let (mut s, _) = tunnel(lk.port, "banner.example.com:25");
    s.write_all(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n").unwrap();
    read_until(&mut s, "220 banner.example.com ESMTP ready\r\nSSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n");
    // HTTP once the server has spoken is no HTTP server's traffic: refused, not relayed.
    let (mut s, _) = tunnel(lk.port, "banner.example.com:25");
    read_until(&mut s, "ESMTP ready\r\n");
    s.write_all(b"GET /x HTTP/1.1\r\nHost: banner.example.com:25\r\n\r\n").unwrap();
    let resp = read_until(&mut s, "\r\n\r\nlatchkey: ");
    assert!(resp.contains("HTTP/1.1 400"), "{resp}");
    std::thread::sleep(Duration::from_millis(200));
    let received = String::from_utf8_lossy(&banner_got.lock().unwrap()).into_owned();
    assert!(received.contains("EHLO") && received.contains("SSH-2.0"), "{received}");
    assert!(!received.contains("GET /x"), "HTTP never reached the banner server: {received}");
}

#[test]
fn early_refusals_reach_a_client_still_sending() {
    let up = upstream(true, None);
    let plain = upstream(false, None);
    let bedrock = "[credentials.bedrock]\nauth_type = \"aws_sigv4\"\naccess_key_id = \"AKIAREALKEY123456789\"\nsecret_access_key = \"${AWS_SECRET_ACCESS_KEY}\"\nmax_signed_body = 65536\ndomains = [\"bedrock-runtime.us-east-1.amazonaws.com\"]\n";
    let env = [("ANTHROPIC_API_KEY", SECRET), ("AWS_SECRET_ACCESS_KEY", "real/Secret+Key0123456789")];
    let lk = Latchkey::start_plain(&up, &plain, &format!("{CRED}{bedrock}"), &env);
    let run = |method: &str, url: &str, body: usize, header: usize| -> Value {
        let out = py("early_refusal.py")
            .env("PROXY", lk.proxy_url())
            .env("BUNDLE", lk.bundle())
            .args([method, url, &body.to_string(), &header.to_string()])
            .output()
            .expect("python3 with requests (scripts/test.sh installs it)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        json(&String::from_utf8_lossy(&out.stdout))
    };
    let cases = [
        // A body too large to sign, refused before it is read (in a TLS tunnel).
        ("POST", "https://bedrock-runtime.us-east-1.amazonaws.com/model/m/invoke", 8_000_000, 0, 413),
        // A head over max_header_bytes: in a tunnel, and on the proxy port.
        ("GET", "https://api.anthropic.com/", 0, 200_000, 431),
        ("GET", "http://api.example.com/", 0, 200_000, 431),
        // Plain HTTP to a credential host, refused before its upload is read.
        ("POST", "http://api.anthropic.com/v1/messages", 8_000_000, 0, 403),
    ];
    let results: Vec<(String, Value)> = cases
        .iter()
        .map(|(method, url, body, header, _)| (format!("{method} {url}"), run(method, url, *body, *header)))
        .collect();
    let read = |(_, got): &(String, Value), code: u16| {
        got["status"] == code
            && got["kind"].is_string()
            && got["body"].as_str().is_some_and(|b| b.starts_with("latchkey: "))
    };
    let all_read = results.iter().zip(cases).all(|(r, case)| read(r, case.4));
    assert!(all_read, "every client reads its refusal: {results:#?}");
    assert_eq!(up.count() + plain.count(), 0);
}

#[test]
fn blind_tunnels_log_the_bytes_they_carried_however_they_ended() {
    let up = upstream(true, None);
    let (log_cfg, log) = logging();
    let limits = "[proxy.limits]\nmax_tunnel_bytes = 200000\ntunnel_timeout = 2\n";
    let lk = Latchkey::start(Some(&up), &format!("{log_cfg}{limits}#END-PROXY\n{CRED}"), ENV);
    // Cut by the byte cap, mid-download.
    let out = Command::new("curl")
        .args(["-sSk", "-o", "/dev/null", "-x", &lk.proxy_url(), "--cacert"])
        .arg(lk.bundle())
        .arg("https://other.example.com/source?bytes=1000000")
        .output()
        .unwrap();
    assert!(!out.status.success(), "a 1 MB download through a 200 kB cap");
    // Cut by tunnel_timeout, idle after one exchange.
    let (s, _) = tunnel(lk.port, "other.example.com:443");
    let mut s = tls(s, "other.example.com");
    s.write_all(b"GET /source?bytes=5000 HTTP/1.1\r\nHost: other.example.com\r\n\r\n").unwrap();
    let first = response(&mut s);
    assert!(first.starts_with("HTTP/1.1 200") && first.len() > 5000, "{first}");
    let lines = log_until(&log, "both tunnels' lines", |l| {
        l.iter().filter(|v| v["decision"] == "tunnelled").count() == 2
    });
    let capped = lines.iter().find(|v| v["reason"].as_str().is_some_and(|r| r.contains("max_tunnel_bytes")));
    let capped = capped.unwrap_or_else(|| panic!("the capped tunnel's reason: {lines:#?}"));
    let down = capped["bytes_down"].as_u64().unwrap();
    assert!((150_000..=200_000).contains(&down), "bytes_down {down}: {capped}");
    assert!(capped["bytes_up"].as_u64().unwrap() > 300, "the ClientHello and request went up: {capped}");
    let timed = lines.iter().find(|v| v["reason"].as_str().is_some_and(|r| r.contains("tunnel_timeout")));
    let timed = timed.unwrap_or_else(|| panic!("the timed-out tunnel's reason: {lines:#?}"));
    assert!(timed["bytes_down"].as_u64().unwrap() > 5000, "{timed}");
    assert!(timed["bytes_up"].as_u64().unwrap() > 300, "{timed}");
}

#[test]
fn an_upgrade_that_did_not_happen_keeps_the_smuggling_guard_on() {
    let up = upstream(true, None);
    let plain = upstream(false, None);
    let lk = Latchkey::start_plain(&up, &plain, CRED, ENV);
    let cl_te = |host: &str, target: &str| {
        let smuggled = format!("0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n");
        format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{smuggled}",
            smuggled.len()
        )
    };
    // Upgrade requests latchkey does not honour (any protocol but WebSocket), and a
    // WebSocket handshake the upstream declines: answered without a switch, so the
    // next request is still followed — and its CL+TE caught.
    for upgrade in [
        "Connection: Upgrade\r\nUpgrade: foo\r\n",
        "Connection: Upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    ] {
        let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
        let resp = request(
            tls(s, "api.anthropic.com"),
            &format!(
                "GET /first HTTP/1.1\r\nHost: api.anthropic.com\r\n{upgrade}\r\n{}",
                cl_te("api.anthropic.com", "/second")
            ),
        );
        assert_eq!(status(&resp), 200, "{upgrade}: {resp}");
        let second = &resp[resp.find("\r\n\r\n").unwrap()..];
        assert!(second.contains("HTTP/1.1 400") && second.contains("smuggling"), "{upgrade}: {resp}");
    }
    // On the proxy port: a refused CONNECT does not switch either.
    let resp = exchange(
        lk.port,
        format!(
            "CONNECT 169.254.169.254:443 HTTP/1.1\r\nHost: 169.254.169.254:443\r\n\r\n{}",
            cl_te("api.example.com", "http://api.example.com/second")
        )
        .as_bytes(),
    );
    assert_eq!(status(&resp), 403, "{resp}");
    assert!(resp.contains("x-latchkey-error: smuggling"), "{resp}");
    let paths: Vec<String> =
        up.requests().iter().chain(plain.requests().iter()).map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/first", "/first", "/first"], "neither /second nor /smuggled went out");
}

/// `latchkey run` with at most `nofile` open files, as a small container might have.
fn start_with_fd_limit(up: &Upstream, body: &str, nofile: u32) -> Latchkey {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config_path = write_config(dir.path(), port, Some(up.addr), body);
    let stderr_path = dir.path().join("stderr.log");
    let child = Command::new("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg(bin())
        .args(["run", "--config"])
        .arg(&config_path)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir.path())
        .env("ANTHROPIC_API_KEY", SECRET)
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("prlimit (util-linux)");
    wait_until("latchkey", || TcpStream::connect(("127.0.0.1", port)).is_ok());
    Latchkey { port, dir, child, config_path, stderr_path }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// The h2 attack client: `connections` connections of `streams` unfinished uploads.
fn fan_out(lk: &Latchkey, connections: usize, streams: usize) -> std::process::Child {
    let args =
        [lk.port.to_string(), "api.anthropic.com".into(), connections.to_string(), streams.to_string()];
    let (child, line) = py_held("h2_fanout.py", &args);
    assert_eq!(line.trim(), "ready", "the h2 client failed");
    child
}

#[test]
fn one_h2_connection_cannot_fan_out_into_every_file_descriptor() {
    // An HTTP/1.1-only upstream: each h2 stream in flight needs a connection of its own.
    let up = upstream(true, None);
    let limits = "[proxy.limits]\nmax_upstream_connections = 128\n#END-PROXY\n";
    let lk = start_with_fd_limit(&up, &format!("{limits}{CRED}"), 1024);
    let pid = lk.child.id();
    let baseline = open_fds(pid);

    // One connection, 256 streams: at most max_upstream_per_connection (32) upstream.
    let mut one = fan_out(&lk, 1, 256);
    std::thread::sleep(Duration::from_millis(1500));
    let opened = up.connections.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!(
        "one client connection x 256 streams: {opened} upstream connections, {} descriptors",
        open_fds(pid)
    );
    assert!((8..=33).contains(&opened), "{opened} upstream connections for one client connection");

    // Eight more (2304 streams; 1024 descriptors): the total cap holds...
    let mut more = fan_out(&lk, 8, 256);
    std::thread::sleep(Duration::from_millis(1500));
    let fds = open_fds(pid);
    eprintln!("nine client connections x 256 streams: {fds} descriptors (baseline {baseline})");
    assert!(fds <= baseline + 128 + 9 + 8, "{fds} descriptors open (baseline {baseline})");
    // ...and everybody else is served meanwhile, intercepted and blind.
    let (code, body) = lk.curl(&["https://api.anthropic.com/v1/x"]);
    assert_eq!(code, 200, "{body}\n{}", lk.stderr());
    assert_eq!(echoed(&body, "x-api-key"), [SECRET]);
    let (code, body) = lk.curl(&["-k", "https://other.example.com/"]);
    assert_eq!(code, 200, "{body}");
    assert!(open_fds(pid) <= baseline + 128 + 9 + 8, "still within the caps");
    for child in [&mut one, &mut more] {
        drop(child.stdin.take());
        let _ = child.wait();
    }
}

/// Replace the config file the way editors and Kubernetes do (write aside, rename).
fn replace_config(lk: &Latchkey, up: &Upstream, plain: &Upstream, body: &str) {
    lk.replace_config(|dir| write_config2(dir, lk.port, Some(up.addr), Some(plain.addr), body));
}

/// A CONNECT as `user:token`, keep-alive.
fn tunnel_as(port: u16, target: &str, user: &str) -> TcpStream {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(user);
    let mut s = common::raw::connect(port);
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {auth}\r\n\r\n")
        .unwrap();
    let head = response(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

#[test]
fn a_reload_reaches_connections_already_open() {
    let up = upstream(true, None);
    let plain = upstream(false, None);
    let (log_cfg, log) = logging();
    let agents = |alice_credentials: &str, blocked: &str| {
        format!(
            "{log_cfg}[proxy.filters]\nblocked_domains = [{blocked}]\n#END-PROXY\n{CRED}\n[agents.bob]\ntoken = \"bob-token\"\n{alice_credentials}"
        )
    };
    let alice = "[agents.alice]\ntoken = \"alice-token\"\ncredentials = [\"anthropic\"]\n";
    let lk = Latchkey::start_plain(&up, &plain, &agents(alice, ""), ENV);
    // A keep-alive connection of hers on the proxy port (plain HTTP, absolute-form).
    use base64::Engine;
    let alice_auth = base64::engine::general_purpose::STANDARD.encode("alice:alice-token");
    let plain_get = format!(
        "GET http://api.example.com/p HTTP/1.1\r\nHost: api.example.com\r\nProxy-Authorization: Basic {alice_auth}\r\n\r\n"
    );
    let mut p = common::raw::connect(lk.port);
    p.write_all(plain_get.as_bytes()).unwrap();
    assert_eq!(status(&response(&mut p)), 200);
    // Alice's keep-alive tunnel gets the credential.
    let mut s = tls(tunnel_as(lk.port, "api.anthropic.com:443", "alice:alice-token"), "api.anthropic.com");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n");
    s.write_all(get("/one").as_bytes()).unwrap();
    assert_eq!(status(&response(&mut s)), 200);
    assert_eq!(up.requests()[0].header_all("x-api-key"), [SECRET]);
    // A blind tunnel of hers stays open across the reload, mid-sniff.
    let mut blind = tunnel_as(lk.port, "other.example.com:443", "alice:alice-token");

    // The reload takes the credential from alice and blocks other.example.com.
    let narrowed = "[agents.alice]\ntoken = \"alice-token\"\ncredentials = []\n";
    replace_config(&lk, &up, &plain, &agents(narrowed, "\"other.example.com\""));
    wait_until("the reload", || lk.stderr().contains("reloaded"));
    s.write_all(get("/two").as_bytes()).unwrap();
    let resp = response(&mut s);
    assert_eq!(status(&resp), 403, "the next request on the open tunnel: {resp}");
    assert!(resp.contains("agent-credential"), "{resp}");
    assert_eq!(up.count(), 1, "nothing more went out with the removed credential");
    blind.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(matches!(blind.read(&mut [0u8; 16]), Ok(0)), "the blind tunnel was cut");
    log_until(&log, "the cut tunnel's line and the refused request's", |l| {
        l.iter().any(|v| v["reason"].as_str().is_some_and(|r| r.contains("cut by a reload")))
            && l.iter().any(|v| v["status"] == 403 && v["path"] == "/two")
    });

    // Removing alice altogether: her open tunnel's next request is not hers any more.
    replace_config(&lk, &up, &plain, &agents("", "\"other.example.com\""));
    wait_until("the second reload", || lk.stderr().matches("reloaded").count() >= 2);
    s.write_all(get("/three").as_bytes()).unwrap();
    assert_latchkeys(&response(&mut s), 407, "a removed agent's open tunnel");
    p.write_all(plain_get.as_bytes()).unwrap();
    assert_latchkeys(&response(&mut p), 407, "a removed agent's keep-alive connection");
    assert_eq!((up.count(), plain.count()), (1, 1));
}

/// One keep-alive request on an open stream: its status (the body read by Content-Length).
fn keep_alive_get<S: Read + Write>(s: &mut S, host: &str) -> u16 {
    write!(s, "GET /v1/x HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        let n = s.read(&mut b).unwrap_or(0);
        if n == 0 {
            return 0;
        }
        got.extend_from_slice(&b[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if body.len() >= len {
                return status(head);
            }
        }
    }
}

#[test]
fn descriptors_at_the_limit_back_off_keep_open_connections_and_recover() {
    let up = upstream(true, None);
    let lk = start_with_fd_limit(&up, CRED, 64);
    // A client with an open, intercepted keep-alive connection.
    let (stream, head) = tunnel(lk.port, "api.anthropic.com:443");
    assert_eq!(status(&head), 200, "{head}");
    let mut open = tls(stream, "api.anthropic.com");
    assert_eq!(keep_alive_get(&mut open, "api.anthropic.com"), 200);
    // Others take every descriptor latchkey has left: accept fails (EMFILE).
    let hogs: Vec<TcpStream> =
        (0..100).filter_map(|_| TcpStream::connect(("127.0.0.1", lk.port)).ok()).collect();
    wait_until("accept to fail", || lk.stderr().contains("accept failed"));
    std::thread::sleep(Duration::from_millis(500));
    // The open connection goes on being served meanwhile.
    assert_eq!(keep_alive_get(&mut open, "api.anthropic.com"), 200, "{}", lk.stderr());
    // Backing off, not spinning: one warning per episode, not one per failed accept, and
    // well under a core of CPU while the pending connections cannot be accepted (a
    // spinning accept loop takes a whole core; the bound is loose for a loaded machine).
    let warnings = lk.stderr().matches("accept failed").count();
    assert!(warnings <= 2, "{warnings} accept warnings");
    let before = cpu_ticks(lk.child.id());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(lk.child.id()) - before;
    assert!(used < 60, "{used} ticks of CPU in 2 s at EMFILE: the accept loop spins");
    // Descriptors free again: new clients are served.
    drop(hogs);
    let mut served = false;
    for _ in 0..50 {
        if lk.curl(&["https://api.anthropic.com/v1/x"]).0 == 200 {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(served, "recovered after descriptors were freed: {}", lk.stderr());
}

/// utime + stime of a process, in clock ticks (100 per second).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

/// `latchkey_parked_connections` from the admin listener's `/metrics` (the admin token
/// is created beside the config).
fn parked(lk: &Latchkey, admin: u16) -> u64 {
    let token = std::fs::read_to_string(lk.config_path.parent().unwrap().join("admin.token")).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-H", &format!("authorization: Bearer {}", token.trim())])
        .arg(format!("http://127.0.0.1:{admin}/metrics"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("latchkey_parked_connections "))
        .unwrap_or_else(|| panic!("no parked-connections gauge in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Issue 20: an idle HTTP/1.1 keep-alive connection in an intercepted tunnel gives its
/// HTTP buffers back (parked) and is served as before when the client sends again —
/// the credential injected, the smuggling guard still on — while a request still in
/// flight (a slow upstream) is never parked under it.
#[test]
fn a_resting_keep_alive_connection_is_parked_and_served_again() {
    let up = upstream(true, None);
    let admin = free_port();
    let lk = Latchkey::start(Some(&up), &format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n{CRED}"), ENV);
    let mut s = tls(tunnel(lk.port, "api.anthropic.com:443").0, "api.anthropic.com");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n");
    s.write_all(get("/one").as_bytes()).unwrap();
    assert_eq!(status(&response(&mut s)), 200);

    // A response that takes 4 s: the connection waits for it, it does not rest.
    s.write_all(get("/slow").as_bytes()).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(parked(&lk, admin), 0, "parked while its request was in flight");
    let slow = response(&mut s);
    assert_eq!(status(&slow), 200, "{slow}");

    wait_until("the idle connection to be parked", || parked(&lk, admin) == 1);
    s.write_all(get("/two").as_bytes()).unwrap();
    assert_eq!(status(&response(&mut s)), 200, "a parked connection's next request");
    assert_eq!(parked(&lk, admin), 0);
    let seen = up.requests();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|r| r.header_all("x-api-key") == [SECRET]));

    // Parked again, then a smuggling attempt: the guard follows the stream across parks.
    wait_until("the connection to be parked again", || parked(&lk, admin) == 1);
    s.write_all(
        b"POST /three HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .unwrap();
    assert_latchkeys(&response(&mut s), 400, "CL+TE on a connection that was parked");
    assert_eq!(up.count(), 3, "nothing of the smuggling attempt went upstream");
}

/// A parked connection keeps the idle limit hyper would have applied: it is closed
/// after `idle_timeout`, not held for ever.
#[test]
fn a_parked_connection_is_closed_after_the_idle_timeout() {
    let up = upstream(true, None);
    let admin = free_port();
    let body = format!("[proxy.limits]\nidle_timeout = 3\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n{CRED}");
    let lk = Latchkey::start(Some(&up), &body, ENV);
    let mut s = tls(tunnel(lk.port, "api.anthropic.com:443").0, "api.anthropic.com");
    s.write_all(b"GET / HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n").unwrap();
    assert_eq!(status(&response(&mut s)), 200);
    wait_until("the idle connection to be parked", || parked(&lk, admin) == 1);
    let started = Instant::now();
    s.get_mut().set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut b = [0u8; 64];
    let end = s.read(&mut b);
    let timed_out = matches!(&end, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
    assert!(!timed_out && !matches!(end, Ok(n) if n > 0), "the parked connection was not closed: {end:?}");
    assert!(started.elapsed() < Duration::from_secs(15), "closed only after {:?}", started.elapsed());
    wait_until("the gauge to drop", || parked(&lk, admin) == 0);
}

#[test]
fn requests_past_the_upstream_cap_take_turns_instead_of_being_refused() {
    // Four upstream connections in all (one kept for a client's first), eight client
    // connections asking at once: requests that find every connection busy must wait
    // for one to come free, not for a permit only a closed connection gives back.
    let up = upstream(true, None);
    let limits = "connect_timeout = 2\n[proxy.limits]\nmax_upstream_connections = 4\n#END-PROXY\n";
    let lk = Latchkey::start(Some(&up), &format!("{limits}{CRED}"), ENV);
    let url = "https://api.anthropic.com/source?bytes=300000";
    let codes: Vec<String> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let out = Command::new("curl")
                        .args(["-sS", "--max-time", "30", "-w", "%{http_code}\n"])
                        .args(["-x", &lk.proxy_url(), "--cacert"])
                        .arg(lk.bundle())
                        .args([["-o", "/dev/null", url]; 6].concat())
                        .output()
                        .unwrap();
                    String::from_utf8_lossy(&out.stdout).into_owned()
                })
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().unwrap().lines().map(String::from).collect::<Vec<_>>())
            .collect()
    });
    let (opened, peak) = (up.connections.load(std::sync::atomic::Ordering::SeqCst), up.open.peak());
    eprintln!("48 requests from 8 client connections: {opened} upstream connections, {peak} at once");
    assert_eq!(codes.len(), 48, "{codes:?}\n{}", lk.stderr());
    assert!(codes.iter().all(|c| c == "200"), "{codes:?}");
    assert!(peak <= 4, "{peak} upstream connections open at once past a cap of 4");
}

/// latchkey on two shards (whatever the machine's cores) with two upstream connections
/// in all — one general, one kept for a client's first: the smallest cap, for the tests
/// of requests queued on one shard and connections freed on another.
fn two_shards_two_connections(connect_timeout: u64) -> (Upstream, Latchkey) {
    let up = upstream(true, None);
    let limits = format!(
        "connect_timeout = {connect_timeout}\nthreads = 2\n[proxy.limits]\nmax_upstream_connections = 2\n#END-PROXY\n"
    );
    let lk = Latchkey::start(Some(&up), &format!("{limits}{CRED}"), ENV);
    (up, lk)
}

/// A connection held open on latchkey's proxy port, placed on a shard by the time this
/// returns: it steers where the next connection goes.
fn hold_open(lk: &Latchkey) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", lk.port)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    s
}

#[test]
fn a_connection_freed_on_one_shard_goes_to_a_request_waiting_on_another() {
    // Each shard (`proxy::shards`) pools and queues its own connections; the cap is the
    // process's. Two upstream connections in all (the least: one general, one kept for
    // a client's first), both held by slow requests on the second shard; the next
    // client is kept on the first and waits. When a slow answer ends, the waiting
    // request gets that connection, rather than waiting out `connect_timeout` (8 s)
    // while it sits idle in the other shard's pool. Connections held open steer the
    // placement (a new one stays on the first shard unless another has two fewer):
    // [1, 0], [2, 0], slow [2, 1], [3, 1], slow [3, 2], next on the first. Two shards
    // whatever the machine's cores (`threads`): the placements above count on two.
    let (up, lk) = two_shards_two_connections(8);
    let hold = || hold_open(&lk);
    let get = |path: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["-x", &lk.proxy_url(), "--cacert"])
            .arg(lk.bundle())
            .arg(format!("https://api.anthropic.com{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let started = Instant::now();
    let codes: Vec<String> = std::thread::scope(|s| {
        let _held = [hold(), hold()];
        let first = s.spawn(|| get("/slow"));
        wait_until("the first slow request upstream", || up.count() == 1);
        let _third = hold();
        let second = s.spawn(|| get("/slow"));
        wait_until("the second slow request upstream", || up.count() == 2);
        let next = s.spawn(|| get("/next"));
        [first, second, next].map(|t| t.join().unwrap()).into()
    });
    assert_eq!(codes, ["200"; 3], "{}", lk.stderr());
    assert!(started.elapsed() < Duration::from_secs(7), "served only after {:?}", started.elapsed());
    assert_eq!(up.connections.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[test]
fn a_request_waiting_on_one_shard_is_not_passed_over_by_another_shard_s_queue() {
    // Two upstream connections in all, both dialled by the second shard's three busy
    // clients, whose queue is never empty: each connection a response frees finds one
    // of them waiting. A request on the first shard queues meanwhile. It must get the
    // next connection once it has waited longest, not wait out `connect_timeout` (3 s)
    // behind a queue that keeps refilling: served shard by shard, 10,000 clients over
    // 1,024 connections saw 503s. Placement as in the test above: held connections
    // [1, 0], [2, 0], busy [2, 1], [3, 1], busy [3, 2], [4, 2], busy [4, 3], then the
    // waiting request on the first.
    let (_up, lk) = two_shards_two_connections(3);
    let hold = || hold_open(&lk);
    let curl = |urls: &[String]| {
        let mut c = Command::new("curl");
        c.args(["-sS", "--max-time", "30", "-w", "%{http_code}\n", "-x", &lk.proxy_url(), "--cacert"]);
        c.arg(lk.bundle());
        for url in urls {
            c.args(["-o", "/dev/null", url]);
        }
        let out = c.output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let busy: Vec<String> = vec!["https://api.anthropic.com/pause?ms=300".into(); 12];
    let (waited, code, busy_codes) = std::thread::scope(|s| {
        let mut held = vec![hold(), hold()];
        let mut clients = Vec::new();
        for n in 1..=3 {
            if n > 1 {
                held.push(hold());
            }
            clients.push(s.spawn(|| curl(&busy)));
            std::thread::sleep(Duration::from_millis(300));
        }
        let started = Instant::now();
        let code = curl(&["https://api.anthropic.com/next".into()]);
        let waited = started.elapsed();
        let busy_codes: String = clients.into_iter().map(|c| c.join().unwrap()).collect();
        (waited, code, busy_codes)
    });
    assert_eq!(code.trim(), "200", "after {waited:?}\n{}", lk.stderr());
    assert!(waited < Duration::from_millis(2500), "served only after {waited:?}");
    assert!(busy_codes.lines().all(|c| c == "200"), "{busy_codes}");
}

#[test]
fn a_client_that_half_closes_still_gets_its_answer() {
    // latchkey does not read a connection while its request is answered (hyper's check
    // for a client gone held a second 8-16 KiB read buffer per busy connection): a
    // client that shuts its sending side after its request, as HTTP/1.1 allows, still
    // gets the answer. `/slow` answers after 4 s, so the shutdown arrives mid-request.
    let up = upstream(true, None);
    let lk = Latchkey::start(Some(&up), CRED, ENV);
    let (s, head) = tunnel(lk.port, "api.anthropic.com:443");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut t = tls(s, "api.anthropic.com");
    t.write_all(b"GET /slow HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n").unwrap();
    t.flush().unwrap();
    t.conn.send_close_notify();
    while t.conn.wants_write() {
        t.conn.write_tls(&mut t.sock).unwrap();
    }
    t.sock.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    let _ = t.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "no answer after the client's half-close: {text:?}");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    assert_eq!(echoed(body, "x-api-key"), [SECRET], "{text}");
}

#[test]
fn intercepted_clients_get_aes_128_gcm_whatever_their_own_order() {
    // The client below lists TLS13_AES_256_GCM_SHA384 first (aws-lc-rs' default order,
    // as OpenSSL's); latchkey picks AES-128-GCM-SHA256, whose handshake hashes with
    // SHA-256 (hardware on most CPUs) and whose blocks take ten rounds, not fourteen.
    let client_first = rustls::crypto::aws_lc_rs::default_provider().cipher_suites[0].suite();
    assert_eq!(client_first, rustls::CipherSuite::TLS13_AES_256_GCM_SHA384, "the client must prefer AES-256");
    let up = upstream(true, None);
    let lk = Latchkey::start(Some(&up), CRED, ENV);
    let (s, head) = tunnel(lk.port, "api.anthropic.com:443");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut t = tls(s, "api.anthropic.com");
    let text = request(&mut t, "GET / HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let suite = t.conn.negotiated_cipher_suite().map(|s| s.suite());
    assert_eq!(suite, Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
}

/// One response read off a keep-alive connection, framed as a client frames it: by
/// `Content-Length`, by chunks, or with no body after a HEAD. The head and the body.
fn framed_response<S: Read>(s: &mut S, head_request: bool) -> (String, Vec<u8>) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "the connection ended inside a head: {head:?}");
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_ascii_lowercase())
        })
    };
    let mut body = Vec::new();
    if head_request {
        return (head, body);
    }
    if header("transfer-encoding").as_deref() == Some("chunked") {
        loop {
            let mut line = Vec::new();
            while !line.ends_with(b"\r\n") {
                assert_eq!(s.read(&mut b).unwrap(), 1, "the connection ended inside a chunk size");
                line.push(b[0]);
            }
            let size = usize::from_str_radix(std::str::from_utf8(&line).unwrap().trim(), 16).unwrap();
            let mut chunk = vec![0u8; size + 2];
            s.read_exact(&mut chunk).unwrap();
            assert!(chunk.ends_with(b"\r\n"), "a chunk ends with CRLF");
            if size == 0 {
                return (head, body);
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
    let length: usize = header("content-length").map_or(0, |v| v.parse().unwrap());
    body.resize(length, 0);
    s.read_exact(&mut body).unwrap();
    (head, body)
}

#[test]
fn one_keep_alive_connection_serves_bodies_pipelines_heads_and_hyper_in_turn() {
    // latchkey's own HTTP/1.1 server (src/proxy/h1) takes requests without a body or
    // with a Content-Length one, and gives a connection to hyper from a request it does
    // not take (a chunked upload here). Every answer must be framed so that the next one
    // on the same connection reads right, whichever server wrote it.
    let up = upstream(true, None);
    let admin = free_port();
    let body =
        format!("redact_responses = true\n#END-PROXY\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n{CRED}");
    let lk = Latchkey::start(Some(&up), &body, ENV);
    let mut s = tls(tunnel(lk.port, "api.anthropic.com:443").0, "api.anthropic.com");
    let host = "Host: api.anthropic.com\r\n";

    // A body, and a request pipelined right behind it in the same write.
    s.write_all(
        format!("POST /a HTTP/1.1\r\n{host}Content-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\n{host}\r\n")
            .as_bytes(),
    )
    .unwrap();
    let (a, a_body) = framed_response(&mut s, false);
    assert!(a.starts_with("HTTP/1.1 200 OK\r\n") && a.contains("\r\ndate: "), "{a}");
    assert_eq!(json(&String::from_utf8_lossy(&a_body))["body"], "hello");
    let (b, _) = framed_response(&mut s, false);
    assert!(b.starts_with("HTTP/1.1 200"), "the pipelined request: {b}");

    // A chunked upload goes to hyper; the connection goes on.
    s.write_all(
        format!("POST /c HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let (c, c_body) = framed_response(&mut s, false);
    assert!(c.starts_with("HTTP/1.1 200"), "{c}");
    assert_eq!(json(&String::from_utf8_lossy(&c_body))["body"], "abc");

    // Back with the own server once hyper lets go of the resting connection.
    wait_until("hyper to let go of the resting connection", || parked(&lk, admin) == 1);
    s.write_all(format!("HEAD /d HTTP/1.1\r\n{host}\r\n").as_bytes()).unwrap();
    let (d, _) = framed_response(&mut s, true);
    let length = d.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap_or("0");
    assert!(d.starts_with("HTTP/1.1 200") && length != "0", "a HEAD keeps the GET's length: {d}");
    // A body of unknown length is chunked: the upstream's reflected key comes back masked.
    s.write_all(format!("GET /reflect/x HTTP/1.1\r\n{host}\r\n").as_bytes()).unwrap();
    let (e, e_body) = framed_response(&mut s, false);
    assert!(e.contains("transfer-encoding: chunked"), "{e}");
    let e_body = String::from_utf8(e_body).unwrap();
    assert!(e_body.starts_with("you sent ") && !e_body.contains(SECRET), "{e_body}");

    // A client that asks to close is answered so, and the connection ends.
    s.write_all(format!("GET /f HTTP/1.1\r\n{host}Connection: close\r\n\r\n").as_bytes()).unwrap();
    let (f, _) = framed_response(&mut s, false);
    assert!(f.starts_with("HTTP/1.1 200") && f.contains("connection: close"), "{f}");
    let mut rest = Vec::new();
    s.get_mut().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let end = s.read_to_end(&mut rest);
    assert!(end.is_ok() && rest.is_empty(), "closed after the last answer: {end:?} {rest:?}");

    let seen = up.requests();
    let paths: Vec<&str> = seen.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/a", "/b", "/c", "/d", "/f"]);
    assert!(seen.iter().all(|r| r.header_all("x-api-key") == [SECRET]), "every request got the key");
}

/// The proxy port's accept queue holds 4,096 connections (or the kernel's cap): its
/// accept loop shares a thread with connections it serves (`proxy::shards`), and a
/// burst of clients must wait in the queue, not have their SYNs dropped and retried a
/// second later (`bench/scale.py`: with tokio's default of 128, 100 of 10,000
/// clients connecting at once timed out).
#[test]
fn the_proxy_port_queues_a_burst_of_connections() {
    let lk = Latchkey::start(None, CRED, ENV);
    let out = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", lk.port)])
        .output()
        .expect("ss (iproute2) is needed for this test");
    let text = String::from_utf8_lossy(&out.stdout);
    // A listening socket's Send-Q is the size of its accept queue.
    let queue: u32 = text.split_whitespace().nth(2).and_then(|n| n.parse().ok()).unwrap_or(0);
    let cap: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse().unwrap();
    assert_eq!(queue, 4096.min(cap), "ss: {text}");
}

/// `[proxy] threads` sets how many shards serve connections, whatever the machine's
/// core count (CI has two): three threads named `latchkey-shard-*`, then one, each
/// serving an intercepted request, and the start-up line says how many.
#[test]
fn proxy_threads_sets_the_number_of_serving_threads() {
    let up = upstream(true, None);
    for n in [3, 1] {
        let lk = Latchkey::start(Some(&up), &format!("threads = {n}\n#END-PROXY\n{CRED}"), ENV);
        let (code, body) = lk.curl(&["https://api.anthropic.com/v1/x"]);
        assert_eq!(code, 200, "{body}");
        let tasks = std::fs::read_dir(format!("/proc/{}/task", lk.child.id())).unwrap();
        let names: Vec<String> =
            tasks.flatten().filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok()).collect();
        let shards = names.iter().filter(|n| n.starts_with("latchkey-shard")).count();
        assert_eq!(shards, n, "threads: {names:?}");
        let said = format!("; {n} thread{})", if n == 1 { "" } else { "s" });
        assert!(lk.stderr().contains(&said), "the start-up line says how many: {}", lk.stderr());
    }
}

/// How long an HTTP/2 connection lasts once nothing happens on it: the instant the
/// connection ended, as hyper's client saw it (`None` if it had not within 20 s).
async fn h2_end(
    conn: impl std::future::Future<Output = hyper::Result<()>>,
    from: Instant,
) -> Option<Duration> {
    let _ = tokio::time::timeout(Duration::from_secs(20), conn).await.ok()?;
    Some(from.elapsed())
}

#[test]
fn an_http2_client_that_never_sends_its_preface_is_let_go_after_the_header_read_timeout() {
    // TLS done, ALPN h2, then silence: hyper's and h2's server handshakes wait for the
    // client's preface without a deadline, so such a tunnel held its connection slot
    // (and a 4 KiB TLS buffer) for ever.
    let up = upstream(true, None);
    let lk = Latchkey::start(Some(&up), &format!("[proxy.limits]\nheader_read_timeout = 2\n{CRED}"), ENV);
    let lasted = runtime().block_on(async {
        use tokio::io::AsyncReadExt;
        let mut tls = h2::tunnel(lk.port, "api.anthropic.com:443", "api.anthropic.com").await;
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        let read_to_end = async {
            // latchkey's own SETTINGS come first; then the end.
            while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
        };
        tokio::time::timeout(Duration::from_secs(20), read_to_end).await.ok().map(|_| started.elapsed())
    });
    let lasted = lasted.expect("a silent HTTP/2 connection was still open after 20 s");
    assert!(lasted < Duration::from_secs(10), "closed only after {lasted:?}");
}

#[test]
fn an_idle_http2_connection_is_closed_after_the_idle_timeout_but_not_while_a_stream_is_open() {
    // An HTTP/1.1 connection waiting for its next request is closed after `idle_timeout`;
    // an HTTP/2 one with no stream open was kept for as long as its client answered
    // PINGs, each holding a slot under `max_connections`. A request in flight longer
    // than the timeout (the upstream's `/slow` answers after 4 s) keeps it open.
    let up = upstream(true, None);
    let lk = Latchkey::start(Some(&up), &format!("[proxy.limits]\nidle_timeout = 2\n{CRED}"), ENV);
    let (status, answered, lasted) = runtime().block_on(async {
        let tls = h2::tunnel(lk.port, "api.anthropic.com:443", "api.anthropic.com").await;
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        let started = Instant::now();
        let end = tokio::spawn(h2_end(conn, started));
        let resp = sender.send_request(h2::get("api.anthropic.com", "/slow", &[])).await.unwrap();
        let status = resp.status().as_u16();
        http_body_util::BodyExt::collect(resp.into_body()).await.unwrap();
        (status, started.elapsed(), end.await.unwrap())
    });
    assert_eq!(status, 200, "the slow request was answered on its connection");
    assert!(answered >= Duration::from_secs(4), "answered after {answered:?}");
    let lasted = lasted.unwrap_or_else(|| {
        panic!("an idle HTTP/2 connection was still open 20 s after it started\n{}", lk.stderr())
    });
    let idle = lasted.saturating_sub(answered);
    eprintln!("answered after {answered:?}, closed {idle:?} after that");
    assert!(idle >= Duration::from_secs(1), "closed {idle:?} after its last answer: too soon");
    assert!(idle < Duration::from_secs(10), "closed only {idle:?} after its last answer");
}

#[test]
fn a_client_that_stops_reading_its_answer_is_let_go_after_the_idle_timeout() {
    // A 50 MB download, read for 64 KiB and then not at all: latchkey's writes wait on
    // the client, and the upstream connection streaming the body waits with them. Had
    // nothing timed that wait, a client could hold upstream connections for as long as
    // it kept its own open; now it gets `idle_timeout` without taking a byte.
    const TOTAL: usize = 50_000_000;
    let up = upstream(true, None);
    let lk = Latchkey::start(Some(&up), &format!("[proxy.limits]\nidle_timeout = 2\n{CRED}"), ENV);
    let mut s = tls(tunnel(lk.port, "api.anthropic.com:443").0, "api.anthropic.com");
    write!(s, "GET /source?bytes={TOTAL} HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n").unwrap();
    let mut got = vec![0u8; 64 * 1024];
    s.read_exact(&mut got).unwrap();
    assert_eq!(up.open.now(), 1, "the body streams from one upstream connection");
    std::thread::sleep(Duration::from_secs(6));
    let let_go = up.open.now() == 0;
    // Reading again: what was in the buffers, then the end (or, before, the whole body).
    s.get_mut().set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let read = got.len() + rest.len();
    assert!(read < TOTAL, "the stalled client was never let go: it read all {read} bytes afterwards");
    assert!(let_go, "the upstream connection was still open 6 s into the stall");
}

#[test]
fn a_client_that_stops_reading_plain_http_or_a_blind_tunnel_is_let_go_too() {
    // The same stall where latchkey does not decrypt: a plain-HTTP request on the proxy
    // port (hyper serves it there) and a blind tunnel (TLS to the upstream itself). Both
    // held their upstream connection for as long as the client kept its own open.
    const TOTAL: usize = 50_000_000;
    let up = upstream(true, None);
    let plain = upstream(false, None);
    let lk = Latchkey::start_plain(&up, &plain, &format!("[proxy.limits]\nidle_timeout = 2\n{CRED}"), ENV);
    let mut direct = TcpStream::connect(("127.0.0.1", lk.port)).unwrap();
    write!(
        direct,
        "GET http://other.example.com/source?bytes={TOTAL} HTTP/1.1\r\nHost: other.example.com\r\n\r\n"
    )
    .unwrap();
    let mut blind = tls(tunnel(lk.port, "other.example.com:443").0, "other.example.com");
    write!(blind, "GET /source?bytes={TOTAL} HTTP/1.1\r\nHost: other.example.com\r\n\r\n").unwrap();
    let mut got = vec![0u8; 64 * 1024];
    direct.read_exact(&mut got).unwrap();
    blind.read_exact(&mut got).unwrap();
    assert_eq!((plain.open.now(), up.open.now()), (1, 1), "each body streams from one upstream connection");
    std::thread::sleep(Duration::from_secs(6));
    let held = (plain.open.now(), up.open.now());
    let rest = |s: &mut dyn Read| {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        got.len() + rest.len()
    };
    direct.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    blind.get_mut().set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let read = (rest(&mut direct), rest(&mut blind));
    assert!(
        read.0 < TOTAL && read.1 < TOTAL,
        "never let go: read (plain, blind) {read:?} of {TOTAL} afterwards"
    );
    assert_eq!(held, (0, 0), "upstream connections (plain, blind) still open 6 s into the stall");
}

#[test]
fn a_blind_tunnel_whose_upstream_stops_reading_is_let_go() {
    // The other way round: the upstream (a server that accepts and then reads nothing)
    // takes none of what the client sends. latchkey's writes to it wait, and before they
    // were timed the tunnel stayed for `tunnel_timeout` (4 h by default).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let deaf = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(30));
        drop(held);
    });
    let (log_cfg, log) = logging();
    let limits = "[proxy.limits]\nidle_timeout = 2\n";
    let cfg = format!("{log_cfg}{limits}#END-PROXY\n\"deaf.example.com:7000\" = \"{deaf}\"\n{CRED}");
    let up = upstream(true, None);
    let lk = Latchkey::start(Some(&up), &cfg, ENV);
    let (mut s, head) = tunnel(lk.port, "deaf.example.com:7000");
    assert!(head.starts_with("HTTP/1.1 200"), "a blind tunnel: {head}");
    // Not HTTP, not TLS: spliced. 64 MB fills every buffer on the way and then waits.
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    assert_let_go_while_writing(&mut s, &vec![0u8; 1 << 20], 64, "the tunnel");
    let why = "the upstream took no byte for 2s (idle_timeout)";
    log_until(&log, "the tunnel's line, saying why", |l| l.iter().any(|v| v.to_string().contains(why)));
}

#[test]
fn an_http2_client_that_never_opens_its_window_again_is_let_go_after_the_idle_timeout() {
    // HTTP/2's own way of not reading: the client's connection task reads every frame,
    // but the client releases none of the stream's window, so latchkey's answer waits
    // on flow control (no socket write ever waits). The upstream here speaks HTTP/1.1:
    // the stream held a whole upstream connection for as long as the client liked.
    const TOTAL: usize = 50_000_000;
    let up = upstream(true, None);
    let lk = Latchkey::start(Some(&up), &format!("[proxy.limits]\nidle_timeout = 2\n{CRED}"), ENV);
    let (held, read) = runtime().block_on(async {
        let mut client = h2::connect_h2(lk.port, "api.anthropic.com:443", "api.anthropic.com").await;
        let req =
            http::Request::get(format!("https://api.anthropic.com/source?bytes={TOTAL}")).body(()).unwrap();
        let (answer, _) = client.send_request(req, true).unwrap();
        let answer = answer.await.expect("the answer's head");
        assert_eq!(answer.status(), 200);
        assert_eq!(up.open.now(), 1, "the body streams from one upstream connection");
        // The first window's worth arrives; none of it is released.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let held = up.open.now();
        let mut body = answer.into_body();
        let mut read = 0;
        while let Ok(Some(Ok(data))) = tokio::time::timeout(Duration::from_secs(10), body.data()).await {
            read += data.len();
            let _ = body.flow_control().release_capacity(data.len());
        }
        (held, read)
    });
    assert!(read < TOTAL, "the stalled stream was never let go: {read} bytes read afterwards");
    assert_eq!(held, 0, "the upstream connection was still open 6 s into the stall");
}
