//! Outbound scanning (`[proxy.dlp]`, docs/dlp.md) through the real binary: the real
//! Anthropic Python SDK pasting a `.env` into a prompt (redacted, or refused), the same
//! secret hidden every way an agent could send it (split across HTTP/2 DATA frames,
//! base64, JSON-escaped, URL-encoded in a query, gzip, a fragmented WebSocket message),
//! latchkey's own secret refused whatever `action` says, and an allowed token untouched.

mod common;

use std::io::Write;
use std::process::Command;

use base64::Engine;
use common::*;

/// Made-up values in the bundled formats (none is a real credential).
const AWS_ID: &str = "AKIAZ7QWERTY2UIOPLKJ";
const AWS_SECRET: &str = "Zx9Qp2Lm7Vb4Nc8Rt1Yw6Ks3Hd5Gf0Ja2Ue7IoPq";
const GITHUB: &str = "ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5";
/// latchkey's own credential (the fake Anthropic API expects it).
const OWN: &str = "sk-ant-api03-OWNliveSECRETdlp0123456789";

fn dotenv() -> String {
    format!(
        "DATABASE_URL=postgres://localhost/app\nAWS_ACCESS_KEY_ID={AWS_ID}\nAWS_SECRET_ACCESS_KEY={AWS_SECRET}\n"
    )
}

fn dlp(action: &str, extra: &str) -> String {
    format!("[proxy.dlp]\nenabled = true\naction = \"{action}\"\n{extra}#END-PROXY\n")
}

const ANTHROPIC: &str = "[credentials.anthropic]\nheader = \"x-api-key\"\nvalue = \"${ANTHROPIC_API_KEY}\"\ndomains = [\"api.anthropic.com\"]\n";

/// The fake Messages API, and latchkey in front of it with `action`.
fn anthropic_setup(action: &str) -> (PyServer, Latchkey, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("up.crt"), dir.path().join("up.key"));
    std::fs::write(&cert, &pki().cert_pem).unwrap();
    std::fs::write(&key, &pki().key_pem).unwrap();
    let log = dir.path().join("fake.log");
    let mut cmd = py("anthropic_fake.py");
    cmd.arg(&cert).arg(&key).arg(OWN).arg(&log);
    let (server, addr) = python_upstream(cmd);
    let port = free_port();
    let logging = format!(
        "[proxy.logging]\nlog_requests = true\nlog_file = \"{}\"\n",
        dir.path().join("requests.log").display()
    );
    let body = format!("{logging}{}{ANTHROPIC}", dlp(action, ""));
    let config = write_config(dir.path(), port, Some(addr), &body);
    let lk = Latchkey::spawn(dir, port, config, &[("ANTHROPIC_API_KEY", OWN)]);
    (server, lk, log)
}

fn run_sdk(lk: &Latchkey) -> String {
    let env_file = lk.dir.path().join("dot.env");
    std::fs::write(&env_file, dotenv()).unwrap();
    let out = py("dlp_anthropic.py")
        .env("PROXY", lk.proxy_url())
        .env("BUNDLE", lk.bundle())
        .env("ENV_FILE", &env_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the SDK failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lk.stderr()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_anthropic_sdk_prompt_is_redacted_and_stays_valid_json() {
    let (_server, lk, fake_log) = anthropic_setup("redact");
    let out = run_sdk(&lk);
    assert_eq!(out.trim(), "hi from the fake API", "{}", lk.stderr());
    let line = wait_for_text(&fake_log, "/v1/messages");
    let seen: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert_eq!(seen["key_ok"], true, "the credential is injected as usual");
    let body: serde_json::Value =
        serde_json::from_str(seen["body"].as_str().unwrap()).expect("valid JSON upstream");
    let prompt = body["messages"][0]["content"].as_str().unwrap();
    assert!(!prompt.contains(AWS_ID) && !prompt.contains(AWS_SECRET), "{prompt}");
    let masked = format!("AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\n", "*".repeat(20), "*".repeat(40));
    assert!(prompt.ends_with(&masked), "masked in place, same length: {prompt}");
    assert!(prompt.contains("DATABASE_URL=postgres://localhost/app"), "the rest is untouched");
    assert_eq!(body["messages"][2]["content"], "Thanks.");
    // The request log names the rule and the count, never the text.
    let logged = wait_for_text(&lk.dir.path().join("requests.log"), "\"dlp\"");
    assert!(logged.contains(r#""dlp":{"action":"redact","rules":{"aws-access-key":1}}"#), "{logged}");
    let all = format!("{logged}{}", lk.stderr());
    assert!(!all.contains(AWS_ID) && !all.contains(AWS_SECRET), "{all}");
}

#[test]
fn the_anthropic_sdk_gets_403_naming_the_rule_with_block() {
    let (_server, lk, fake_log) = anthropic_setup("block");
    let out = run_sdk(&lk);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["error 403", "dlp"], "{out}");
    assert!(lines[2].starts_with("latchkey: ") && lines[2].contains("aws-access-key"), "{out}");
    assert!(!out.contains(AWS_ID));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let seen = std::fs::read_to_string(&fake_log).unwrap_or_default();
    assert!(!seen.contains("/v1/messages"), "nothing reached the API: {seen}");
}

/// The echo upstream behind every test host, and latchkey with `proxy_extra`.
fn echo_setup(proxy_extra: &str, rest: &str) -> (Upstream, Latchkey) {
    let up = upstream(true, None);
    let lk = Latchkey::start(Some(&up), &format!("{proxy_extra}{rest}"), &[("ANTHROPIC_API_KEY", OWN)]);
    (up, lk)
}

fn post(lk: &Latchkey, url: &str, body: &[u8], headers: &[&str]) -> (u16, String) {
    let file = lk.dir.path().join("body.bin");
    std::fs::write(&file, body).unwrap();
    let mut args = vec!["-X", "POST", "--data-binary"];
    let at = format!("@{}", file.display());
    args.push(&at);
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(url);
    lk.curl(&args)
}

fn assert_refused(status: u16, body: &str, what: &str, up: &Upstream) {
    assert_eq!(status, 403, "{what}: {body}");
    assert!(body.starts_with("latchkey: ") && body.contains("aws-access-key"), "{what}: {body}");
    assert_eq!(up.count(), 0, "{what}: nothing reached the upstream");
}

#[test]
fn every_encoding_of_the_secret_is_caught() {
    let (up, lk) = echo_setup(&dlp("block", ""), "");
    let env = dotenv();
    let url = "https://api.example.com/v1/upload";

    let b64 = base64::engine::general_purpose::STANDARD.encode(&env);
    let (s, b) = post(&lk, url, format!(r#"{{"file":"{b64}"}}"#).as_bytes(), &[]);
    assert_refused(s, &b, "base64", &up);

    let escaped: String = env.chars().map(|c| format!("\\u{:04x}", c as u32)).collect();
    let (s, b) = post(&lk, url, format!(r#"{{"content":"{escaped}"}}"#).as_bytes(), &[]);
    assert_refused(s, &b, "JSON \\u-escaped", &up);
    let json = serde_json::json!({ "content": env }).to_string();
    let (s, b) = post(&lk, url, json.as_bytes(), &["Content-Type: application/json"]);
    assert_refused(s, &b, "JSON-escaped newlines", &up);

    let query: String = env.bytes().map(|c| format!("%{c:02X}")).collect();
    let (s, b) = lk.curl(&[&format!("https://api.example.com/search?q={query}")]);
    assert_refused(s, &b, "URL-encoded query", &up);

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(env.as_bytes()).unwrap();
    let (s, b) = post(&lk, url, &gz.finish().unwrap(), &["Content-Encoding: gzip"]);
    assert_refused(s, &b, "gzip body", &up);
    let (s, b) = post(&lk, url, b"\x1f\x8b\x08\x00 not really gzip", &["Content-Encoding: gzip"]);
    assert_eq!((s, up.count()), (403, 0), "a body that does not decode is refused: {b}");
    assert!(b.contains("cannot be scanned"), "{b}");

    // Split across two HTTP/2 DATA frames, inside the key id.
    let body = serde_json::json!({ "prompt": env }).to_string();
    let cut = body.find(AWS_ID).unwrap() + 9;
    let out = Command::new("python3")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/h2_split.py"))
        .args([&lk.port.to_string(), "api.example.com", "/v1/upload", &cut.to_string()])
        .stdin(
            std::fs::File::open({
                let p = lk.dir.path().join("h2body");
                std::fs::write(&p, &body).unwrap();
                p
            })
            .unwrap(),
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("403\nlatchkey: "),
        "HTTP/2 split: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(up.count(), 0);

    // Nothing in it: every one of these forms passes.
    let (s, _) = post(&lk, url, br#"{"content":"AKIA is how AWS key ids start"}"#, &[]);
    assert_eq!((s, up.count()), (200, 1));
}

#[test]
fn a_websocket_message_fragmented_in_three_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("up.crt"), dir.path().join("up.key"));
    std::fs::write(&cert, &pki().cert_pem).unwrap();
    std::fs::write(&key, &pki().key_pem).unwrap();
    let mut cmd = py("ws_server.py");
    cmd.args([&cert, &key]).arg("ws-REAL-token");
    let (_server, addr) = python_upstream(cmd);
    let port = free_port();
    let cfg = "[credentials.ws]\nauth_type = \"bearer\"\nvalue = \"${WS_TOKEN}\"\ndomains = [\"api.example.com\"]\n";
    let config = write_config(dir.path(), port, Some(addr), &format!("{}{cfg}", dlp("block", "")));
    let lk = Latchkey::spawn(dir, port, config, &[("WS_TOKEN", "ws-REAL-token")]);
    let client = |message: &str| {
        let out = py("ws_fragments.py")
            .env("BUNDLE", lk.bundle())
            .env("PROXY", lk.proxy_url())
            .env("MESSAGE", message)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    assert_eq!(
        client("a harmless message in three parts").trim(),
        "echo: a harmless message in three parts\necho: hello"
    );
    let out = client(&format!("my env: {}", dotenv()));
    assert_eq!(out.trim(), "closed", "{out}\n{}", lk.stderr());
    assert!(lk.stderr().contains("aws-access-key:1"), "{}", lk.stderr());
}

#[test]
fn latchkeys_own_secret_is_refused_anywhere_even_with_warn() {
    let (up, lk) = echo_setup(&dlp("warn", ""), ANTHROPIC);
    let url = "https://api.example.com/v1/paste";
    let (s, b) = post(&lk, url, format!("here: {OWN}").as_bytes(), &[]);
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("latchkey-secret"), "{b}");
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("k={OWN}"));
    let (s, _) = lk.curl(&["-H", &format!("X-Note: {b64}"), url]);
    assert_eq!(s, 403, "in a header, base64");
    let (s, _) = lk.curl(&[&format!("{url}?k={}", OWN.replace('-', "%2D"))]);
    assert_eq!(s, 403, "in the query, URL-encoded");
    // Even to its own host, outside its slot; in its slot it is overwritten.
    let (s, _) =
        post(&lk, "https://api.anthropic.com/v1/messages", format!("{{\"k\":\"{OWN}\"}}").as_bytes(), &[]);
    assert_eq!(s, 403, "in the body to its own host");
    let (s, _) = lk.curl(&["-H", &format!("x-api-key: {OWN}"), "https://api.anthropic.com/v1/models"]);
    assert_eq!(s, 200, "in the credential's own slot");
    assert_eq!(up.count(), 1);
    // With warn, a bundled rule's match is logged and forwarded.
    let (s, _) = post(&lk, url, dotenv().as_bytes(), &[]);
    assert_eq!((s, up.count()), (200, 2));
    assert!(up.requests()[1].body.windows(AWS_ID.len()).any(|w| w == AWS_ID.as_bytes()));
    assert!(lk.stderr().contains("aws-access-key:1"));
}

#[test]
fn an_allowed_github_token_passes_untouched_and_nowhere_else() {
    let allow = "allow = [{ rule = \"github-pat\", hosts = [\"api.github.com\", \"github.com\"] }]\n";
    let (up, lk) = echo_setup(&dlp("block", allow), "");
    let body = format!("{{\"token\":\"{GITHUB}\"}}");
    let (s, _) = post(&lk, "https://api.github.com/user/repos", body.as_bytes(), &[]);
    assert_eq!(s, 200);
    assert_eq!(up.requests()[0].body, body.as_bytes(), "byte for byte");
    let (s, b) = post(&lk, "https://api.example.com/collect", body.as_bytes(), &[]);
    assert_eq!((s, up.count()), (403, 1), "{b}");
    assert!(b.contains("github-pat"), "{b}");
}

#[test]
fn bad_dlp_config_is_an_error_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    for (extra, key) in [
        ("action = \"mask\"\n", "proxy.dlp.action"),
        ("allow = [{ rule = \"no-such-rule\", hosts = [\"x.com\"] }]\n", "proxy.dlp.allow"),
        ("allow = [{ rule = \"latchkey-secret\", hosts = [\"x.com\"] }]\n", "proxy.dlp.allow"),
        ("[[proxy.dlp.rule]]\nid = \"jwt\"\nregex = \"x+\"\n", "proxy.dlp.rule"),
    ] {
        let path = write_config(
            dir.path(),
            free_port(),
            None,
            &format!("[proxy.dlp]\nenabled = true\n{extra}#END-PROXY\n"),
        );
        let out = latchkey_cmd(dir.path(), &[]).args(["check", "--config"]).arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra}: {err}");
        assert!(err.contains(key), "{extra}: {err}");
    }
}

#[test]
fn past_hold_bytes_the_secret_is_still_never_sent() {
    let filler = |n: usize| "lorem ipsum dolor sit amet ".repeat(n / 27);
    let body = format!("{}{}{}", filler(200_000), dotenv(), filler(50_000));
    let hold = "hold_bytes = 65536\n";
    let (up, lk) = echo_setup(&dlp("block", hold), "");
    let (s, b) = post(&lk, "https://api.example.com/v1/upload", body.as_bytes(), &[]);
    assert_eq!(s, 403, "{b}");
    assert!(b.contains("aws-access-key"), "{b}");
    for seen in up.requests() {
        assert!(!String::from_utf8_lossy(&seen.body).contains(AWS_ID), "the upstream got the key");
    }
    let (up, lk) = echo_setup(&dlp("redact", hold), "");
    let (s, _) = post(&lk, "https://api.example.com/v1/upload", body.as_bytes(), &[]);
    assert_eq!(s, 200);
    let got = String::from_utf8(up.requests()[0].body.clone()).unwrap();
    assert_eq!(got.len(), body.len());
    assert!(!got.contains(AWS_ID) && !got.contains(AWS_SECRET));
    assert_eq!(got.replace('*', ""), body.replace(AWS_ID, "").replace(AWS_SECRET, ""));
}

#[test]
fn check_says_dlp_is_advisory_without_enforced_egress() {
    let (_up, lk) = echo_setup(&dlp("block", ""), "");
    let out = lk.cli(&["check"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[proxy.dlp] is advisory unless egress is enforced"), "{text}");
}

/// `body` compressed by Python's `brotli` (Google's encoder) or `zstandard` (the zstd
/// library): encoders latchkey does not share code with.
fn compress(coding: &str, body: &[u8]) -> Vec<u8> {
    let code = match coding {
        "br" => "import brotli,sys; sys.stdout.buffer.write(brotli.compress(sys.stdin.buffer.read()))",
        _ => {
            "import zstandard,sys; sys.stdout.buffer.write(zstandard.ZstdCompressor().compress(sys.stdin.buffer.read()))"
        }
    };
    let mut child = Command::new("python3")
        .args(["-c", code])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python's {coding} encoder (tests/requirements.txt: brotli, zstandard): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `Content-Encoding: br` and `zstd` bodies through the real binary: decoded, scanned and
/// acted on per `action` — `block` refuses, `redact` refuses too (a compressed body
/// cannot be masked in place), `warn` forwards the compressed bytes unchanged — and a
/// body without a secret goes through byte for byte.
#[test]
fn br_and_zstd_bodies_are_decoded_and_scanned() {
    let url = "https://api.example.com/v1/upload";
    let clean = b"{\"content\":\"nothing to see here\"}";
    for coding in ["br", "zstd"] {
        let secret = compress(coding, dotenv().as_bytes());
        let header = format!("Content-Encoding: {coding}");
        let (up, lk) = echo_setup(&dlp("block", ""), "");
        let (s, b) = post(&lk, url, &secret, &[&header]);
        assert_refused(s, &b, coding, &up);
        let plain = compress(coding, clean);
        let (s, b) = post(&lk, url, &plain, &[&header]);
        assert_eq!((s, up.count()), (200, 1), "{coding} without a secret: {b}");
        assert_eq!(up.requests()[0].body, plain, "{coding}: the compressed bytes go upstream");

        let (up, lk) = echo_setup(&dlp("redact", ""), "");
        let (s, b) = post(&lk, url, &secret, &[&header]);
        assert_eq!((s, up.count()), (403, 0), "{coding}, redact: {b}");
        assert!(b.contains("cannot be masked in place"), "{coding}: {b}");
        assert!(lk.stderr().contains("aws-access-key:1"), "{coding}: {}", lk.stderr());

        let (up, lk) = echo_setup(&dlp("warn", ""), "");
        let (s, _) = post(&lk, url, &secret, &[&header]);
        assert_eq!((s, up.count()), (200, 1), "{coding}, warn");
        assert_eq!(up.requests()[0].body, secret, "{coding}, warn: forwarded unchanged");
        assert!(lk.stderr().contains("aws-access-key:1"), "{coding}: {}", lk.stderr());
    }
}
