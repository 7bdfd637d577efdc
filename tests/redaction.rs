//! Response redaction (invariant 5) through the real binary: an upstream that reflects
//! the injected credential never shows it to the client, in any form or chunking.

mod common;
use common::*;
use std::io::Write;

const SECRET: &str = "sk-ant-api03-REALsecretVALUE_0123456789";

fn start() -> (Upstream, Latchkey) {
    let up = upstream(true, None);
    // The harness turns redaction off for the other suites; here it is on, as by default.
    let cfg = "redact_responses = true\n#END-PROXY\n[credentials.anthropic]\nheader = \"x-api-key\"\nvalue = \"${ANTHROPIC_API_KEY}\"\ndomains = [\"api.anthropic.com\"]\n";
    let lk = Latchkey::start(Some(&up), cfg, &[("ANTHROPIC_API_KEY", SECRET)]);
    (up, lk)
}

/// curl with headers in the output.
fn fetch(lk: &Latchkey, url: &str, extra: &[&str]) -> (u16, String) {
    let mut args = vec!["-D", "-"];
    args.extend_from_slice(extra);
    args.push(url);
    lk.curl(&args)
}

fn assert_clean(text: &str) {
    use base64::Engine;
    assert!(!text.contains(SECRET), "secret leaked: {text}");
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("xy{SECRET}"));
    assert!(!text.contains(&b64[4..b64.len() - 4]), "base64 leaked: {text}");
}

#[test]
fn reflected_secret_is_masked_in_body_and_headers() {
    let (up, lk) = start();
    let (code, text) = fetch(&lk, "https://api.anthropic.com/reflect/plain", &[]);
    assert_eq!(code, 200, "{text}");
    assert_clean(&text);
    assert!(text.contains(&format!("you sent {}", "*".repeat(SECRET.len()))), "same-length mask: {text}");
    assert!(text.to_ascii_lowercase().contains(&format!("x-echo: {}", "*".repeat(SECRET.len()))), "{text}");
    // The upstream did get the real key: masking is only on the way back.
    assert_eq!(up.requests().len(), 0, "reflect endpoints are not logged");
}

#[test]
fn a_secret_split_across_chunks_is_still_masked() {
    let (_up, lk) = start();
    let (code, text) = fetch(&lk, "https://api.anthropic.com/reflect/split", &[]);
    assert_eq!(code, 200);
    assert_clean(&text);
    assert!(text.contains(&format!("before {} after", "*".repeat(SECRET.len()))), "{text}");
}

#[test]
fn sse_and_base64_reflections_are_masked() {
    let (_up, lk) = start();
    let (_, text) = fetch(&lk, "https://api.anthropic.com/reflect/sse", &["-N"]);
    assert_clean(&text);
    assert!(text.contains("data: first") && text.contains(&format!("data: {}", "*".repeat(SECRET.len()))));
    let (_, text) = fetch(&lk, "https://api.anthropic.com/reflect/base64", &[]);
    assert_clean(&text);
    // HTTP/2 to the client as well.
    let (_, text) = fetch(&lk, "https://api.anthropic.com/reflect/split", &["--http2"]);
    assert_clean(&text);
}

#[test]
fn compressed_responses_are_refused_and_identity_requested() {
    let (up, lk) = start();
    let (code, text) = lk.curl(&["-H", "accept-encoding: gzip", "https://api.anthropic.com/reflect/gzip"]);
    assert_eq!(code, 502, "{text}");
    assert!(text.contains("compressed"), "{text}");
    assert_clean(&text);
    lk.curl(&["-H", "accept-encoding: gzip, br", "https://api.anthropic.com/v1/messages"]);
    assert_eq!(up.requests().last().unwrap().header_all("accept-encoding"), ["identity"]);
}

#[test]
fn trace_is_refused_on_credentialed_routes() {
    let (up, lk) = start();
    let (code, text) = lk.curl(&["-X", "TRACE", "https://api.anthropic.com/"]);
    assert_eq!(code, 403, "{text}");
    assert_eq!(up.count(), 0);
}

#[test]
fn values_rotated_out_stay_masked() {
    let up = upstream(true, None);
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("key");
    std::fs::write(&file, "first-rotating-secret-AAAA").unwrap();
    set_mode(&file, 0o600);
    let cfg = format!(
        "redact_responses = true\n#END-PROXY\n[credentials.rot]\nheader = \"x-api-key\"\nvalue_file = \"{}\"\ndomains = [\"api.anthropic.com\"]\n",
        file.display()
    );
    let lk = Latchkey::start(Some(&up), &cfg, &[]);
    let (_, text) = lk.curl(&["https://api.anthropic.com/reflect/query?first-rotating-secret-AAAA"]);
    assert!(!text.contains("first-rotating-secret-AAAA"), "{text}");
    std::fs::write(&file, "second-rotating-secret-BBBB").unwrap();
    // The file is read again within FILE_RECHECK (1 s): until then the first value is
    // still the one sent, and nothing has rotated yet.
    let sent = |up: &Upstream| up.requests().last().map(|r| r.header_all("x-api-key")).unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, text) = lk.curl(&["https://api.anthropic.com/v1/rotation"]);
        assert!(!text.contains("second-rotating-secret-BBBB"), "{text}");
        if sent(&up) == ["second-rotating-secret-BBBB"] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the new value was never sent: {:?}", sent(&up));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (_, text) = lk.curl(&["https://api.anthropic.com/reflect/plain"]);
    assert!(text.starts_with("you sent ") && !text.contains("second-rotating-secret-BBBB"), "{text}");
    let (_, text) = lk.curl(&["https://api.anthropic.com/reflect/query?first-rotating-secret-AAAA"]);
    assert!(!text.contains("first-rotating-secret-AAAA"), "the old value is still masked: {text}");
    assert!(text.contains("query was ****"), "{text}");
}

/// What a response is masked for is the config in force, also on a connection opened
/// before it: a reload that names this host for another credential masks that
/// credential's secret on the next request of an open tunnel (a connection keeps the
/// credentials naming its host per config, `proxy::route`).
#[test]
fn a_credential_a_reload_adds_is_masked_on_a_connection_already_open() {
    const SECOND: &str = "second-credential-secret-CCCC";
    let up = upstream(true, None);
    let first = "[credentials.anthropic]\nheader = \"x-api-key\"\nvalue = \"${ANTHROPIC_API_KEY}\"\ndomains = [\"api.anthropic.com\"]\n";
    let second = "[credentials.second]\nheader = \"x-second-key\"\nvalue = \"${SECOND_KEY}\"\ndomains = [\"api.anthropic.com\"]\n";
    let config = |creds: &str| format!("redact_responses = true\n#END-PROXY\n{creds}");
    let env = [("ANTHROPIC_API_KEY", SECRET), ("SECOND_KEY", SECOND)];
    let lk = Latchkey::start(Some(&up), &config(first), &env);
    let (tunnel, _) = raw::tunnel(lk.port, "api.anthropic.com:443");
    let mut s = raw::tls(tunnel, "api.anthropic.com");
    let mut ask = || {
        write!(s, "GET /reflect/query?{SECOND} HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n").unwrap();
        read_response(&mut s)
    };
    let before = ask();
    // The body comes in chunks: "query was ", then the query.
    assert!(before.contains(&format!("\r\n{SECOND}\r\n")), "no credential of this value yet: {before}");

    lk.replace_config(|dir| write_config(dir, lk.port, Some(up.addr), &config(&format!("{first}{second}"))));
    wait_for_text(&lk.stderr_path, "reloaded");
    let after = ask();
    assert!(!after.contains(SECOND), "the open tunnel's next response: {after}");
    assert!(after.contains(&format!("\r\n{}\r\n", "*".repeat(SECOND.len()))), "{after}");
}

/// One response off a keep-alive stream: its head and body, by `Content-Length` or
/// chunked framing (read to the last chunk).
fn read_response<S: std::io::Read>(s: &mut S) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "the head ended early: {}", String::from_utf8_lossy(&got));
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    let length =
        head.lines().find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse().ok()));
    let body_start = got.len();
    loop {
        let done = match length {
            Some(n) => got.len() - body_start >= n,
            None => got.ends_with(b"\r\n0\r\n\r\n") || got[body_start..].starts_with(b"0\r\n\r\n"),
        };
        if done {
            return String::from_utf8_lossy(&got).into_owned();
        }
        assert_eq!(s.read(&mut byte).unwrap(), 1, "the body ended early: {}", String::from_utf8_lossy(&got));
        got.push(byte[0]);
    }
}
