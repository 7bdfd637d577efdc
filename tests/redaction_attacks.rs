//! Attacks on response redaction through the real binary (issue 12, items 1 and 4–7):
//! an agent that guesses the secret through an echoing upstream and watches the
//! framing; escapes, status lines, header names, passed requests and content codings
//! that carried a secret past the redactor.

mod common;
use common::*;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::Arc;

const SECRET: &str = "sk-proj-Q7xLmN3pRt9VwZ2yB5cD8fGhJk4";

const CREDENTIAL: &str = "[credentials.anthropic]\nheader = \"x-api-key\"\nvalue = \"${ANTHROPIC_API_KEY}\"\ndomains = [\"api.anthropic.com\"]\n";

fn start_with(up: &Upstream, extra_credentials: &str) -> Latchkey {
    // The harness turns redaction off for the other suites; here it is on, as by default.
    let cfg = format!("redact_responses = true\n#END-PROXY\n{CREDENTIAL}{extra_credentials}");
    Latchkey::start(Some(up), &cfg, &[("ANTHROPIC_API_KEY", SECRET)])
}

/// The guesses an agent sends one character at a time: for several known prefixes, the
/// right next character and wrong ones, each behind `@` (so the guess is the tail of
/// what the upstream echoes).
fn guesses() -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for known in [3, 8, 12, 20, SECRET.len() - 2] {
        let prefix = &SECRET[..known];
        let right = SECRET.as_bytes()[known] as char;
        out.push((format!("@{prefix}{right}"), true));
        for wrong in ['A', 'z', '0', '_'].into_iter().filter(|c| *c != right).take(2) {
            out.push((format!("@{prefix}{wrong}"), false));
        }
    }
    out
}

/// DATA frame sizes of each echoed guess, over one HTTP/2 connection.
fn h2_frame_sizes(lk: &Latchkey, bodies: &[String]) -> Vec<Vec<usize>> {
    let port = lk.port;
    let bodies = bodies.to_vec();
    runtime().block_on(async move {
        let mut sender = h2::connect(port, "api.anthropic.com:443", "api.anthropic.com").await;
        let mut out = Vec::new();
        for b in bodies {
            let req = http::Request::builder()
                .method("POST")
                .uri("https://api.anthropic.com/echo-body")
                .header("x-api-key", "placeholder")
                .body(Full::new(Bytes::from(b)))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut body = resp.into_body();
            let mut sizes = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    sizes.push(data.len());
                }
            }
            out.push(sizes);
        }
        out
    })
}

/// Chunk sizes of one echoed guess over HTTP/1.1 (chunked response), and the body.
fn h1_chunk_sizes(lk: &Latchkey, body: &str) -> (Vec<usize>, String) {
    let (stream, status) = raw::tunnel(lk.port, "api.anthropic.com:443");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let tls = raw::tls(stream, "api.anthropic.com");
    let reply = raw::request(
        tls,
        &format!(
            "POST /echo-body HTTP/1.1\r\nHost: api.anthropic.com\r\nx-api-key: placeholder\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    let (head, mut rest) = reply.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head: {reply}"));
    assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    let (mut sizes, mut text) = (Vec::new(), String::new());
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size line");
        let n = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if n == 0 {
            break;
        }
        sizes.push(n);
        text.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    (sizes, text)
}

#[test]
fn an_echoed_guess_is_framed_the_same_whether_right_or_wrong() {
    let up = upstream(true, None);
    let lk = start_with(&up, "");
    let guesses = guesses();
    let bodies: Vec<String> = guesses.iter().map(|(g, _)| g.clone()).collect();
    let h2 = h2_frame_sizes(&lk, &bodies);
    let mut by_length: std::collections::BTreeMap<usize, (Vec<usize>, Vec<usize>, String)> =
        Default::default();
    let mut differ = Vec::new();
    for (((guess, right), frames), body) in guesses.iter().zip(&h2).zip(&bodies) {
        let (chunks, text) = h1_chunk_sizes(&lk, body);
        assert_eq!(text, format!("{body}\n"), "the echo itself is intact");
        eprintln!("guess {guess:<40} right={right:<5} h2 DATA {frames:?} h1 chunks {chunks:?}");
        let first =
            by_length.entry(guess.len()).or_insert_with(|| (frames.clone(), chunks.clone(), guess.clone()));
        if (&first.0, &first.1) != (frames, &chunks) {
            differ.push(format!("{:?} vs {guess:?}", first.2));
        }
    }
    assert!(differ.is_empty(), "framing tells right from wrong guesses: {differ:?}");
    // Masking is still complete: the whole secret echoed comes back masked.
    let (_, text) = h1_chunk_sizes(&lk, &format!("@{SECRET}"));
    assert_eq!(text, format!("@{}\n", "*".repeat(SECRET.len())));
}

/// A response head and body as bytes, closing the connection after it.
fn response(head: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{head}\r\nConnection: close\r\n\r\n").into_bytes();
    out.extend_from_slice(body);
    out
}

/// `text`, gzip-compressed by gzip(1).
fn gzip(text: &str) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("gzip")
        .args(["-c", "-n"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip(1) is needed for the compressed-response tests");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    child.wait_with_output().unwrap().stdout
}

/// Through the proxy over HTTP/1.1 with raw bytes: the whole answer as text.
fn raw_get(lk: &Latchkey, host: &str, request: &str) -> String {
    let (stream, status) = raw::tunnel(lk.port, &format!("{host}:443"));
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    raw::request(raw::tls(stream, host), request)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn a_unicode_escaped_secret_reaches_no_client_log_label_or_span() {
    // `"model":"sk-\u0070roj-…"`: one escaped character, a form no plain matcher knows.
    let escaped = SECRET.replacen('p', "\\u0070", 1);
    let all_escaped: String = SECRET.chars().map(|c| format!("\\u{:04X}", c as u32)).collect();
    let body = format!(
        r#"{{"id":"msg_1","model":"{escaped}","echo":"{all_escaped}","usage":{{"input_tokens":3,"output_tokens":4}}}}"#
    );
    let script: Script = Arc::new(move |_req: &ScriptedRequest| {
        response(
            &format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}", body.len()),
            body.as_bytes(),
        )
    });
    let up = scripted_upstream(script);
    let spans = tempfile::tempdir().unwrap();
    let spans_file = spans.path().join("spans.jsonl");
    let (_collector, collector) = python_upstream({
        let mut c = py("otlp_receiver.py");
        c.arg(&spans_file);
        c
    });
    let admin = free_port();
    let log = tempfile::tempdir().unwrap();
    let log_file = log.path().join("audit.jsonl");
    let cfg = format!(
        "redact_responses = true\n[proxy.logging]\nlog_requests = true\nlog_file = \"{}\"\n#END-PROXY\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n[telemetry]\notlp_endpoint = \"http://{collector}\"\n\
         capture_body_bytes = 4096\n{CREDENTIAL}",
        log_file.display()
    );
    let lk = Latchkey::start(Some(&up), &cfg, &[("ANTHROPIC_API_KEY", SECRET)]);
    let (code, body) = lk.curl(&["-X", "POST", "-d", "{}", "https://api.anthropic.com/v1/messages"]);
    assert_eq!(code, 200, "{body}");
    let decoded = json(&body);
    for field in ["model", "echo"] {
        let value = decoded[field].as_str().unwrap();
        assert!(!value.contains(&SECRET[8..]), "{field} decodes to the secret on the client: {value}");
    }
    wait_for("the request log line", || std::fs::read_to_string(&log_file).is_ok_and(|t| !t.is_empty()));
    let line = std::fs::read_to_string(&log_file).unwrap();
    let record = json(line.lines().next().unwrap());
    assert_eq!(record["usage"]["model"], "other", "{line}");
    assert_eq!(record["usage"]["input_tokens"], 3, "usage itself is still read");
    let token = std::fs::read_to_string(lk.dir.path().join("admin.token")).unwrap();
    let get = format!(
        "GET /metrics HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        token.trim()
    );
    let metrics = raw::exchange(admin, get.as_bytes());
    assert!(metrics.contains("model=\"other\""), "{metrics}");
    wait_for("a span", || std::fs::read_to_string(&spans_file).is_ok_and(|t| !t.is_empty()));
    let spans = std::fs::read_to_string(&spans_file).unwrap();
    let span = json(spans.lines().next().unwrap());
    assert_eq!(span["attributes"]["gen_ai.response.model"], "other", "{spans}");
    for text in [&line, &metrics, &spans, &lk.stderr()] {
        assert!(!text.contains(&SECRET[8..]) && !text.contains(&escaped), "secret leaked: {text}");
    }
}

#[test]
fn a_secret_in_the_status_line_or_a_header_name_is_not_passed() {
    let script: Script = Arc::new(|req: &ScriptedRequest| {
        // The header name arrives lowercased: a lowercase or hex secret survives that whole.
        response(
            &format!(
                "HTTP/1.1 401 bad key {cred}\r\n{cred}: 1\r\nX-Kept: yes\r\nContent-Length: 2",
                cred = req.credential
            ),
            b"no",
        )
    });
    let up = scripted_upstream(script);
    let lk = start_with(&up, "");
    let reply = raw_get(
        &lk,
        "api.anthropic.com",
        "GET /v1/models HTTP/1.1\r\nHost: api.anthropic.com\r\nx-api-key: placeholder\r\nConnection: close\r\n\r\n",
    );
    let status = reply.lines().next().unwrap_or("");
    assert!(status.starts_with("HTTP/1.1 401 "), "{reply}");
    assert!(
        !reply.to_ascii_lowercase().contains(&SECRET.to_ascii_lowercase()),
        "the secret, in any case, reached the client: {reply}"
    );
    assert!(status == "HTTP/1.1 401 Unauthorized" || status.contains("bad key ****"), "{status}");
    assert!(reply.to_ascii_lowercase().contains("x-kept: yes"), "other headers pass: {reply}");
}

#[test]
fn responses_to_passed_requests_from_a_credential_host_are_masked() {
    // A history endpoint: hands back the key some earlier request carried.
    let script: Script = Arc::new(|req: &ScriptedRequest| {
        let body = format!("{} history: x-api-key {SECRET}\n", req.path);
        response(&format!("HTTP/1.1 200 OK\r\nContent-Length: {}", body.len()), body.as_bytes())
    });
    let up = scripted_upstream(script);
    let cfg = "redact_responses = true\n#END-PROXY\n[credentials.anthropic]\nheader = \"x-api-key\"\nvalue = \"${ANTHROPIC_API_KEY}\"\ndomains = [\"api.anthropic.com\"]\npaths = [\"/v1/\"]\n";
    let lk = Latchkey::start(Some(&up), cfg, &[("ANTHROPIC_API_KEY", SECRET)]);
    for (path, extra) in
        [("/history", vec![]), ("/v1/messages", vec!["-H", "Origin: https://evil.example.net"])]
    {
        let mut args = extra.clone();
        let url = format!("https://api.anthropic.com{path}");
        args.push(&url);
        let (code, body) = lk.curl(&args);
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("history: x-api-key ****"), "{path}: {body}");
        assert!(!body.contains(SECRET), "passed request to {path} got the secret back: {body}");
    }
    let seen = up.requests();
    assert!(
        seen.iter().all(|r| r.header_all("x-api-key").is_empty()),
        "these requests were passed, not injected"
    );
    assert!(
        seen.iter().all(|r| r.header_all("accept-encoding") == ["identity"]),
        "identity asked for on every scanned response"
    );
}

#[test]
fn compressed_bodies_in_any_header_instance_are_refused() {
    let packed = gzip(&format!("the key is {SECRET}\n"));
    let chunked = {
        let mut c = format!("{:x}\r\n", packed.len()).into_bytes();
        c.extend_from_slice(&packed);
        c.extend_from_slice(b"\r\n0\r\n\r\n");
        c
    };
    let script: Script = Arc::new(move |req: &ScriptedRequest| match req.path.as_str() {
        "/double-content-encoding" => response(
            &format!(
                "HTTP/1.1 200 OK\r\nContent-Encoding: identity\r\nContent-Encoding: gzip\r\nContent-Length: {}",
                packed.len()
            ),
            &packed,
        ),
        "/content-encoding-list" => response(
            &format!(
                "HTTP/1.1 200 OK\r\nContent-Encoding: identity, gzip\r\nContent-Length: {}",
                packed.len()
            ),
            &packed,
        ),
        "/transfer-gzip-chunked" => response("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked", &chunked),
        _ => response("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip", &packed),
    });
    let up = scripted_upstream(script);
    let lk = start_with(&up, "");
    for path in [
        "/double-content-encoding",
        "/content-encoding-list",
        "/transfer-gzip-chunked",
        "/transfer-gzip-close",
    ] {
        let reply = raw_get(
            &lk,
            "api.anthropic.com",
            &format!(
                "GET {path} HTTP/1.1\r\nHost: api.anthropic.com\r\nx-api-key: placeholder\r\nConnection: close\r\n\r\n"
            ),
        );
        assert!(reply.starts_with("HTTP/1.1 502"), "{path}: {reply}");
        assert!(
            reply.to_ascii_lowercase().contains("x-latchkey-error: upstream-encoding"),
            "{path}: {reply}"
        );
        assert!(reply.contains("latchkey: "), "{path}: latchkey's own refusal: {reply}");
        assert!(!reply.as_bytes().windows(2).any(|w| w == [0x1f, 0x8b]), "{path}: gzip data passed");
    }
}
