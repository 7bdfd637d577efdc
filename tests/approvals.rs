//! Approvals and the admin listener's security (SPEC 10), through the real binary with
//! real clients: curl held on an unlisted host until `latchkey approvals`, the admin
//! API or a webhook answers; `ask_timeout`; `always` across a restart; `warn` and
//! `allowlist suggest`; and the attacks on the admin listener (no token, wrong token,
//! token in a query string, cross-origin and forged-Origin changes, the admin port
//! through the proxy, a live-view watcher that stops reading).

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Output;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Every host intercepted, so curl (trusting latchkey's CA) reaches the test upstream
/// (whose CA latchkey trusts) whether or not a credential applies.
const ASK: &str = "intercept = \"all\"\n#END-PROXY\n[proxy.filters]\nallowlist_only = true\non_unlisted = \"ask\"\nallowed_domains = [\"api.github.com\"]\n";

struct Admin {
    lk: Latchkey,
    port: u16,
}

impl Admin {
    fn start(up: &Upstream, body: &str) -> Admin {
        Self::start_with(Some(up), None, body)
    }

    fn start_with(up: Option<&Upstream>, plain: Option<&Upstream>, body: &str) -> Admin {
        let port = free_port();
        let body = format!("{body}\n[admin]\nlisten = \"127.0.0.1:{port}\"\n");
        let lk = match (up, plain) {
            (Some(up), Some(plain)) => Latchkey::start_plain(up, plain, &body, &[]),
            (up, _) => Latchkey::start(up, &body, &[]),
        };
        wait_until("the admin port", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        Admin { lk, port }
    }

    fn token(&self) -> String {
        let path = self.lk.dir.path().join("admin.token");
        wait_until("the admin token", || path.exists());
        std::fs::read_to_string(path).unwrap().trim().to_string()
    }

    /// One raw request to the admin listener; (status, head, body).
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String, String) {
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n", self.port);
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        let resp = raw::exchange(self.port, req.as_bytes());
        let status = resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        (status, head.to_string(), body.to_string())
    }

    fn get(&self, path: &str) -> (u16, String) {
        let bearer = format!("Bearer {}", self.token());
        let (s, _, b) = self.request("GET", path, &[("Authorization", &bearer)], "");
        (s, b)
    }

    fn pending(&self) -> Vec<serde_json::Value> {
        let (status, body) = self.get("/api/approvals");
        assert_eq!(status, 200, "{body}");
        json(&body).as_array().unwrap().clone()
    }

    /// Wait until `n` connections wait on one pending approval; its id.
    fn wait_pending(&self, host: &str, n: u64) -> String {
        let mut id = String::new();
        wait_until(&format!("{n} waiting on {host}"), || {
            let found =
                self.pending().into_iter().find(|p| p["host"] == host && p["waiting"].as_u64() == Some(n));
            found.map(|p| id = p["id"].as_str().unwrap().to_string()).is_some()
        });
        id
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.lk.cli(args, &[])
    }
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// curl through the proxy in the background (it is held).
fn curl_bg(lk: &Latchkey, url: &str) -> JoinHandle<(u16, String)> {
    let (proxy, bundle, url) = (lk.proxy_url(), lk.bundle(), url.to_string());
    std::thread::spawn(move || {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}", "-x", &proxy, "--cacert"])
            .arg(bundle)
            .arg(&url)
            .output()
            .unwrap();
        parse_curl(out)
    })
}

#[test]
fn cli_allow_releases_every_held_connect_for_the_host_and_nothing_went_up_before() {
    let up = upstream(true, None);
    let a = Admin::start(&up, ASK);
    let first = curl_bg(&a.lk, "https://api.example.com/one");
    let second = curl_bg(&a.lk, "https://api.example.com/two");
    let id = a.wait_pending("api.example.com", 2);
    assert_eq!(a.pending().len(), 1, "one host, one pending approval");
    assert_eq!(up.count(), 0, "nothing reached the upstream while held");
    let listed = a.cli(&["approvals", "list"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains(&id) && text.contains("api.example.com:443"), "{text}");
    let out = a.cli(&["approvals", "allow", &id, "--scope", "once"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for held in [first, second] {
        let (code, body) = held.join().unwrap();
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(up.count(), 2);
    // `once` does not stand: the next connection asks again.
    let third = curl_bg(&a.lk, "https://api.example.com/three");
    let id3 = a.wait_pending("api.example.com", 1);
    assert_ne!(id3, id);
    let out = a.cli(&["approvals", "deny", &id3]);
    assert!(out.status.success());
    let (code, body) = third.join().unwrap();
    assert_ne!(code, 200, "{body}");
    // A listed host is never asked about.
    let (code, _) = a.lk.curl(&["https://api.github.com/"]);
    assert_eq!(code, 200);
}

#[test]
fn a_denied_or_unanswered_request_gets_the_relayable_refusal() {
    let up = upstream(true, None);
    let plain = upstream(false, None);
    let a = Admin::start_with(Some(&up), Some(&plain), &format!("{ASK}ask_timeout = 1\n"));
    // Plain HTTP: the request itself is held, then refused with a body for the model.
    let started = Instant::now();
    let (code, body) = a.lk.curl(&["-i", "http://api.example.com/v1/x?q=1"]);
    assert_eq!(code, 403, "{body}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(body.to_ascii_lowercase().contains("x-latchkey-error: not-approved"), "{body}");
    assert!(
        body.contains("latchkey: api.example.com is not allowed by the user's egress policy (no answer in 1 s); ask the user to allow it with latchkey approvals or the web view"),
        "{body}"
    );
    // CONNECT: denied by a person, refused before any TLS.
    let port = a.lk.port;
    let held = std::thread::spawn(move || raw::tunnel(port, "other.example.com:443").1);
    let id = a.wait_pending("other.example.com", 1);
    let out = a.cli(&["approvals", "deny", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let head = held.join().unwrap();
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(head.contains("(denied); ask the user to allow it"), "{head}");
    assert_eq!(up.count() + plain.count(), 0, "nothing went upstream");
    assert!(a.pending().is_empty());
}

#[test]
fn always_is_written_0600_and_survives_a_restart_deny_always_too() {
    let up = upstream(true, None);
    let a = Admin::start(&up, ASK);
    let held = curl_bg(&a.lk, "https://api.example.com/");
    let id = a.wait_pending("api.example.com", 1);
    let bearer = format!("Bearer {}", a.token());
    let (status, _, body) = a.request(
        "POST",
        &format!("/api/approvals/{id}"),
        &[("Authorization", &bearer), ("Content-Type", "application/json")],
        r#"{"decision":"allow","scope":"always"}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(held.join().unwrap().0, 200);
    let denied = curl_bg(&a.lk, "https://other.example.com/");
    let id = a.wait_pending("other.example.com", 1);
    assert!(a.cli(&["approvals", "deny", &id, "--scope", "always"]).status.success());
    assert_ne!(denied.join().unwrap().0, 200);
    let file = a.lk.dir.path().join("approvals.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("[[allow]]\nhost = \"api.example.com\""), "{text}");
    assert!(text.contains("[[deny]]\nhost = \"other.example.com\""), "{text}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);

    // A new process on the same config reads the file at start: no question asked.
    let Admin { lk, port } = a;
    let (dir, config_path, proxy_port) = restartable(lk);
    let again = Latchkey::spawn(dir, proxy_port, config_path, &[]);
    wait_until("the admin port", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let (code, body) = again.curl(&["https://api.example.com/"]);
    assert_eq!(code, 200, "{body}");
    let (code, _) = again.curl(&["http://other.example.com/"]);
    assert_eq!(code, 403, "deny always stands across a restart");
}

/// Stop latchkey, keeping its directory for the next one.
fn restartable(mut lk: Latchkey) -> (tempfile::TempDir, std::path::PathBuf, u16) {
    let _ = lk.child.kill();
    let _ = lk.child.wait();
    let dir = std::mem::replace(&mut lk.dir, tempfile::tempdir().unwrap());
    let port = lk.port;
    wait_until("the old proxy port to close", || std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    (dir, lk.config_path.clone(), port)
}

#[test]
fn an_edit_of_approvals_toml_is_in_force_without_a_restart() {
    let up = upstream(true, None);
    let a = Admin::start(&up, ASK);
    let file = a.lk.dir.path().join("approvals.toml");
    std::fs::write(&file, "[[allow]]\nhost = \".example.com\"\n").unwrap();
    wait_until("the edit to be read", || {
        a.lk.curl(&["--max-time", "3", "https://api.example.com/"]).0 == 200
    });
    assert!(a.pending().is_empty() || a.pending().iter().all(|p| p["host"] != "api.example.com"));
}

#[test]
fn the_webhook_gets_a_signed_request_and_its_answer_releases_the_held_one() {
    let up = upstream(true, None);
    let hook = TcpListener::bind("127.0.0.1:0").unwrap();
    let hook_addr = hook.local_addr().unwrap();
    let body = format!("{ASK}\n#WEBHOOK\n");
    let a = Admin::start(&up, &body.replace("#WEBHOOK\n", ""));
    // The webhook is set by reload: the token exists by now, so the receiver knows it.
    let token = a.token();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = hook.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let (head, body) = loop {
            let n = s.read(&mut chunk).unwrap();
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    break (head.to_string(), body.to_string());
                }
            }
        };
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, token.as_bytes());
        let expected =
            format!("sha256={}", hex::encode(aws_lc_rs::hmac::sign(&key, body.as_bytes()).as_ref()));
        let signed =
            head.lines().any(|l| l.eq_ignore_ascii_case(&format!("x-latchkey-signature: {expected}")));
        let answer = if signed { r#"{"decision":"allow","scope":"run"}"# } else { "{}" };
        write!(s, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}", answer.len()).unwrap();
        (signed, body)
    });
    let text = std::fs::read_to_string(&a.lk.config_path).unwrap();
    let text = text.replace("[admin]\n", &format!("[admin]\nwebhook = \"http://{hook_addr}/approve\"\n"));
    std::fs::write(a.lk.dir.path().join("next.toml"), text).unwrap();
    std::fs::rename(a.lk.dir.path().join("next.toml"), &a.lk.config_path).unwrap();
    wait_until("the reload", || {
        a.lk.stderr().contains("reloaded") || a.lk.stderr().contains("config reloaded")
    });
    let (code, body) = a.lk.curl(&["https://api.example.com/hooked"]);
    assert_eq!(code, 200, "{body}");
    let (signed, sent) = receiver.join().unwrap();
    assert!(signed, "the signature verifies: {sent}");
    let sent = json(&sent);
    assert_eq!(sent["host"], "api.example.com");
    assert_eq!(sent["method"], "CONNECT");
    // `run` stands until restart: no second question.
    assert_eq!(a.lk.curl(&["https://api.example.com/again"]).0, 200);
}

#[test]
fn warn_lets_through_logs_warned_and_suggest_prints_a_snippet_check_accepts() {
    let up = upstream(true, None);
    let log = tempfile::tempdir().unwrap();
    let log_file = log.path().join("requests.jsonl");
    let cfg = format!(
        "intercept = \"all\"\n[proxy.logging]\nlog_requests = true\nlog_file = \"{}\"\n#END-PROXY\n[proxy.filters]\nallowlist_only = true\non_unlisted = \"warn\"\nallowed_domains = [\"api.github.com\"]\n",
        log_file.display()
    );
    let lk = Latchkey::start(Some(&up), &cfg, &[]);
    assert_eq!(lk.curl(&["https://api.example.com/x"]).0, 200);
    assert_eq!(lk.curl(&["https://api.github.com/y"]).0, 200);
    wait_until("two log lines", || std::fs::read_to_string(&log_file).is_ok_and(|t| t.lines().count() >= 2));
    let text = std::fs::read_to_string(&log_file).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(json).collect();
    let decision = |host: &str| lines.iter().find(|l| l["host"] == host).unwrap()["decision"].clone();
    assert_eq!(decision("api.example.com"), "warned", "{text}");
    assert_eq!(decision("api.github.com"), "passed", "{text}");
    let out = lk.cli(&["allowlist", "suggest", "--log", log_file.to_str().unwrap()], &[]);
    let snippet = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && snippet.contains("\"api.example.com\","), "{snippet}");
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), free_port(), None, &snippet);
    let check =
        latchkey_cmd(dir.path(), &[]).args(["check", "--local", "--config"]).arg(&path).output().unwrap();
    assert_ne!(check.status.code(), Some(2), "{}", String::from_utf8_lossy(&check.stderr));
}

#[test]
fn admin_endpoints_need_the_token_and_refuse_every_way_around_it() {
    let up = upstream(true, None);
    let a = Admin::start(&up, ASK);
    let token = a.token();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(a.lk.dir.path().join("admin.token")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the token file is created 0600");
    for open in ["/healthz", "/readyz", "/ca.crt"] {
        assert_eq!(a.request("GET", open, &[], "").0, 200, "{open} is public");
    }
    let bearer = format!("Bearer {token}");
    for path in ["/metrics", "/config", "/api/approvals", "/api/credentials", "/api/usage", "/api/events"] {
        assert_eq!(a.request("GET", path, &[], "").0, 401, "{path} without a token");
        assert_eq!(
            a.request("GET", path, &[("Authorization", "Bearer wrong")], "").0,
            401,
            "{path} wrong token"
        );
        assert_eq!(
            a.request("GET", &format!("{path}?token={token}"), &[], "").0,
            401,
            "{path} token in the query"
        );
        assert_eq!(a.request("GET", &format!("{path}?access_token={token}"), &[], "").0, 401);
    }
    assert_eq!(a.request("GET", "/metrics", &[("Authorization", &bearer)], "").0, 200);
    // A page elsewhere: refused whatever it carries, token included.
    let decision = r#"{"decision":"allow","scope":"always"}"#;
    let evil = [("Authorization", bearer.as_str()), ("Origin", "http://evil.example")];
    assert_eq!(a.request("POST", "/api/approvals/x", &evil, decision).0, 403, "cross-origin POST");
    assert_eq!(
        a.request("GET", "/api/approvals", &[("Authorization", &bearer), ("Origin", "null")], "").0,
        403
    );
    // The view's session: its cookie alone does not change anything.
    let (status, head, body) = a.request(
        "POST",
        "/login",
        &[("Content-Type", "application/json")],
        &format!(r#"{{"token":"{token}"}}"#),
    );
    assert_eq!(status, 200, "{body}");
    let set_cookie = head.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).unwrap();
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"), "{set_cookie}");
    assert!(!set_cookie.contains(&token), "the cookie is not the token");
    let cookie = set_cookie.split_once(':').unwrap().1.trim().split(';').next().unwrap().to_string();
    let csrf = json(&body)["csrf"].as_str().unwrap().to_string();
    let own = format!("http://127.0.0.1:{}", a.port);
    assert_eq!(a.request("GET", "/api/approvals", &[("Cookie", &cookie)], "").0, 200, "the cookie reads");
    // A forged Origin (a non-browser can send any): with the cookie, still no CSRF token.
    let forged = [("Cookie", cookie.as_str()), ("Origin", own.as_str())];
    assert_eq!(a.request("POST", "/api/approvals/x", &forged, decision).0, 403, "no CSRF token");
    let wrong_csrf = [("Cookie", cookie.as_str()), ("Origin", own.as_str()), ("X-CSRF-Token", "00")];
    assert_eq!(a.request("POST", "/api/approvals/x", &wrong_csrf, decision).0, 403);
    let no_origin = [("Cookie", cookie.as_str()), ("X-CSRF-Token", csrf.as_str())];
    assert_eq!(
        a.request("POST", "/api/approvals/x", &no_origin, decision).0,
        403,
        "cookie change without Origin"
    );
    let good = [("Cookie", cookie.as_str()), ("Origin", own.as_str()), ("X-CSRF-Token", csrf.as_str())];
    assert_eq!(a.request("POST", "/api/approvals/x", &good, decision).0, 404, "all three: reaches the API");
    assert_eq!(a.request("POST", "/login", &[], r#"{"token":"wrong"}"#).0, 401);
    // The admin port is not a destination through the proxy.
    for url in [format!("http://127.0.0.1:{}/metrics", a.port), format!("https://127.0.0.1:{}/", a.port)] {
        let (code, body) = a.lk.curl(&["-H", &format!("Authorization: {bearer}"), &url]);
        assert!(code == 403 || code == 0, "{url}: {code} {body}");
    }
    // No admin answer carries a secret value or the token (but /api/session's own CSRF).
    let (_, cfg) = a.get("/config");
    assert!(!cfg.contains(&token));
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap()
}

#[test]
fn a_watcher_that_stops_reading_is_disconnected_and_costs_the_proxy_nothing() {
    let a = Admin::start_with(None, None, "[proxy.filters]\nblocked_domains = [\"blocked.example\"]\n");
    let token = a.token();
    let mut watcher = raw::connect(a.port);
    write!(
        watcher,
        "GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Bearer {token}\r\n\r\n",
        a.port
    )
    .unwrap();
    // A quick reader first: the feed works.
    let mut quick = raw::connect(a.port);
    quick.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(quick, "GET /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n").unwrap();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 8192];
    // Subscribed once the feed's first event arrives; a request sent before that could
    // be published before the subscription exists and never reach this reader.
    while !String::from_utf8_lossy(&seen).contains("event: approvals") {
        let n = quick.read(&mut chunk).unwrap();
        assert!(n > 0, "the feed ended");
        seen.extend_from_slice(&chunk[..n]);
    }
    let mut proxy = raw::connect(a.lk.port);
    let one = b"GET http://blocked.example/ HTTP/1.1\r\nHost: blocked.example\r\n\r\n";
    proxy.write_all(one).unwrap();
    while !String::from_utf8_lossy(&seen).contains("event: request") {
        let n = quick.read(&mut chunk).unwrap();
        assert!(n > 0, "the feed ended");
        seen.extend_from_slice(&chunk[..n]);
    }
    drop(quick);
    let before = rss_kib(a.lk.child.id());
    // Refused requests on one keep-alive connection, 20,000 at a time, until the
    // stalled watcher is cut: records it never reads, past its queue (16 chunks of 20
    // ms each) and the socket buffers. How many that takes depends on the machine's
    // speed (a fast one answers 20,000 within a few chunks), so the load goes on until
    // the API counts no watcher (the quick one left above), at most 400,000 requests.
    let watchers = || json(&a.get("/api/usage").1)["watchers"].as_u64().unwrap();
    let mut rounds = 0;
    while watchers() > 0 {
        rounds += 1;
        assert!(rounds <= 20, "the stalled watcher was not cut after {} requests", 20_000 * (rounds - 1));
        refused_burst(&mut proxy, one, 20_000);
    }
    let after = rss_kib(a.lk.child.id());
    assert!(after < before + 16 * 1024, "RSS grew from {before} KiB to {after} KiB");
    // The stalled watcher was cut: reading now ends (EOF or reset), it does not hang
    // on a connection the server still keeps.
    // (A kept connection would trickle keep-alive comments forever: hence the deadline.)
    watcher.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(20);
    let ended = loop {
        match watcher.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) if Instant::now() < deadline => continue,
            Ok(_) => break false,
            Err(e) => {
                break !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut);
            }
        }
    };
    assert!(ended, "the stalled watcher's connection is still open");
}

/// `n` requests on `proxy` that latchkey refuses, each answer read while the next are
/// written (so neither side's buffers fill).
fn refused_burst(proxy: &mut std::net::TcpStream, one: &'static [u8], n: usize) {
    let mut sender = proxy.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for _ in 0..n {
            if sender.write_all(one).is_err() {
                break;
            }
        }
    });
    proxy.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut answered = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let mut tail = String::new();
    while answered < n {
        let read = proxy.read(&mut buf).unwrap();
        assert!(read > 0, "the proxy closed the connection after {answered} answers");
        tail.push_str(&String::from_utf8_lossy(&buf[..read]));
        answered += tail.matches("HTTP/1.1 403").count();
        tail = tail.rsplit("HTTP/1.1 403").next().unwrap_or("").to_string();
    }
    writer.join().unwrap();
}

/// The jail's redirected connections (no CONNECT: `serve_destined`) are held the same
/// way: a curl that ignores every proxy setting waits inside the jail until allowed.
#[test]
fn a_jailed_connection_is_held_until_allowed() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "exec --jail tests run as root (scripts/test.sh does)");
    let up = upstream(true, None);
    let a = Admin::start(&up, ASK);
    let (dir, config) = (a.lk.dir.path().to_path_buf(), a.lk.config_path.clone());
    let jailed = std::thread::spawn(move || {
        latchkey_cmd(&dir, &[])
            .args(["exec", "--jail", "--config"])
            .arg(&config)
            .args(["--", "curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "jailed %{http_code}"])
            .arg("https://api.example.com/from-the-jail")
            .output()
            .unwrap()
    });
    let id = a.wait_pending("api.example.com", 1);
    assert_eq!(up.count(), 0, "nothing reached the upstream while held");
    assert!(a.cli(&["approvals", "allow", &id]).status.success());
    let out = jailed.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("jailed 200"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(up.requests().iter().any(|r| r.path == "/from-the-jail"));
}

/// A token file latchkey cannot create (a read-only config directory in a container)
/// leaves the public endpoints up and everything else closed.
#[test]
fn without_a_token_file_only_the_public_endpoints_answer() {
    let port = free_port();
    let body = format!(
        "[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"/proc/latchkey-nowhere/admin.token\"\n"
    );
    let lk = Latchkey::start(None, &body, &[]);
    let a = Admin { lk, port };
    // Bound just after the proxy port `start` waited for: a request before then is
    // refused (it failed a full run once), so wait for the port, as `Admin::start` does.
    wait_until("the admin port", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    wait_until("/healthz", || a.request("GET", "/healthz", &[], "").0 == 200);
    // (/readyz may answer 503 for a moment: the admin port opens before the proxy's.)
    wait_until("ready", || a.request("GET", "/readyz", &[], "").0 == 200);
    let (status, _, body) = a.request("GET", "/metrics", &[("Authorization", "Bearer anything")], "");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no admin token"), "{body}");
    assert!(a.lk.stderr().contains("serves /healthz, /readyz and /ca.crt only"), "{}", a.lk.stderr());
}
