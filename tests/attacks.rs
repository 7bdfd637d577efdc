//! Attacks on SPEC section 3, written as an untrusted client would try them. Each test
//! fails if its defence is removed.

mod common;
use common::raw::{exchange, request, tls, tunnel};
use common::*;

const CRED: &str = r#"
[credentials.anthropic]
header = "x-api-key"
value = "${ANTHROPIC_API_KEY}"
domains = ["api.anthropic.com"]
"#;
const SECRET: &str = "sk-ant-REAL-0123456789";

fn start(extra: &str) -> (Upstream, Latchkey) {
    let up = upstream(true, None);
    let lk = Latchkey::start(Some(&up), &format!("{extra}{CRED}"), &[("ANTHROPIC_API_KEY", SECRET)]);
    (up, lk)
}

fn status(resp: &str) -> u16 {
    resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[test]
fn host_header_inside_tunnel_must_name_the_tunnel_host() {
    let (up, lk) = start("");
    let (s, head) = tunnel(lk.port, "api.anthropic.com:443");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let resp = request(
        tls(s, "api.anthropic.com"),
        "GET /steal HTTP/1.1\r\nHost: evil.example.net\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status(&resp), 421, "{resp}");
    assert!(resp.contains("x-latchkey-error: misdirected"), "{resp}");
    assert!(resp.contains("latchkey: "), "{resp}");
    assert_eq!(up.count(), 0, "never forwarded");

    // Same host, other port: also another destination.
    let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
    let resp = request(
        tls(s, "api.anthropic.com"),
        "GET / HTTP/1.1\r\nHost: api.anthropic.com:8443\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status(&resp), 421, "{resp}");
    // Case and trailing dot are the same host.
    let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
    let resp = request(
        tls(s, "api.anthropic.com"),
        "GET / HTTP/1.1\r\nHost: API.Anthropic.COM.:443\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status(&resp), 200, "{resp}");
    assert_eq!(up.requests()[0].header_all("x-api-key"), [SECRET]);
    // Two Host headers: refused.
    let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
    let resp = request(
        tls(s, "api.anthropic.com"),
        "GET / HTTP/1.1\r\nHost: api.anthropic.com\r\nHost: evil.example.net\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status(&resp), 400, "{resp}");
    assert_eq!(up.count(), 1);
}

#[test]
fn absolute_form_inside_tunnel_cannot_redirect_the_credential() {
    let (up, lk) = start("");
    let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
    let resp = request(
        tls(s, "api.anthropic.com"),
        "GET https://evil.example.net/steal HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status(&resp), 421, "{resp}");
    assert_eq!(up.count(), 0);
}

#[test]
fn sni_naming_another_host_is_refused() {
    let (up, lk) = start("");
    let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
    let resp = request(
        tls(s, "evil.example.net"),
        "GET / HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status(&resp), 421, "{resp}");
    assert_eq!(up.count(), 0);
}

#[test]
fn a_blind_tunnel_refuses_a_client_hello_naming_another_host() {
    // No credential or filter names other.example.com, so its CONNECT is spliced blind
    // (domain fronting past a blocklist would look like this). The upstream is a raw
    // socket that records every byte it gets: a ClientHello for the blocked host must
    // never reach it.
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let got = received.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let got = got.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    got.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests.log");
    let body = format!(
        "[proxy.logging]\nlog_requests = true\nlog_file = \"{}\"\n[proxy.filters]\nblocked_domains = [\"evil.example.net\"]\n#END-PROXY\n{CRED}",
        log.display()
    );
    let port = free_port();
    let path = write_config(dir.path(), port, Some(upstream_addr), &body);
    let lk = Latchkey::spawn(dir, port, path, &[("ANTHROPIC_API_KEY", SECRET)]);

    let (s, head) = tunnel(lk.port, "other.example.com:443");
    assert!(head.starts_with("HTTP/1.1 200"), "a blind tunnel is established: {head}");
    let mut t = tls(s, "evil.example.net");
    let wrote = t.write_all(b"GET / HTTP/1.1\r\nHost: evil.example.net\r\n\r\n").and_then(|_| t.flush());
    let mut answer = Vec::new();
    let read = t.read_to_end(&mut answer);
    let alert = format!("{wrote:?} {read:?}");
    assert!(wrote.is_err() || read.is_err(), "the handshake must fail: {alert}");
    assert!(alert.contains("AccessDenied") || alert.contains("access_denied"), "a TLS alert: {alert}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(received.lock().unwrap().is_empty(), "bytes reached the upstream");

    // The tunnel's one line says it was refused, and why.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let line = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("\"CONNECT\"")) {
            break json(l);
        }
        assert!(std::time::Instant::now() < deadline, "no log line: {}", lk.stderr());
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(line["decision"], "blocked", "{line}");
    assert_eq!(line["host"], "other.example.com", "{line}");
    assert!(line["reason"].as_str().unwrap_or("").contains("evil.example.net"), "{line}");
}

#[test]
fn connect_inside_a_tunnel_is_refused() {
    let (up, lk) = start("");
    let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
    let resp = request(
        tls(s, "api.anthropic.com"),
        "CONNECT evil.example.net:443 HTTP/1.1\r\nHost: evil.example.net:443\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status(&resp), 400, "{resp}");
    assert!(resp.contains("CONNECT inside a tunnel"), "refused for what it is: {resp}");
    assert_eq!(up.count(), 0);
}

#[test]
fn plain_http_in_a_tunnel_or_direct_never_carries_the_credential() {
    let up = upstream(true, None);
    let plain = upstream(false, None);
    let lk = Latchkey::start_plain(&up, &plain, CRED, &[("ANTHROPIC_API_KEY", SECRET)]);
    // Absolute-form plain HTTP to a credential host: 403 naming the credential.
    let (code, body) = lk.curl(&["http://api.anthropic.com/v1/messages"]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("credential anthropic") && body.contains("https"), "{body}");
    // A CONNECT tunnel that does not start with TLS is plain HTTP to that destination.
    let (s, head) = tunnel(lk.port, "api.anthropic.com:443");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let resp = request(s, "GET / HTTP/1.1\r\nHost: api.anthropic.com:443\r\nConnection: close\r\n\r\n");
    assert_eq!(status(&resp), 403, "{resp}");
    assert!(!resp.contains(SECRET));
    assert_eq!(up.count() + plain.count(), 0);

    // allow_http = true opts in.
    let cfg = CRED.replace("domains", "allow_http = true\ndomains");
    let lk = Latchkey::start_plain(&up, &plain, &cfg, &[("ANTHROPIC_API_KEY", SECRET)]);
    let (code, body) = lk.curl(&["http://api.anthropic.com/v1/messages"]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(echoed(&body, "x-api-key"), [SECRET]);
    // Plain HTTP: a Host that differs from the absolute URI is refused.
    let resp = exchange(
        lk.port,
        b"GET http://api.anthropic.com/ HTTP/1.1\r\nHost: evil.example.net\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status(&resp), 421, "{resp}");
}

#[test]
fn plain_http_into_a_443_tunnel_with_a_bare_host_gets_the_https_advice() {
    let up = upstream(true, None);
    let plain = upstream(false, None);
    let lk = Latchkey::start_plain(&up, &plain, CRED, &[("ANTHROPIC_API_KEY", SECRET)]);
    // Inside a tunnel a Host without a port means the tunnel's port (SPEC 3.1): this is
    // plain HTTP to api.anthropic.com:443, not a request for another destination (421).
    let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
    let resp = request(s, "GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n");
    assert_eq!(status(&resp), 403, "{resp}");
    assert!(resp.contains("x-latchkey-error: plain-http"), "{resp}");
    assert!(resp.contains("credential anthropic") && resp.contains("use https://"), "{resp}");
    assert!(!resp.contains(SECRET));
    // A port that is not the tunnel's is still another destination.
    let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
    let resp = request(s, "GET / HTTP/1.1\r\nHost: api.anthropic.com:80\r\nConnection: close\r\n\r\n");
    assert_eq!(status(&resp), 421, "{resp}");
    assert_eq!(up.count() + plain.count(), 0);
}

#[test]
fn path_scope_survives_server_normalisations() {
    let up = upstream(true, None);
    let cfg = CRED.replace("domains", "paths = [\"/v1/\"]\ndomains");
    let lk = Latchkey::start(Some(&up), &cfg, &[("ANTHROPIC_API_KEY", SECRET)]);
    let send = |path: &str| {
        let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
        let head = format!("GET {path} HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n");
        status(&request(tls(s, "api.anthropic.com"), &head))
    };
    assert_eq!(send("/v1/models"), 200);
    assert_eq!(up.requests()[0].header_all("x-api-key"), [SECRET], "in scope: injected");
    // nginx merges the slashes, Tomcat/Spring drop `;` parameters, some frameworks decode
    // twice: each of these is /admin to a real server.
    for path in ["/v1//../admin", "/v1/..;/admin", "/v1/%252e%252e/admin", "/v1/..%3B/admin"] {
        let before = up.count();
        let code = send(path);
        assert!(code == 200 || code == 400, "{path}: {code}");
        for seen in &up.requests()[before..] {
            assert!(seen.header_all("x-api-key").is_empty(), "{path} carried the credential: {seen:?}");
        }
    }
}

#[test]
fn method_tricks_do_not_carry_the_credential() {
    let (up, lk) = start("");
    let send = |lk: &Latchkey, line: &str, extra: &str| {
        let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
        let head = format!("{line} HTTP/1.1\r\nHost: api.anthropic.com\r\n{extra}Connection: close\r\n\r\n");
        request(tls(s, "api.anthropic.com"), &head)
    };
    // TRACE echoes the request, credential included: refused however it is spelt.
    for (line, extra) in [
        ("trace /", ""),
        ("TrAcK /", ""),
        ("GET /", "X-HTTP-Method-Override: trace\r\n"),
        ("POST /", "X-Method-Override: TRACE\r\nContent-Length: 0\r\n"),
        ("GET /?_method=TRACE", ""),
    ] {
        let resp = send(&lk, line, extra);
        assert_eq!(status(&resp), 403, "{line} {extra}: {resp}");
        assert!(resp.contains("x-latchkey-error: trace-refused"), "{resp}");
    }
    assert_eq!(up.count(), 0, "never forwarded");

    // methods = ["GET"]: an override naming another method is not a GET.
    let up = upstream(true, None);
    let cfg = CRED.replace("domains", "methods = [\"GET\"]\ndomains");
    let lk = Latchkey::start(Some(&up), &cfg, &[("ANTHROPIC_API_KEY", SECRET)]);
    assert_eq!(status(&send(&lk, "GET /v1/x", "")), 200);
    assert_eq!(up.requests()[0].header_all("x-api-key"), [SECRET], "a plain GET is injected");
    for (line, extra) in [
        ("GET /v1/x", "X-HTTP-Method-Override: DELETE\r\n"),
        ("GET /v1/x", "X-HTTP-Method: delete\r\n"),
        ("GET /v1/x", "X-Method-Override: GET\r\nX-Method-Override: DELETE\r\n"),
        ("GET /v1/x?_method=DELETE", ""),
        ("get /v1/x", ""),
    ] {
        let before = up.count();
        let resp = send(&lk, line, extra);
        assert_eq!(status(&resp), 200, "{line} {extra}: {resp}");
        let seen = &up.requests()[before];
        assert!(seen.header_all("x-api-key").is_empty(), "{line} {extra} carried the credential");
    }
}

const TWO_SLOTS: &str = r#"
[credentials.anthropic]
header = ["x-api-key", "Authorization: Bearer"]
value = "${ANTHROPIC_API_KEY}"
domains = ["api.anthropic.com"]
"#;

#[test]
fn request_trailers_cannot_add_a_credential_header_http1() {
    let up = upstream(true, None);
    let lk = Latchkey::start(Some(&up), TWO_SLOTS, &[("ANTHROPIC_API_KEY", SECRET)]);
    let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
    let resp = request(
        tls(s, "api.anthropic.com"),
        "POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nTransfer-Encoding: chunked\r\n\
         Trailer: x-api-key, authorization, x-kept\r\nConnection: close\r\n\r\n\
         5\r\nhello\r\n0\r\nX-Api-Key: attacker-key\r\nauthorization: Bearer attacker\r\nx-kept: yes\r\n\r\n",
    );
    assert_eq!(status(&resp), 200, "{resp}");
    let seen = &up.requests()[0];
    assert_eq!(seen.body, b"hello");
    assert_eq!(seen.header_all("x-api-key"), [SECRET], "one injected value");
    assert!(seen.trailer_all("x-api-key").is_empty(), "{seen:?}");
    assert!(seen.trailer_all("authorization").is_empty(), "{seen:?}");
    assert_eq!(seen.trailer_all("x-kept"), ["yes"], "other trailers pass");
}

#[test]
fn request_trailers_cannot_add_a_credential_header_http2() {
    let up = upstream_with(UpstreamOpts { tls: true, h2_only: true, ..Default::default() });
    let lk = Latchkey::start(Some(&up), TWO_SLOTS, &[("ANTHROPIC_API_KEY", SECRET)]);
    let trailers = [("x-api-key", "attacker-key"), ("authorization", "Bearer attacker"), ("x-kept", "yes")];
    assert_eq!(h2_post_with_trailers(lk.port, &trailers), 200);
    let seen = &up.requests()[0];
    assert_eq!(seen.body, b"hello");
    assert_eq!(seen.header_all("x-api-key"), [SECRET]);
    assert!(
        seen.trailer_all("x-api-key").is_empty() && seen.trailer_all("authorization").is_empty(),
        "{seen:?}"
    );
    assert_eq!(seen.trailer_all("x-kept"), ["yes"]);
}

#[test]
fn blocked_patterns_read_request_trailers() {
    let up = upstream_with(UpstreamOpts { tls: true, h2_only: true, ..Default::default() });
    let filters = "[proxy.filters]\nblocked_patterns = [\"rm -rf /\"]\n#END-PROXY\n";
    let lk = Latchkey::start(Some(&up), &format!("{filters}{CRED}"), &[("ANTHROPIC_API_KEY", SECRET)]);
    assert_eq!(h2_post_with_trailers(lk.port, &[("x-cmd", "rm -rf /")]), 403);
    let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
    let resp = request(
        tls(s, "api.anthropic.com"),
        "POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nTransfer-Encoding: chunked\r\n\
         Trailer: x-cmd\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nx-cmd: rm -rf /\r\n\r\n",
    );
    assert_eq!(status(&resp), 403, "{resp}");
    assert!(resp.contains("x-latchkey-error: blocked-pattern"), "{resp}");
    assert_eq!(up.count(), 0, "aborted before the upstream had the request");
}

/// An HTTP/2 client in a tunnel to api.anthropic.com: POST `hello`, then a trailing
/// HEADERS frame with `trailers`. Returns the status.
fn h2_post_with_trailers(port: u16, trailers: &[(&str, &str)]) -> u16 {
    let trailers: http::HeaderMap =
        trailers.iter().map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap())).collect();
    runtime().block_on(async move {
        let mut sender = common::h2::hyper_h2(port, "api.anthropic.com:443", "api.anthropic.com").await;
        let (mut tx, body) = http_body_util::Channel::<bytes::Bytes, std::convert::Infallible>::new(2);
        tokio::spawn(async move {
            tx.send_data(bytes::Bytes::from_static(b"hello")).await.unwrap();
            tx.send_trailers(trailers).await.unwrap();
        });
        let req = http::Request::post("https://api.anthropic.com/v1/messages").body(body).unwrap();
        sender.send_request(req).await.unwrap().status().as_u16()
    })
}

#[test]
fn suffix_confusion_and_lookalikes_get_nothing() {
    let up = upstream(true, None);
    let cfg = r#"[proxy]
intercept = "all"
#END-PROXY
[credentials.org]
header = "x-key"
value = "org-secret"
domains = [".example.org"]
"#;
    let lk = Latchkey::start(Some(&up), cfg, &[]);
    for host in ["evil-example.org", "example.org.evil.net"] {
        let (code, body) = lk.curl(&[&format!("https://{host}/")]);
        assert_eq!(code, 200, "{host}: {body}");
        assert!(echoed(&body, "x-key").is_empty(), "{host} must not get the credential");
    }
    let (_, body) = lk.curl(&["https://A.B.EXAMPLE.ORG./"]);
    assert_eq!(echoed(&body, "x-key"), ["org-secret"], "case and trailing dot normalise");
}

#[test]
fn ssrf_targets_are_refused_before_any_tls() {
    let (up, lk) = start("");
    let targets = [
        format!("127.0.0.1:{}", up.addr.port()),
        format!("0x7f.0.0.1:{}", up.addr.port()),
        format!("2130706433:{}", up.addr.port()),
        format!("127.1:{}", up.addr.port()),
        format!("[::ffff:127.0.0.1]:{}", up.addr.port()),
        format!("[::1]:{}", up.addr.port()),
        "169.254.169.254:80".to_string(),
        "169.254.169.254:443".to_string(),
        "[fd00:ec2::254]:80".to_string(),
        "10.0.0.1:443".to_string(),
        "localhost:443".to_string(),
    ];
    for t in &targets {
        let (_, head) = tunnel(lk.port, t);
        assert_eq!(status(&head), 403, "{t}: {head}");
        assert!(head.contains("x-latchkey-error: ssrf"), "{t}: {head}");
    }
    let resp = exchange(
        lk.port,
        b"GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status(&resp), 403, "{resp}");
    assert_eq!(up.count(), 0);
}

#[test]
fn own_sockets_are_refused_even_when_private_is_allowed() {
    let (_up, lk) = start("[proxy]\nallow_private = [\"127.0.0.0/8\"]\n#END-PROXY\n");
    let (_, head) = tunnel(lk.port, &format!("127.0.0.1:{}", lk.port));
    assert_eq!(status(&head), 403, "{head}");
    assert!(head.contains("own socket"), "{head}");
}

#[test]
fn redirects_are_returned_not_followed() {
    let up = upstream(true, None);
    let cfg = format!("[proxy]\nintercept = \"all\"\n#END-PROXY\n{CRED}");
    let lk = Latchkey::start(Some(&up), &cfg, &[("ANTHROPIC_API_KEY", SECRET)]);
    let (code, _) = lk.curl(&["https://api.anthropic.com/redirect?to=https://evil.example.net/steal"]);
    assert_eq!(code, 302);
    assert_eq!(up.count(), 1, "latchkey did not follow");
    // The client follows; the next hop matches on its own and gets nothing.
    let (code, body) =
        lk.curl(&["-L", "https://api.anthropic.com/redirect?to=https://evil.example.net/steal"]);
    assert_eq!(code, 200);
    assert_eq!(json(&body)["path"], "/steal");
    assert!(echoed(&body, "x-api-key").is_empty());
}

#[test]
fn filters_block_domains_allowlist_and_patterns() {
    let up = upstream(true, None);
    let cfg = format!(
        r#"
[proxy.filters]
blocked_domains = ["*.example.net"]
blocked_patterns = ["rm -rf /", "~DROP\\s+TABLE"]
allowlist_only = true
allowed_domains = ["api.anthropic.com", "other.example.com"]
#END-PROXY
{CRED}"#
    );
    let lk = Latchkey::start(Some(&up), &cfg, &[("ANTHROPIC_API_KEY", SECRET)]);
    let (_, head) = tunnel(lk.port, "evil.example.net:443");
    assert_eq!(status(&head), 403, "{head}");
    assert!(head.contains("blocked-domain"));
    let (_, head) = tunnel(lk.port, "evil.example.net:8443");
    assert_eq!(status(&head), 403, "blocklists cover every port: {head}");
    let (_, head) = tunnel(lk.port, "api.example.com:443");
    assert!(head.contains("not-allowlisted"), "{head}");

    let (code, body) = lk.curl(&["https://other.example.com/run?cmd=rm%20-rf%20/"]);
    assert_eq!(code, 403, "percent-decoded request line: {body}");
    let (code, _) = lk.curl(&["-H", "X-Q: DROP   TABLE users", "https://other.example.com/"]);
    assert_eq!(code, 403);
    // A pattern split across body chunks, far into a streamed upload.
    let mut big = vec![b'a'; 300_000];
    big.extend_from_slice(b"rm -rf /");
    big.extend(vec![b'b'; 300_000]);
    let file = lk.dir.path().join("upload.bin");
    std::fs::write(&file, &big).unwrap();
    let before = up.count();
    let (code, body) =
        lk.curl(&["--data-binary", &format!("@{}", file.display()), "https://other.example.com/upload"]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("blocked pattern"), "{body}");
    assert_eq!(up.count(), before, "the upstream never got a complete request");
    let (code, _) = lk.curl(&["--data", "harmless", "https://other.example.com/upload"]);
    assert_eq!(code, 200);
}

#[test]
fn malformed_targets_are_bad_requests() {
    let (_up, lk) = start("");
    for t in
        ["api.anthropic.com", "user@api.anthropic.com:443", "api..anthropic.com:443", "api.anthropic.com:0"]
    {
        let (_, head) = tunnel(lk.port, t);
        assert_eq!(status(&head), 400, "{t}: {head}");
    }
}

#[test]
fn clients_outside_allowed_clients_are_refused() {
    let (up, lk) = start("[proxy]\nallowed_clients = [\"10.0.0.0/8\"]\n#END-PROXY\n");
    let (_, head) = tunnel(lk.port, "api.anthropic.com:443");
    assert_eq!(status(&head), 403, "{head}");
    assert!(head.contains("client-not-allowed"));
    assert_eq!(up.count(), 0);
}

#[test]
fn oversized_heads_get_431() {
    let (_up, lk) = start("");
    let mut req = String::from("GET http://api.example.com/ HTTP/1.1\r\nHost: api.example.com\r\n");
    for i in 0..200 {
        req.push_str(&format!("x-h{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let resp = exchange(lk.port, req.as_bytes());
    assert_eq!(status(&resp), 431, "{resp}");
    let big = format!(
        "GET http://api.example.com/ HTTP/1.1\r\nHost: api.example.com\r\nx-big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let resp = exchange(lk.port, big.as_bytes());
    assert_eq!(status(&resp), 431, "{resp}");
}

#[test]
fn secrets_never_reach_logs_or_cli_output() {
    let up = upstream(true, None);
    let log = tempfile::tempdir().unwrap();
    let log_file = log.path().join("requests.log");
    let cfg = format!(
        "[proxy.logging]\nlog_requests = true\nlog_file = \"{}\"\n#END-PROXY\n{CRED}",
        log_file.display()
    );
    let lk = Latchkey::start(Some(&up), &cfg, &[("ANTHROPIC_API_KEY", SECRET)]);
    lk.curl(&["https://api.anthropic.com/v1/messages?key=query-secret"]);
    lk.curl(&["http://api.anthropic.com/v1/plain"]);
    let (_, head) = tunnel(lk.port, "169.254.169.254:80");
    assert_eq!(status(&head), 403);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let audit = std::fs::read_to_string(&log_file).unwrap();
    let lines: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{audit}");
    assert_eq!(lines[0]["decision"], "injected");
    assert_eq!(lines[0]["credential"], "anthropic");
    assert_eq!(lines[0]["path"], "/v1/messages", "no query string");
    assert_eq!(lines[1]["decision"], "blocked");
    assert_eq!(lines[1]["status"], 403);
    assert_eq!(lines[2]["method"], "CONNECT");
    for key in [
        "ts",
        "client",
        "agent",
        "method",
        "scheme",
        "host",
        "port",
        "path",
        "status",
        "decision",
        "reason",
        "credential",
        "bytes_up",
        "bytes_down",
        "duration_ms",
        "usage",
    ] {
        assert!(lines[0].get(key).is_some(), "audit key {key} missing");
    }
    let b64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(SECRET)
    };
    let explain =
        lk.cli(&["explain", "https://api.anthropic.com/v1/messages"], &[("ANTHROPIC_API_KEY", SECRET)]);
    let check = lk.cli(&["check"], &[("ANTHROPIC_API_KEY", SECRET)]);
    let env = lk.cli(&["env"], &[("ANTHROPIC_API_KEY", SECRET)]);
    let outputs = [
        audit,
        lk.stderr(),
        String::from_utf8_lossy(&explain.stdout).into_owned(),
        String::from_utf8_lossy(&check.stdout).into_owned(),
        String::from_utf8_lossy(&env.stdout).into_owned(),
    ];
    assert!(String::from_utf8_lossy(&explain.stdout).contains("anthropic"));
    for (i, o) in outputs.iter().enumerate() {
        assert!(
            !o.contains(SECRET) && !o.contains(&b64) && !o.contains("query-secret"),
            "output {i} leaks: {o}"
        );
    }
}

#[test]
fn leaf_certificates_name_exactly_the_tunnel_host() {
    let (_up, lk) = start("");
    let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
    let mut t = tls(s, "api.anthropic.com");
    use std::io::Write;
    t.write_all(b"GET / HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n").unwrap();
    let _ = t.flush();
    let chain = t.conn.peer_certificates().unwrap().to_vec();
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(san.general_names.len(), 1);
    assert_eq!(format!("{:?}", san.general_names[0]), "DNSName(\"api.anthropic.com\")");
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth && !eku.any);
    assert!(!leaf.is_ca());
    let ca_pem = std::fs::read_to_string(lk.dir.path().join("ca/ca.crt")).unwrap();
    let ca_der = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()
    };
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    assert!(leaf.verify_signature(Some(ca.public_key())).is_ok());
    assert_eq!(ca.basic_constraints().unwrap().unwrap().value.path_len_constraint, Some(0));
}

#[test]
fn upstream_trust_ignores_ssl_cert_file_and_names_the_failure() {
    let up = upstream(true, None);
    // A config without [upstream] ca_file: the private upstream CA is not trusted even
    // when SSL_CERT_FILE points at it.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca, &pki().ca_pem).unwrap();
    let cfg = format!(
        "[proxy]\nport = {port}\nca_dir = \"{}/ca\"\n[upstream.resolve]\n\"api.anthropic.com:443\" = \"{}\"\n{CRED}",
        dir.path().display(),
        up.addr
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, cfg).unwrap();
    set_mode(&path, 0o600);
    let ca_str = ca.to_str().unwrap().to_string();
    let lk = Latchkey::spawn(
        dir,
        port,
        path,
        &[("ANTHROPIC_API_KEY", SECRET), ("SSL_CERT_FILE", &ca_str), ("SSL_CERT_DIR", "/nonexistent")],
    );
    let (code, body) = lk.curl(&["https://api.anthropic.com/v1/messages"]);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("api.anthropic.com") && body.contains("certificate"), "{body}");
    assert_eq!(up.count(), 0);
}

#[test]
fn slow_upstreams_get_504() {
    let (up, lk) = start("timeout = 1\n#END-PROXY\n");
    let (code, body) = lk.curl(&["https://api.anthropic.com/slow"]);
    assert_eq!(code, 504, "{body}");
    assert!(body.starts_with("latchkey: "), "{body}");
    assert_eq!(up.count(), 1);
}

#[test]
fn core_dumps_are_disabled() {
    let (_up, lk) = start("");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", lk.child.id())).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert!(core.split_whitespace().skip(4).take(2).all(|v| v == "0"), "{core}");
}

#[test]
fn smuggling_forms_are_refused_and_never_forwarded() {
    let (up, lk) = start("");
    // CL+TE, in both header orders, in a tunnel and on the proxy port (absolute-form):
    // 400, the connection closes, and neither the request nor the one hidden in its
    // body reaches the upstream.
    let smuggled = "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n";
    let n = smuggled.len();
    for framing in [
        format!("Content-Length: {n}\r\nTransfer-Encoding: chunked"),
        format!("Transfer-Encoding: chunked\r\nContent-Length: {n}"),
    ] {
        let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
        let resp = request(
            tls(s, "api.anthropic.com"),
            &format!("POST / HTTP/1.1\r\nHost: api.anthropic.com\r\n{framing}\r\n\r\n{smuggled}"),
        );
        assert_eq!(status(&resp), 400, "{resp}");
        assert!(resp.contains("x-latchkey-error: smuggling"), "{resp}");
        assert_eq!(resp.matches("HTTP/1.1").count(), 1, "one answer, then closed: {resp}");
    }
    let resp = exchange(
        lk.port,
        format!(
            "POST http://example.com/ HTTP/1.1\r\nHost: example.com\r\nContent-Length: {n}\r\nTransfer-Encoding: chunked\r\n\r\n{smuggled}"
        )
        .as_bytes(),
    );
    assert_eq!(status(&resp), 400, "{resp}");
    assert_eq!(up.count(), 0, "{:?}", up.requests());

    // Two differing Content-Lengths: 400, nothing forwarded.
    let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
    let resp = request(
        tls(s, "api.anthropic.com"),
        "POST / HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: 4\r\nContent-Length: 5\r\nConnection: close\r\n\r\nabcde",
    );
    assert_eq!(status(&resp), 400, "{resp}");

    // Malformed chunking: 400 (the client's fault), not 502.
    let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
    let resp = request(
        tls(s, "api.anthropic.com"),
        "POST /sink HTTP/1.1\r\nHost: api.anthropic.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab\r\nzz\r\n",
    );
    assert_eq!(status(&resp), 400, "{resp}");
    assert!(resp.contains("request body"), "{resp}");
    assert!(up.requests().iter().all(|r| r.path != "/smuggled"));

    // A well-framed pipeline after a chunked request still works request by request.
    let (s, _) = tunnel(lk.port, "api.anthropic.com:443");
    let resp = request(
        tls(s, "api.anthropic.com"),
        "POST /a HTTP/1.1\r\nHost: api.anthropic.com\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
         GET /b HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.matches("HTTP/1.1 200").count(), 2, "{resp}");
}

#[test]
fn via_is_added_both_ways() {
    let (up, lk) = start("");
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-H",
            "Via: 1.0 corp-gateway",
            "-x",
            &lk.proxy_url(),
            "--cacert",
        ])
        .arg(lk.bundle())
        .arg("https://api.anthropic.com/v1/messages")
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(head.contains("via: 1.1 latchkey"), "{head}");
    assert_eq!(up.requests()[0].header_all("via"), ["1.0 corp-gateway, 1.1 latchkey"]);
}

#[test]
fn one_client_cannot_hold_every_connection() {
    use std::io::Read;
    let (_up, lk) = start("[proxy.limits]\nmax_connections_per_client = 2\n#END-PROXY\n");
    // Let the harness's readiness probe release its slot first.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let a = common::raw::connect(lk.port);
    let b = common::raw::connect(lk.port);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut c = common::raw::connect(lk.port);
    c.set_read_timeout(Some(std::time::Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 1];
    let closed = match c.read(&mut buf) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "the third connection is closed at once, not left waiting");
    drop((a, b));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let resp = exchange(lk.port, b"GET /ca.crt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(status(&resp), 200, "freed slots are usable again");
}

#[test]
fn open_tunnels_count_against_the_connection_cap() {
    use std::io::Read;
    let (_up, lk) = start("[proxy.limits]\nmax_connections_per_client = 2\n#END-PROXY\n");
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Two tunnels, one intercepted and one blind, stay open after their CONNECT.
    let (a, head_a) = tunnel(lk.port, "api.anthropic.com:443");
    let (b, head_b) = tunnel(lk.port, "other.example.com:443");
    assert!(head_a.starts_with("HTTP/1.1 200") && head_b.starts_with("HTTP/1.1 200"), "{head_a}{head_b}");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut c = common::raw::connect(lk.port);
    c.set_read_timeout(Some(std::time::Duration::from_secs(3))).unwrap();
    let closed = match c.read(&mut [0u8; 1]) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "a third connection while two tunnels are open is refused");
    drop((a, b));
}

#[test]
fn mlock_locks_memory_or_refuses_to_start() {
    let up = upstream(true, None);
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let cfg = common::write_config(
        dir.path(),
        port,
        Some(up.addr),
        &format!("[proxy]\nmlock = true\n#END-PROXY\n{CRED}"),
    );
    let mut child = common::latchkey_cmd(dir.path(), &[("ANTHROPIC_API_KEY", SECRET)])
        .args(["run", "--config"])
        .arg(&cfg)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            // Only acceptable exit: the locked-memory limit, said plainly.
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            assert_eq!(status.code(), Some(1), "{err}");
            assert!(err.contains("mlockall failed") && err.contains("RLIMIT_MEMLOCK"), "{err}");
            return;
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "neither started nor refused");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let locked: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(locked > 1024, "VmLck {locked} kB");
}

#[test]
fn slow_heads_are_cut_but_idle_keep_alive_lasts() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let limits = "[proxy.limits]\nheader_read_timeout = 1\nidle_timeout = 4\n#END-PROXY\n";
    let (_up, lk) = start(limits);
    let closed_within = |s: &mut std::net::TcpStream, limit: Duration| {
        let t0 = Instant::now();
        s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        let mut b = [0u8; 256];
        let n = loop {
            match s.read(&mut b) {
                Ok(n) if n > 0 && b[..n].starts_with(b"HTTP/1.1 408") => continue,
                r => break r,
            }
        };
        assert!(matches!(n, Ok(0)) || n.is_err(), "expected a close, got {n:?}");
        let took = t0.elapsed();
        assert!(took < limit, "closed after {took:?}");
        took
    };
    // Slowloris: a head that never ends, and a connection that never starts one.
    let mut slow = common::raw::connect(lk.port);
    slow.write_all(b"GET /ca.crt HTTP/1.1\r\nHost: x\r\n").unwrap();
    closed_within(&mut slow, Duration::from_millis(3000));
    let mut silent = common::raw::connect(lk.port);
    closed_within(&mut silent, Duration::from_millis(3000));

    // Idle keep-alive: longer than the head limit, shorter than the idle limit.
    let mut s = common::raw::connect(lk.port);
    let get = b"GET /ca.crt HTTP/1.1\r\nHost: x\r\n\r\n";
    let read_response = |s: &mut std::net::TcpStream| {
        let mut got = Vec::new();
        let mut b = [0u8; 4096];
        while !got.windows(9).any(|w| w == b"-----END ") {
            let n = s.read(&mut b).unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&b[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    s.write_all(get).unwrap();
    assert!(read_response(&mut s).starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_millis(2500));
    s.write_all(get).unwrap();
    assert!(read_response(&mut s).starts_with("HTTP/1.1 200"), "still open after 2.5 s idle");
    // Past the idle limit it is closed.
    let took = closed_within(&mut s, Duration::from_millis(7000));
    assert!(took > Duration::from_millis(2500), "idle closed too early: {took:?}");
}

#[test]
fn a_tunnel_stops_at_its_byte_cap() {
    let (_up, lk) = start("[proxy.limits]\nmax_tunnel_bytes = 200000\n#END-PROXY\n");
    let fetch = |url: &str| {
        std::process::Command::new("curl")
            .args([
                "-sS",
                "-k",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download}",
                "-x",
                &lk.proxy_url(),
                "--cacert",
            ])
            .arg(lk.bundle())
            .arg(url)
            .output()
            .unwrap()
    };
    // Intercepted (a credential applies) and blind (none does): both are cut.
    for host in ["api.anthropic.com", "other.example.com"] {
        let small = fetch(&format!("https://{host}/source?bytes=50000"));
        assert!(small.status.success(), "{host}: {}", String::from_utf8_lossy(&small.stderr));
        assert_eq!(String::from_utf8_lossy(&small.stdout), "50000");
        let big = fetch(&format!("https://{host}/source?bytes=1000000"));
        assert!(!big.status.success(), "{host}: a 1 MB download through a 200 kB cap");
        let got: u64 = String::from_utf8_lossy(&big.stdout).parse().unwrap_or(0);
        assert!(got < 200_000, "{host}: {got} bytes came through");
    }
}
