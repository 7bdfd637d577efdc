//! HTTP/2 on both sides, streaming (SSE, trailers, large bodies) — with the destination
//! pinned to the tunnel whatever the protocol.

mod common;
use std::io::{Read, Write};

use common::raw::{tls, tunnel};
use common::*;

const CRED: &str = r#"
[credentials.example]
auth_type = "bearer"
value = "${EXAMPLE_TOKEN}"
domains = ["api.example.com", "api.anthropic.com"]
"#;
const SECRET: &str = "example-REAL-token";

fn start(up: &Upstream) -> Latchkey {
    Latchkey::start(Some(up), CRED, &[("EXAMPLE_TOKEN", SECRET)])
}

#[test]
fn curl_http2_client_to_http1_upstream() {
    let up = upstream(true, None);
    let lk = start(&up);
    let (code, body) =
        lk.curl(&["--http2", "-H", "authorization: Bearer dummy", "https://api.example.com/v1/x"]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(echoed(&body, "authorization"), [format!("Bearer {SECRET}")]);
    assert_eq!(json(&body)["version"], "HTTP/1.1");
    assert_eq!(echoed(&body, "host"), ["api.example.com"]);
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
            "-x",
            &lk.proxy_url(),
            "--cacert",
        ])
        .arg(lk.bundle())
        .arg("https://api.example.com/")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2", "curl and latchkey negotiated h2");
}

#[test]
fn http1_client_to_h2_only_upstream() {
    let up = upstream_with(UpstreamOpts { tls: true, h2_only: true, ..Default::default() });
    let lk = start(&up);
    let (code, body) = lk.curl(&["--http1.1", "https://api.example.com/v1/x"]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["version"], "HTTP/2.0");
    assert_eq!(echoed(&body, "authorization"), [format!("Bearer {SECRET}")]);
}

#[test]
fn h2_authority_naming_another_host_is_refused() {
    let up = upstream_with(UpstreamOpts { tls: true, h2_only: true, ..Default::default() });
    let lk = start(&up);
    let replies = h2::requests(
        lk.port,
        "api.example.com:443",
        "api.example.com",
        vec![
            h2::get("evil.example.net", "/steal", &[]),
            h2::get("api.example.com:8443", "/steal", &[]),
            h2::get("api.example.com", "/steal", &[("host", "evil.example.net")]),
            h2::get("API.example.com.", "/ok", &[]),
        ],
    );
    assert_eq!(replies.iter().map(|r| r.status).collect::<Vec<_>>(), [421, 421, 421, 200]);
    let seen = up.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/ok");
    assert_eq!(seen[0].header_all("authorization"), [format!("Bearer {SECRET}")]);
}

#[test]
fn h2_requests_share_one_upstream_connection() {
    let up = upstream_with(UpstreamOpts { tls: true, h2_only: true, ..Default::default() });
    let lk = start(&up);
    // The first request learns (by ALPN) that the upstream speaks h2. A burst arriving
    // before any connection exists may race a second handshake (documented); once one
    // h2 connection is pooled, every concurrent request shares it.
    let first = h2::requests(
        lk.port,
        "api.example.com:443",
        "api.example.com",
        vec![h2::get("api.example.com", "/warm", &[])],
    );
    assert_eq!(first[0].status, 200);
    let opened = || up.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(opened(), 1);
    // 16 requests at once on one client connection, served on a shard with no pooled
    // connection yet (`proxy::shards`; each pools its own): two connections held open
    // on the first shard send the next one to the second, where a machine has two. It
    // may open one connection, never one per request.
    let _held = [(); 2].map(|_| std::net::TcpStream::connect(("127.0.0.1", lk.port)).unwrap());
    std::thread::sleep(std::time::Duration::from_millis(100));
    let before = opened();
    let reqs = (0..16).map(|i| h2::get("api.example.com", &format!("/r{i}"), &[])).collect();
    let replies = h2::requests(lk.port, "api.example.com:443", "api.example.com", reqs);
    assert!(replies.iter().all(|r| r.status == 200));
    assert_eq!(up.count(), 17);
    assert!(up.requests().iter().all(|r| r.header_all("authorization") == [format!("Bearer {SECRET}")]));
    assert!(
        opened() <= before + 1,
        "multiplexed on one connection: {} opened for 16 requests",
        opened() - before
    );
    // HTTP/1.1 clients have their own pool (the upstream leg mirrors the client's
    // protocol); to an h2-only upstream it falls back (after the refused HTTP/1.1
    // handshake) to one h2 connection, which the next requests share. Three requests
    // on one client connection (one curl), so on one shard.
    let before = opened();
    let url = "https://api.example.com/h1";
    assert_eq!(lk.curl(&["--http1.1", url, url, url]).0, 200);
    assert_eq!(up.count(), 20);
    assert_eq!(opened() - before, 2, "refused + fallback, shared by the other two");
}

#[test]
fn connect_inside_an_h2_tunnel_is_refused() {
    let up = upstream(true, None);
    let lk = start(&up);
    let req = http::Request::builder()
        .method("CONNECT")
        .uri("evil.example.net:443")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let replies = h2::requests(lk.port, "api.example.com:443", "api.example.com", vec![req]);
    assert_eq!(replies[0].status, 400);
    assert_eq!(up.count(), 0);
}

/// Read from `s` until `needle` has been seen; panics after the read timeout.
fn read_until<S: Read>(s: &mut S, seen: &mut Vec<u8>, needle: &str) {
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(seen).contains(needle) {
        let n = s.read(&mut buf).unwrap_or_else(|e| panic!("waiting for {needle:?}: {e}"));
        assert!(n > 0, "closed before {needle:?}: {}", String::from_utf8_lossy(seen));
        seen.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn server_sent_events_stream_event_by_event() {
    let up = upstream(true, None);
    let lk = start(&up);
    let (s, _) = tunnel(lk.port, "api.example.com:443");
    let mut t = tls(s, "api.example.com");
    t.write_all(b"GET /sse HTTP/1.1\r\nHost: api.example.com\r\nAccept: text/event-stream\r\n\r\n").unwrap();
    let mut seen = Vec::new();
    // The upstream sends the second event only after we have the first: a proxy that
    // buffered the stream would never deliver "one" and this read would time out.
    read_until(&mut t, &mut seen, "data: one");
    assert!(!String::from_utf8_lossy(&seen).contains("data: two"));
    up.sse_next.notify_one();
    read_until(&mut t, &mut seen, "data: two");
}

#[test]
fn trailers_pass_on_http1_and_http2() {
    let up = upstream(true, None);
    let lk = start(&up);
    let (s, _) = tunnel(lk.port, "api.example.com:443");
    let mut t = tls(s, "api.example.com");
    t.write_all(b"GET /trailers HTTP/1.1\r\nHost: api.example.com\r\nTE: trailers\r\n\r\n").unwrap();
    let mut seen = Vec::new();
    read_until(&mut t, &mut seen, "abc123");
    let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    assert!(text.contains("transfer-encoding: chunked") && text.contains("x-checksum: abc123"), "{text}");

    let replies = h2::requests(
        lk.port,
        "api.example.com:443",
        "api.example.com",
        vec![h2::get("api.example.com", "/trailers", &[("te", "trailers")])],
    );
    assert_eq!(&replies[0].body[..], b"payload");
    assert_eq!(replies[0].trailers.as_ref().unwrap()["x-checksum"], "abc123");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Run `cmd` while sampling latchkey's RSS; returns (stdout, peak growth in KiB).
fn with_rss(lk: &Latchkey, cmd: &mut std::process::Command) -> (String, u64) {
    let pid = lk.child.id();
    let base = rss_kib(pid);
    let child =
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            peak = peak.max(rss_kib(pid));
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        peak
    });
    let out = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let peak = sampler.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("RSS base {base} KiB, peak {peak} KiB");
    (String::from_utf8_lossy(&out.stdout).into_owned(), peak.saturating_sub(base))
}

const GIB: u64 = 1 << 30;

#[test]
fn one_gib_down_and_up_in_bounded_memory() {
    let up = upstream(true, None);
    let lk = start(&up);
    // Warm up: first TLS handshakes and leaf, so the baseline includes them.
    lk.curl(&["https://api.example.com/"]);
    let mut down = std::process::Command::new("curl");
    down.args(["-sS", "-o", "/dev/null", "-w", "%{size_download}", "-x", &lk.proxy_url(), "--cacert"])
        .arg(lk.bundle())
        .arg(format!("https://api.example.com/source?bytes={GIB}"));
    let (size, growth) = with_rss(&lk, &mut down);
    assert_eq!(size, GIB.to_string());
    eprintln!("1 GiB download: latchkey RSS grew {growth} KiB");
    assert!(growth < 32 * 1024, "RSS grew {growth} KiB");

    let mut upload = std::process::Command::new("sh");
    upload.arg("-c").arg(format!(
        "head -c {GIB} /dev/zero | curl -sS -T - -x {} --cacert {} https://api.example.com/sink",
        lk.proxy_url(),
        lk.bundle().display()
    ));
    let (count, growth) = with_rss(&lk, &mut upload);
    assert_eq!(count, GIB.to_string(), "the upstream received every byte");
    eprintln!("1 GiB chunked upload: latchkey RSS grew {growth} KiB");
    assert!(growth < 32 * 1024, "RSS grew {growth} KiB");
}

#[test]
fn sigterm_lets_the_request_in_flight_finish() {
    let up = upstream(true, None);
    let lk = start(&up);
    let slow = std::process::Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-x", &lk.proxy_url(), "--cacert"])
        .arg(lk.bundle())
        .arg("https://api.example.com/slow")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the upstream holds the request, then ask latchkey to stop.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while up.count() == 0 {
        assert!(std::time::Instant::now() < deadline, "the slow request never arrived");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    unsafe { libc::kill(lk.child.id() as i32, libc::SIGTERM) };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", lk.port)).is_err(),
        "no new connections while draining"
    );
    let out = slow.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("\n200"), "the request in flight completed: {text}");
    assert!(text.contains(SECRET), "and was injected: {text}");
    let mut lk = lk;
    let status = lk.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// A stream the client resets is dropped with the request it carried: the exchange
/// waiting on `/slow` (4 s upstream) ends at the reset, so a SIGTERM just after finds
/// nothing in flight and latchkey exits at once, where it would wait out the answer.
#[test]
fn a_stream_the_client_resets_is_dropped_with_its_request() {
    let up = upstream(true, None);
    let lk = start(&up);
    let (mut client, line) =
        py_held("h2_reset.py", &[&lk.port.to_string(), "api.example.com", "/slow", "0.5"]);
    assert_eq!(line.trim(), "200", "the h2 client failed");
    // The connection stays open: only the reset can have ended the exchange.
    let stopping = std::time::Instant::now();
    unsafe { libc::kill(lk.child.id() as i32, libc::SIGTERM) };
    let mut lk = lk;
    assert_eq!(lk.child.wait().unwrap().code(), Some(0));
    let took = stopping.elapsed();
    drop(client.stdin.take());
    let _ = client.wait();
    // /slow, had it been kept, would hold the drain for its last ~3.4 s.
    assert!(took < std::time::Duration::from_millis(2000), "the drain waited {took:?}");
}

/// The request log counts what went up: a POST's body bytes, nothing for a GET (whose
/// exchange makes no counter at all).
#[test]
fn the_log_counts_the_request_body_bytes_sent_up() {
    let up = upstream(true, None);
    let log = RequestLog::new();
    let lk = Latchkey::start(
        Some(&up),
        &format!("{}#END-PROXY\n{CRED}", log.config()),
        &[("EXAMPLE_TOKEN", SECRET)],
    );
    let body = "x".repeat(1000);
    assert_eq!(lk.curl(&["--data-binary", &body, "https://api.example.com/sink"]).0, 200);
    assert_eq!(lk.curl(&["https://api.example.com/v1/x"]).0, 200);
    let lines = log.records(2);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        (&lines[0]["method"], &lines[0]["bytes_up"]),
        (&serde_json::json!("POST"), &serde_json::json!(1000))
    );
    assert_eq!(
        (&lines[1]["method"], &lines[1]["bytes_up"]),
        (&serde_json::json!("GET"), &serde_json::json!(0))
    );
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let up = upstream(true, None);
    let lk = start(&up);
    let (s, _) = tunnel(lk.port, "api.example.com:443");
    let mut t = tls(s, "api.example.com");
    t.write_all(
        b"POST /sink HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let mut seen = Vec::new();
    read_until(&mut t, &mut seen, "100 Continue");
    t.write_all(b"hello").unwrap();
    read_until(&mut t, &mut seen, "\r\n\r\n5");
}

/// The OpenSSL h2-only upstream (tests/py/h2_server.py) behind a latchkey with `CRED`.
fn openssl_h2_only() -> (PyServer, Latchkey) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("up.crt"), dir.path().join("up.key"));
    std::fs::write(&cert, &pki().cert_pem).unwrap();
    std::fs::write(&key, &pki().key_pem).unwrap();
    let (server, addr) = python_upstream({
        let mut cmd = py("h2_server.py");
        cmd.arg(&cert).arg(&key);
        cmd
    });
    let port = free_port();
    let config = write_config(dir.path(), port, Some(addr), CRED);
    (server, Latchkey::spawn(dir, port, config, &[("EXAMPLE_TOKEN", SECRET)]))
}

/// An h2 upstream going away gracefully before a request's stream did not act on it
/// (RFC 9113 §6.8): latchkey sends that request again on a new connection instead of
/// answering 502, a small upload with it. nginx does this every `keepalive_requests`.
#[test]
fn a_request_an_h2_upstream_went_away_before_is_sent_again() {
    let (_server, lk) = openssl_h2_only();
    let first = "https://api.example.com/goaway-after-first/1";
    let second = "https://api.example.com/goaway-after-first/2";
    // One curl, one client connection, one shard: the second request goes on the
    // pooled connection's next stream, which the upstream refuses.
    let (code, body) = lk.curl(&["--http1.1", first, second]);
    assert_eq!(code, 200, "{body}\n{}", lk.stderr());
    // Each answer is an echo on a line, curl's status for the first before the second.
    let paths: Vec<String> =
        body.lines().filter_map(|l| l.find('{').map(|at| h2_seen(&l[at..], ":path").join(""))).collect();
    assert_eq!(paths, ["/goaway-after-first/1", "/goaway-after-first/2"], "{body}");
    // A small upload too: read whole before its stream opens, so sent again whole.
    let (code, body) = lk.curl(&["--http1.1", "--data", "twelve bytes", first, second]);
    assert_eq!(code, 200, "{body}\n{}", lk.stderr());
    let lengths: Vec<u64> = body
        .lines()
        .filter_map(|l| l.find('{').map(|at| json(&l[at..])["body_len"].as_u64().unwrap()))
        .collect();
    assert_eq!(lengths, [12, 12], "{body}");
}

/// The same for a streamed upload (over 64 KiB, or of unknown length): what went up
/// before the upstream went away was kept, so the body is sent again whole — refused
/// as its head arrives, or after some of its body did.
#[test]
fn a_streamed_upload_an_h2_upstream_went_away_before_is_sent_again_whole() {
    let (_server, lk) = openssl_h2_only();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let file = lk.dir.path().join("payload.bin");
    std::fs::write(&file, &payload).unwrap();
    let want = sha256_hex(&payload);
    let data = format!("@{}", file.display());
    let framings = [&[][..], &["-H", "transfer-encoding: chunked"][..]];
    for (refused, framing) in
        ["goaway-after-first", "goaway-after-data"].into_iter().flat_map(|r| framings.map(|f| (r, f)))
    {
        let (first, second) =
            (format!("https://api.example.com/{refused}/1"), format!("https://api.example.com/{refused}/2"));
        let mut args = vec!["--http1.1", "--data-binary", &data];
        args.extend_from_slice(framing);
        args.extend([first.as_str(), second.as_str()]);
        let (code, body) = lk.curl(&args);
        assert_eq!(code, 200, "{refused} {framing:?}: {body}\n{}", lk.stderr());
        let seen: Vec<(u64, String)> = body
            .lines()
            .filter_map(|l| l.find('{').map(|at| json(&l[at..])))
            .map(|j| (j["body_len"].as_u64().unwrap(), j["body_sha256"].as_str().unwrap().to_string()))
            .collect();
        assert_eq!(seen, [(300_000, want.clone()), (300_000, want.clone())], "{refused} {framing:?}");
    }
}

/// An h2 upstream that resets a stream in the middle of its body: the client sees the
/// body cut off (curl fails), never a short body presented as whole, with or without a
/// `content-length` to tell it by, on either client protocol.
#[test]
fn an_h2_upstream_reset_mid_body_is_an_aborted_body_never_a_complete_one() {
    let (_server, lk) = openssl_h2_only();
    for path in ["/reset-mid-body", "/reset-mid-body?length"] {
        for http in ["--http1.1", "--http2"] {
            let out = curl_to_null(&lk, http, "%{http_code}", &format!("https://api.example.com{path}"));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "{path} {http}: curl took a cut body as whole (status {}): {stderr}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    let (code, body) = lk.curl(&["https://api.example.com/after"]);
    assert_eq!(code, 200, "{body}");
}

/// curl through `lk` with `http` (its protocol option), the body thrown away and
/// `write_out` on stdout.
fn curl_to_null(lk: &Latchkey, http: &str, write_out: &str, url: &str) -> std::process::Output {
    std::process::Command::new("curl")
        .args(["-sS", "--max-time", "30", "-o", "/dev/null", "-w", write_out, http, "-x"])
        .arg(lk.proxy_url())
        .arg("--cacert")
        .arg(lk.bundle())
        .arg(url)
        .output()
        .unwrap()
}

/// A header (or pseudo-header) as the h2 upstream saw it.
fn h2_seen(body: &str, name: &str) -> Vec<String> {
    json(body)["headers"]
        .as_array()
        .unwrap_or_else(|| panic!("not an echo: {body}"))
        .iter()
        .filter(|p| p[0] == name)
        .map(|p| p[1].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn http1_client_to_an_openssl_h2_only_upstream_that_picks_no_protocol() {
    let (_server, lk) = openssl_h2_only();
    let (code, body) = lk.curl(&["--http1.1", "https://api.example.com/v1/things?x=1"]);
    assert_eq!(code, 200, "{body}\n{}", lk.stderr());
    assert_eq!(json(&body)["version"], "HTTP/2");
    assert_eq!(h2_seen(&body, ":authority"), ["api.example.com"]);
    assert_eq!(h2_seen(&body, ":path"), ["/v1/things?x=1"]);
    assert_eq!(h2_seen(&body, "authorization"), [format!("Bearer {SECRET}")]);

    // 96,000 bytes: more than HTTP/2's initial flow-control window.
    let payload: Vec<u8> = (0..96_000u32).map(|i| (i % 251) as u8).collect();
    let file = lk.dir.path().join("payload.bin");
    std::fs::write(&file, &payload).unwrap();
    let want = sha256_hex(&payload);
    let data = format!("@{}", file.display());
    for framing in [&[][..], &["-H", "transfer-encoding: chunked"][..]] {
        let mut args = vec!["--http1.1", "--data-binary", &data];
        args.extend_from_slice(framing);
        args.push("https://api.example.com/v1/upload");
        let (code, body) = lk.curl(&args);
        assert_eq!(code, 200, "{framing:?}: {body}");
        assert_eq!(json(&body)["body_len"], 96_000, "{framing:?}");
        assert_eq!(json(&body)["body_sha256"], want.as_str(), "{framing:?}");
    }

    // Response trailers reach an HTTP/1.1 client that asked for them.
    let (s, _) = tunnel(lk.port, "api.example.com:443");
    let mut t = tls(s, "api.example.com");
    t.write_all(b"GET /trailers HTTP/1.1\r\nHost: api.example.com\r\nTE: trailers\r\n\r\n").unwrap();
    let mut seen = Vec::new();
    read_until(&mut t, &mut seen, "abc123");
    let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200") && text.contains("x-checksum: abc123"), "{text}");
}

fn sha256_hex(data: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn http1_clients_stay_on_http1_where_the_upstream_speaks_both() {
    let up = upstream_with(UpstreamOpts { tls: true, h2_too: true, ..Default::default() });
    let lk = start(&up);
    for _ in 0..2 {
        let (code, body) = lk.curl(&["--http1.1", "https://api.example.com/v1/x"]);
        assert_eq!(code, 200, "{body}");
        assert_eq!(json(&body)["version"], "HTTP/1.1", "no h2 funnel for HTTP/1.1 clients");
    }
    let (code, body) = lk.curl(&["--http2", "https://api.example.com/v1/x"]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["version"], "HTTP/2.0", "h2 clients get h2");
    assert_eq!(up.connections.load(std::sync::atomic::Ordering::SeqCst), 2, "one per protocol, no probing");
}

/// A chunked upstream response (no Content-Length: hyper never reports its end until
/// the last chunk) gives its connection back to the pool when read to the end: the
/// next request reuses it instead of paying a new upstream TLS handshake (this cost
/// every SSE and streamed response ~1.5 ms of first-byte latency; bench/sse_ab.py).
#[test]
fn an_upstream_connection_is_reused_after_a_chunked_response() {
    let up = upstream(true, None);
    let lk = start(&up);
    for i in 0..3 {
        let (code, body) = lk.curl(&["--http1.1", "-d", "hello", "https://api.example.com/echo-body"]);
        assert_eq!((code, body.trim()), (200, "hello"), "request {i}");
    }
    assert_eq!(
        up.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one upstream connection, reused"
    );
}

/// Bodies many times every flow-control window, both ways, over HTTP/2 on both legs
/// (latchkey's own h2 upstream client): the download's window is given back as it is
/// read, the upload waits for room as the upstream reads, and every byte arrives.
#[test]
fn h2_bodies_past_every_window_arrive_whole_both_ways() {
    const SIZE: usize = 48 << 20;
    let up = upstream_with(UpstreamOpts { tls: true, h2_only: true, ..Default::default() });
    let lk = start(&up);
    let url = format!("https://api.example.com/source?bytes={SIZE}");
    let down = curl_to_null(&lk, "--http2", "%{http_code} %{size_download}", &url);
    assert_eq!(String::from_utf8_lossy(&down.stdout), format!("200 {SIZE}"));
    let file = lk.dir.path().join("up.bin");
    std::fs::write(&file, vec![b'u'; SIZE]).unwrap();
    let data = format!("@{}", file.display());
    let (code, body) =
        lk.curl(&["--http2", "-X", "POST", "--data-binary", &data, "https://api.example.com/sink"]);
    assert_eq!((code, body.as_str()), (200, SIZE.to_string().as_str()));
    assert!(up.requests().iter().all(|r| r.header_all("authorization") == [format!("Bearer {SECRET}")]));
}
