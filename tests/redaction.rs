//! Response redaction (invariant 5) through the real binary: an upstream that reflects
//! the injected credential never shows it to the client, in any form or chunking.

mod common;
use common::*;

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
    let (_, text) = lk.curl(&["https://api.anthropic.com/reflect/query?first-rotating-secret-AAAA"]);
    assert!(!text.contains("first-rotating-secret-AAAA"), "the old value is still masked: {text}");
    assert!(text.contains("query was ****"), "{text}");
    let (_, text) = lk.curl(&["https://api.anthropic.com/reflect/plain"]);
    assert!(!text.contains("second-rotating-secret-BBBB"), "{text}");
}
