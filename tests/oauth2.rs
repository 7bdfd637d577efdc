//! `auth_type = "oauth2_client_credentials"` through the real binary: a loopback
//! authorization server (tests/py/oauth2_server.py) checks the client's authentication
//! and scopes and issues short-lived tokens; curl reaches an API that accepts only those
//! tokens; expiry mid-run costs one token request however many requests wait; a wrong
//! client secret is a 502 naming the token endpoint.

mod common;

use common::*;

const CLIENT_SECRET: &str = "cs-REAL-oauth2-client-secret";
const TOKEN_URL: &str = "https://other.example.com/oauth/token";

struct Setup {
    method: &'static str,
    secret: &'static str,
    expires_in: u32,
    delay: &'static str,
}

const DEFAULT: Setup =
    Setup { method: "client_secret_basic", secret: CLIENT_SECRET, expires_in: 3600, delay: "0" };

/// The authorization server + API (every test host resolves to it) and a latchkey
/// whose credential on api.example.com reads the client secret from `OAUTH_SECRET`.
fn setup(s: Setup) -> ((PyServer, std::net::SocketAddr), Latchkey) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("up.crt"), dir.path().join("up.key"));
    std::fs::write(&cert, &pki().cert_pem).unwrap();
    std::fs::write(&key, &pki().key_pem).unwrap();
    let mut cmd = py("oauth2_server.py");
    cmd.args([&cert, &key]).args(["svc-client", CLIENT_SECRET, "read:things write:things"]);
    cmd.args([&s.expires_in.to_string(), s.delay, s.method, "https://api.example.com"]);
    let (server, addr) = python_upstream(cmd);
    let server = (server, addr);
    let cfg = format!(
        r#"[credentials.things]
auth_type = "oauth2_client_credentials"
token_url = "{TOKEN_URL}"
client_id = "svc-client"
client_secret = "${{OAUTH_SECRET}}"
scopes = ["read:things", "write:things"]
audience = "https://api.example.com"
token_endpoint_auth_method = "{}"
domains = ["api.example.com"]

[proxy.logging]
log_requests = true
log_file = "{}"
"#,
        s.method,
        dir.path().join("requests.log").display()
    );
    let port = free_port();
    let config = write_config(dir.path(), port, Some(addr), &cfg);
    let lk = Latchkey::spawn(dir, port, config, &[("OAUTH_SECRET", s.secret)]);
    (server, lk)
}

fn request_log(lk: &Latchkey) -> String {
    std::fs::read_to_string(lk.dir.path().join("requests.log")).unwrap_or_default()
}

#[test]
fn curl_reaches_an_api_that_accepts_only_the_minted_token() {
    for method in ["client_secret_basic", "client_secret_post"] {
        let (_server, lk) = setup(Setup { method, ..DEFAULT });
        let (code, body) =
            lk.curl(&["-H", "authorization: Bearer latchkey-things", "https://api.example.com/v1/x"]);
        assert_eq!(code, 200, "{method}: {body}\n{}", lk.stderr());
        let v = json(&body);
        assert_eq!(v["token"], "at-1", "{method}");
        let (_, body) = lk.curl(&["https://api.example.com/v1/y"]);
        assert_eq!(json(&body)["token_requests"], 1, "{method}: cached, not fetched again");
        assert_eq!(json(&body)["secret_seen_by_api"], serde_json::json!([]), "{method}");
        // The client secret reaches only token_url: not the agent, the log, nor latchkey's own output.
        assert!(!body.contains(CLIENT_SECRET));
        assert!(!lk.stderr().contains(CLIENT_SECRET) && !request_log(&lk).contains(CLIENT_SECRET));
        assert!(!lk.stderr().contains("at-1") && !request_log(&lk).contains("at-1"));
    }
    // Without latchkey the API refuses the placeholder: the test can fail.
    let (server, _lk) = setup(DEFAULT);
    let out = std::process::Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-H", "authorization: Bearer latchkey-things"])
        .arg(format!("https://127.0.0.1:{}/v1/x", server.1.port()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
}

#[test]
fn an_expired_token_is_refreshed_once_however_many_requests_wait() {
    // Tokens live 2 s (refreshed after 1 s: half the life of a short-lived token); the
    // token endpoint takes 0.5 s, so every request below waits on the same refresh.
    let (_server, lk) = setup(Setup { expires_in: 2, delay: "0.5", ..DEFAULT });
    let (code, body) = lk.curl(&["https://api.example.com/first"]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["token"], "at-1");
    std::thread::sleep(std::time::Duration::from_millis(2200));
    let lk = &lk;
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let all: Vec<_> =
            (0..12).map(|i| s.spawn(move || lk.curl(&[&format!("https://api.example.com/w{i}")]))).collect();
        all.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Each answer says how many token requests the endpoint had seen by then: one
    // refresh for all twelve. (Asked of the twelve answers themselves, not of a later
    // request, which may rightly find at-2 past half its life on a loaded machine.)
    for (code, body) in &answers {
        assert_eq!(*code, 200, "{body}");
        assert_eq!(json(body)["token"], "at-2", "{body}");
        assert_eq!(json(body)["token_requests"], 2, "one refresh for all twelve: {body}");
    }
}

#[test]
fn a_wrong_client_secret_is_a_502_naming_the_token_endpoint() {
    let (_server, lk) = setup(Setup { secret: "cs-wrong", ..DEFAULT });
    let out = std::process::Command::new("curl")
        .args(["-sS", "-i", "--max-time", "20", "-x", &lk.proxy_url(), "--cacert"])
        .arg(lk.bundle())
        .arg("https://api.example.com/v1/x")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("HTTP/2 502")), "{text}");
    assert!(text.to_ascii_lowercase().contains("x-latchkey-error: credential-failed"), "{text}");
    assert!(text.contains(TOKEN_URL) && text.contains("401 (invalid_client)"), "{text}");
    assert!(!text.contains("cs-wrong") && !lk.stderr().contains("cs-wrong"));
    wait_for_text(&lk.dir.path().join("requests.log"), "\"blocked\"");
}
