//! Scoped tokens and sealed secrets through the real binary (SPEC 11): curl, Python
//! requests and biscuit-python against the loopback TLS upstream, written as the agent
//! (or an attacker holding a token) would use them.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::*;

const REAL: &str = "sk-ant-REAL-0123456789";
const OPENAI: &str = "sk-openai-REAL-0123456789";

const CFG: &str = r#"
[credentials.anthropic]
header = ["x-api-key", "Authorization: Bearer"]
value = "${ANTHROPIC_API_KEY}"
domains = ["api.anthropic.com"]

[credentials.openai]
auth_type = "bearer"
value = "${OPENAI_API_KEY}"
domains = ["api.openai.com"]
require_token = true
"#;

const ENV: &[(&str, &str)] = &[("ANTHROPIC_API_KEY", REAL), ("OPENAI_API_KEY", OPENAI)];

fn start(up: &Upstream, extra: &str) -> Latchkey {
    Latchkey::start(Some(up), &format!("{extra}{CFG}"), ENV)
}

/// `latchkey token ...` against the instance's config: stdout, or a panic with stderr.
fn token_cli(lk: &Latchkey, args: &[&str]) -> String {
    let mut all = vec!["token"];
    all.extend_from_slice(args);
    let out = lk.cli(&all, &[]);
    assert!(out.status.success(), "latchkey {all:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// curl through the proxy with response headers in the output: (status, head + body).
fn curl(lk: &Latchkey, header: &str, url: &str, extra: &[&str]) -> (u16, String) {
    let mut args = vec!["-D", "-", "-H", header];
    args.extend_from_slice(extra);
    args.push(url);
    lk.curl(&args)
}

/// `latchkey seal ARGS` with `secret` on stdin.
fn seal_cmd(home: &std::path::Path, args: &[&str], secret: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = latchkey_cmd(home, &[])
        .arg("seal")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(secret.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn refused_as_token(status: u16, out: &str) -> bool {
    status == 403 && out.to_ascii_lowercase().contains("x-latchkey-error: token")
}

fn flip(token: &str, byte: usize) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut bytes = b64.decode(token.trim_end_matches('=')).unwrap();
    bytes[byte] ^= 0x10;
    b64.encode(bytes)
}

#[test]
fn mint_attenuate_and_use_with_curl() {
    let up = upstream(true, None);
    let lk = start(&up, "");
    let token = token_cli(&lk, &["mint", "--credential", "anthropic", "--path", "/v1", "--ttl", "10m"]);
    assert!(!token.contains(REAL));
    let url = "https://api.anthropic.com/v1/messages";
    let (status, out) = curl(&lk, &format!("x-api-key: {token}"), url, &[]);
    assert_eq!(status, 200, "{out}");
    let seen = &up.requests()[0];
    assert_eq!(seen.header_all("x-api-key"), [REAL], "the token's slot gets the real secret");
    assert!(
        !seen.headers.iter().any(|(_, v)| v.contains(&token[..40])),
        "the token never reaches the upstream"
    );
    // The client's other form of the slot: Authorization: Bearer.
    let (status, _) = curl(&lk, &format!("Authorization: Bearer {token}"), url, &[]);
    assert_eq!(status, 200);
    assert_eq!(up.requests()[1].header_all("authorization"), [format!("Bearer {REAL}")]);
    // Outside the path scope: refused, nothing forwarded, the failing check named.
    let (status, out) = curl(&lk, &format!("x-api-key: {token}"), "https://api.anthropic.com/v1beta/x", &[]);
    assert!(refused_as_token(status, &out), "{status} {out}");
    assert!(out.contains("latchkey: token ") && out.contains("path: "), "{out}");
    assert_eq!(up.count(), 2);
    // Narrowed offline to POST: GET is refused, POST goes through.
    let post_only = token_cli(&lk, &["attenuate", &token, "--method", "POST"]);
    let (status, out) = curl(&lk, &format!("x-api-key: {post_only}"), url, &[]);
    assert!(refused_as_token(status, &out) && out.contains("method: "), "{out}");
    let (status, _) = curl(&lk, &format!("x-api-key: {post_only}"), url, &["-d", "{}"]);
    assert_eq!(status, 200);
    assert_eq!(up.count(), 3);
    // A method override claiming DELETE on a POST-only token: refused.
    let (status, out) = curl(
        &lk,
        &format!("x-api-key: {post_only}"),
        url,
        &["--http1.1", "-d", "{}", "-H", "X-HTTP-Method-Override: DELETE"],
    );
    assert!(refused_as_token(status, &out), "{out}");
    assert_eq!(up.count(), 3);
}

#[test]
fn the_log_names_the_token_id_never_the_token() {
    let up = upstream(true, None);
    let log = tempfile::tempdir().unwrap().keep().join("requests.log");
    let lk = start(
        &up,
        &format!("[proxy.logging]\nlog_requests = true\nlog_file = \"{}\"\n#END-PROXY\n", log.display()),
    );
    let token = token_cli(&lk, &["mint", "--credential", "anthropic", "--path", "/v1"]);
    let id = token_cli(&lk, &["inspect", "--json", &token]);
    let id = json(&id)["id"].as_str().unwrap().to_string();
    let (ok, _) = curl(&lk, &format!("x-api-key: {token}"), "https://api.anthropic.com/v1/x", &[]);
    let (no, _) = curl(&lk, &format!("x-api-key: {token}"), "https://api.anthropic.com/v2/x", &[]);
    assert_eq!((ok, no), (200, 403));
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 2 || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let records: Vec<serde_json::Value> = lines.lines().map(json).collect();
    let blocked = records.iter().find(|r| r["decision"] == "blocked").expect("a blocked line");
    assert_eq!(blocked["status"], 403);
    assert!(blocked["reason"].as_str().unwrap().contains(&format!("token {id} refused: path")), "{blocked}");
    let injected = records.iter().find(|r| r["decision"] == "injected").expect("an injected line");
    assert_eq!(injected["reason"], format!("token {id}"));
    for text in [&lines, &lk.stderr()] {
        assert!(!text.contains(&token[..32]), "the token itself is never logged");
        assert!(!text.contains(REAL));
    }
}

#[test]
fn revocation_takes_effect_on_the_running_proxy() {
    let up = upstream(true, None);
    let lk = start(&up, "");
    let parent = token_cli(&lk, &["mint", "--credential", "anthropic"]);
    let child = token_cli(&lk, &["attenuate", &parent, "--path", "/v1"]);
    let url = "https://api.anthropic.com/v1/messages";
    assert_eq!(curl(&lk, &format!("x-api-key: {child}"), url, &[]).0, 200);
    let said = token_cli(&lk, &["revoke", &parent]);
    assert!(said.starts_with("revoked "), "{said}");
    // The running proxy re-reads the list within a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, out, forwarded) = loop {
        let before = up.count();
        let (status, out) = curl(&lk, &format!("x-api-key: {child}"), url, &[]);
        if status != 200 || Instant::now() > deadline {
            break (status, out, up.count() - before);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(refused_as_token(status, &out) && out.contains("revocation: "), "{status} {out}");
    assert_eq!(forwarded, 0, "nothing forwarded once revoked");
    // Revoking by id (as the log shows it) works the same way.
    let other = token_cli(&lk, &["mint", "--credential", "anthropic"]);
    let id = json(&token_cli(&lk, &["inspect", "--json", &other]))["id"].as_str().unwrap().to_string();
    token_cli(&lk, &["revoke", &id]);
    assert!(std::fs::read_to_string(lk.dir.path().join("ca/revoked")).unwrap().contains(&id));
}

/// A token for credential A, written into B's slot on B's host: B's secret is never
/// written for it, and nothing is forwarded.
#[test]
fn a_token_is_never_swapped_on_another_credentials_host() {
    let up = upstream(true, None);
    let lk = start(&up, "");
    let anthropic = token_cli(&lk, &["mint", "--credential", "anthropic"]);
    let (status, out) =
        curl(&lk, &format!("Authorization: Bearer {anthropic}"), "https://api.openai.com/v1/chat", &[]);
    assert!(refused_as_token(status, &out), "{out}");
    assert!(out.contains("credential: the token is for credential anthropic"), "{out}");
    assert_eq!(up.count(), 0);
    let openai = token_cli(&lk, &["mint", "--credential", "openai", "--host", "api.openai.com"]);
    let (status, _) =
        curl(&lk, &format!("Authorization: Bearer {openai}"), "https://api.openai.com/v1/chat", &[]);
    assert_eq!(status, 200);
    assert_eq!(up.requests()[0].header_all("authorization"), [format!("Bearer {OPENAI}")]);
}

/// `require_token = true`: the placeholder, nothing, or a token in a slot the
/// credential does not read are all refused before anything is sent.
#[test]
fn require_token_refuses_requests_without_a_valid_token() {
    let up = upstream(true, None);
    let lk = start(&up, "");
    let url = "https://api.openai.com/v1/chat";
    let token = token_cli(&lk, &["mint", "--credential", "openai"]);
    for header in ["Authorization: Bearer latchkey-openai", "X-Nothing: here", &format!("x-api-key: {token}")]
    {
        let (status, out) = curl(&lk, header, url, &[]);
        assert!(refused_as_token(status, &out), "{header}: {status} {out}");
        assert!(out.contains("requires a scoped token in authorization"), "{out}");
    }
    assert_eq!(up.count(), 0);
    assert_eq!(curl(&lk, &format!("Authorization: Bearer {token}"), url, &[]).0, 200);
}

/// Damaged and foreign tokens are refused as tokens (never treated as "no token", so
/// never injected), on a credential that does not even require one.
#[test]
fn damaged_and_foreign_tokens_are_refused_never_injected() {
    let up = upstream(true, None);
    let lk = start(&up, "");
    let token = token_cli(&lk, &["mint", "--credential", "anthropic", "--path", "/v1"]);
    let url = "https://api.anthropic.com/v1/messages";
    // A token minted by another latchkey (another root key).
    let other = Latchkey::start(Some(&up), CFG, ENV);
    let foreign = token_cli(&other, &["mint", "--credential", "anthropic"]);
    let damaged: &[&str] = &["format: ", "signature: "];
    let cases = [
        ("truncated", token[..token.len() / 2].to_string(), &["format: "][..]),
        ("bit-flipped signature", flip(&token, token.len() * 3 / 4 - 40), damaged),
        ("bit-flipped block", flip(&token, 20), damaged),
        ("wrong root", foreign, &["signature: not signed by this latchkey's token key"][..]),
        ("oversized", format!("{token}{}", "A".repeat(9000)), &["size: "][..]),
    ];
    for (what, bad, checks) in cases {
        let (status, out) = curl(&lk, &format!("x-api-key: {bad}"), url, &[]);
        assert!(refused_as_token(status, &out), "{what}: {status} {out}");
        assert!(checks.iter().any(|c| out.contains(c)), "{what}: {out}");
    }
    assert_eq!(up.count(), 0, "nothing was forwarded, nothing injected");
}

#[test]
fn query_and_basic_credentials_take_tokens_where_their_placeholders_go() {
    let up = upstream(true, None);
    let cfg = r#"
[credentials.maps]
auth_type = "query"
param = "key"
value = "maps-REAL"
domains = ["api.example.com"]
require_token = true

[credentials.git]
auth_type = "basic"
username = "x-access-token"
password = "ghp-REAL"
domains = ["github.com"]
require_token = true
"#;
    let lk = Latchkey::start(Some(&up), cfg, &[]);
    let maps = token_cli(&lk, &["mint", "--credential", "maps", "--path", "/geo"]);
    let (status, out) = lk.curl(&[&format!("https://api.example.com/geo/x?q=1&key={maps}")]);
    assert_eq!(status, 200, "{out}");
    assert_eq!(json(&out)["path"], "/geo/x?q=1&key=maps-REAL");
    let (status, _) = lk.curl(&[&format!("https://api.example.com/other?key={maps}")]);
    assert_eq!(status, 403);
    let git = token_cli(&lk, &["mint", "--credential", "git", "--method", "GET"]);
    let (status, out) =
        lk.curl(&["-u", &format!("x-access-token:{git}"), "https://github.com/org/repo.git/info/refs"]);
    assert_eq!(status, 200, "{out}");
    let basic =
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("x-access-token:ghp-REAL"));
    assert_eq!(echoed(&out, "authorization"), [basic]);
    // HTTP/1.1: curl over HTTP/2 sometimes reports a stream error instead of a 403
    // sent before the request body was read (seen for every early refusal of a POST,
    // not only tokens; reported in the notes).
    let (status, out) = lk.curl(&[
        "--http1.1",
        "-u",
        &format!("x-access-token:{git}"),
        "-d",
        "x",
        "https://github.com/org/repo.git/git-upload-pack",
    ]);
    assert_eq!(status, 403, "{out}");
}

/// The interop promise: biscuit-python (any Biscuit library) narrows a latchkey token
/// with the public key only; latchkey accepts the result within the narrower scope and
/// refuses it outside. The second block is written in a shape latchkey does not compile
/// (`||` inside one expression), so Biscuit's own authorizer decides it.
#[test]
fn biscuit_python_attenuates_and_requests_uses_the_result() {
    let up = upstream(true, None);
    let lk = start(&up, "");
    let token = token_cli(&lk, &["mint", "--credential", "anthropic", "--ttl", "10m"]);
    let pubkey = token_cli(&lk, &["pubkey"]);
    let script = r#"
import json, os, sys
try:
    import biscuit_auth
except ImportError:
    sys.exit("biscuit-python is not installed: pip install biscuit-python (scripts/test.sh installs it)")
import requests
from biscuit_auth import Biscuit, BlockBuilder, PublicKey
root = PublicKey(os.environ["ROOT"])
t = Biscuit.from_base64(os.environ["TOKEN"], root)
t = t.append(BlockBuilder('check if path($p), $p.starts_with("/v1/messages");'))
t = t.append(BlockBuilder('check if method($m), $m == "POST" || $m == "PUT";'))
narrow = t.to_base64()
out = []
for method, path in [("POST", "/v1/messages"), ("PUT", "/v1/messages/x"), ("GET", "/v1/messages"), ("POST", "/v1/models")]:
    r = requests.request(method, "https://api.anthropic.com" + path, headers={"x-api-key": narrow})
    out.append([method, path, r.status_code, r.headers.get("x-latchkey-error"), r.text])
print(json.dumps(out))
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("HOME", lk.dir.path())
        .env("HTTPS_PROXY", lk.proxy_url())
        .env("REQUESTS_CA_BUNDLE", lk.bundle())
        .env("TOKEN", &token)
        .env("ROOT", &pubkey)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let results = json(&text);
    let rows = results.as_array().unwrap();
    let status = |i: usize| rows[i][2].as_u64().unwrap();
    assert_eq!((status(0), status(1)), (200, 200), "{text}");
    assert_eq!(echoed(rows[0][4].as_str().unwrap(), "x-api-key"), [REAL]);
    assert_eq!((status(2), rows[2][3].as_str()), (403, Some("token")), "GET is outside block 2: {text}");
    assert_eq!(
        (status(3), rows[3][3].as_str()),
        (403, Some("token")),
        "/v1/models is outside block 1: {text}"
    );
    assert!(rows[3][4].as_str().unwrap().contains("path: "), "{text}");
    assert_eq!(up.count(), 2);
}

/// `exec --token-ttl`: the child's placeholder variables hold fresh tokens scoped to
/// their credential's hosts, and they work through the running instance.
#[test]
fn exec_gives_the_child_tokens_instead_of_placeholders() {
    let up = upstream(true, None);
    let lk = start(&up, "");
    let exec = |args: &[&str]| {
        let config = lk.config_path.to_str().unwrap();
        latchkey_cmd(lk.dir.path(), &[]).args(["exec", "--config", config]).args(args).output().unwrap()
    };
    let out = exec(&["--token-ttl", "5m", "--", "sh", "-c", "echo \"$OPENAI_API_KEY\""]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let inspected = json(&token_cli(&lk, &["inspect", "--json", &token]));
    assert_eq!(inspected["credential"], "openai");
    assert!(inspected["expires"].is_string(), "{inspected}");
    let source = inspected["blocks"][0]["source"].as_str().unwrap();
    assert!(source.contains(r#"$host == "api.openai.com""#), "{source}");
    // The child uses it with curl against the running proxy (openai requires a token).
    let script = format!(
        "curl -sS -o /dev/null -w '%{{http_code}}' --cacert {} -H \"Authorization: Bearer $OPENAI_API_KEY\" https://api.openai.com/v1/chat",
        lk.bundle().display()
    );
    let out = exec(&["--token-ttl", "1m", "--", "sh", "-c", &script]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(up.requests()[0].header_all("authorization"), [format!("Bearer {OPENAI}")]);
}

/// The proxy port mints for `exec` where token.key is not readable: only for an
/// authenticated agent when agents exist (bound to it), and never a require_token
/// credential for an anonymous caller.
#[test]
fn the_proxy_mints_only_what_the_caller_could_already_do() {
    let up = upstream(true, None);
    let lk = start(&up, "");
    let ask = |lk: &Latchkey, q: &str, auth: Option<&str>| {
        let auth = auth.map(|a| format!("Proxy-Authorization: {a}\r\n")).unwrap_or_default();
        raw::exchange(
            lk.port,
            format!("GET /latchkey/token?{q} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
                .as_bytes(),
        )
    };
    let answer = ask(&lk, "credential=anthropic&ttl=60", None);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let minted = answer.split("\r\n\r\n").nth(1).unwrap().trim().to_string();
    assert_eq!(curl(&lk, &format!("x-api-key: {minted}"), "https://api.anthropic.com/v1/x", &[]).0, 200);
    let refused = ask(&lk, "credential=openai&ttl=60", None);
    assert!(refused.starts_with("HTTP/1.1 403") && refused.contains("requires a token"), "{refused}");
    assert!(ask(&lk, "credential=anthropic&ttl=2d", None).starts_with("HTTP/1.1 400"));
    // With agents: only an authenticated agent, and its token names it.
    let agents = "[agents.claude]\ntoken = \"agent-secret\"\ncredentials = [\"openai\"]\n";
    let lk = Latchkey::start(Some(&up), &format!("{CFG}{agents}"), ENV);
    assert!(ask(&lk, "credential=openai&ttl=60", None).starts_with("HTTP/1.1 407"));
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("claude:agent-secret"));
    assert!(ask(&lk, "credential=anthropic&ttl=60", Some(&basic)).starts_with("HTTP/1.1 403"));
    let answer = ask(&lk, "credential=openai&ttl=60", Some(&basic));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let minted = answer.split("\r\n\r\n").nth(1).unwrap().trim().to_string();
    let source = json(&token_cli(&lk, &["inspect", "--json", &minted]))["blocks"][0]["source"].clone();
    assert!(source.as_str().unwrap().contains(r#"$agent == "claude""#), "{source}");
}

/// A sealed secret in a config: injected like `value`, reported active by `check`
/// without the value, refused at load (exit 2, file:line:key) when its hosts do not
/// cover the credential or when it was sealed for another key.
#[test]
fn sealed_secrets_in_a_committed_config() {
    let up = upstream(true, None);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = write_config(dir.path(), port, Some(up.addr), "");
    let home = tempfile::tempdir().unwrap();
    let seal = |args: &[&str], secret: &str| seal_cmd(home.path(), args, secret);
    let cfg = ["--config", path.to_str().unwrap()];
    let sealed = seal(&[&cfg[..], &["--host", "api.anthropic.com"]].concat(), "sk-ant-SEALED\n");
    assert!(sealed.status.success(), "{}", String::from_utf8_lossy(&sealed.stderr));
    let blob = String::from_utf8(sealed.stdout).unwrap().trim().to_string();
    assert!(blob.starts_with("lks1:") && !blob.contains("SEALED"));
    // Sealing with the public key alone, elsewhere: no config, no private key.
    let pubkey = latchkey_cmd(dir.path(), &[]).args(["seal", "--export-pubkey"]).args(cfg).output().unwrap();
    let pubfile = dir.path().join("seal.pub");
    std::fs::write(&pubfile, &pubkey.stdout).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let by_pubkey = seal_cmd(
        elsewhere.path(),
        &["--host", ".example.com", "--pubkey", pubfile.to_str().unwrap()],
        "sk-example-SEALED",
    );
    assert!(by_pubkey.status.success());
    let example_blob = String::from_utf8(by_pubkey.stdout).unwrap().trim().to_string();

    let body = format!(
        "[credentials.anthropic]\nheader = \"x-api-key\"\nsealed = \"{blob}\"\ndomains = [\"api.anthropic.com\"]\n\n[credentials.example]\nauth_type = \"bearer\"\nsealed = \"{example_blob}\"\ndomains = [\"api.example.com\"]\n"
    );
    let path = write_config(dir.path(), port, Some(up.addr), &body);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("SEALED"), "the committed config holds no secret");
    let check = latchkey_cmd(dir.path(), &[])
        .args(["check", "--local", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let report =
        format!("{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    assert_eq!(check.status.code(), Some(0), "{report}");
    assert!(report.contains("anthropic") && report.contains("sealed for api.anthropic.com"), "{report}");
    assert!(!report.contains("SEALED"), "{report}");
    let lk = Latchkey::spawn(dir, port, path.clone(), &[]);
    let (status, out) =
        lk.curl(&["-H", "x-api-key: latchkey-anthropic", "https://api.anthropic.com/v1/messages"]);
    assert_eq!(status, 200, "{out}");
    assert_eq!(echoed(&out, "x-api-key"), ["sk-ant-SEALED"]);
    let (status, out) = lk.curl(&["https://api.example.com/v1/chat"]);
    assert_eq!(status, 200, "{out}");
    assert_eq!(echoed(&out, "authorization"), ["Bearer sk-example-SEALED"]);

    // Sealed for api.anthropic.com, used for a credential that also names another host.
    let wider = body.replacen(
        "domains = [\"api.anthropic.com\"]",
        "domains = [\"api.anthropic.com\", \"evil.example.net\"]",
        1,
    );
    let o = lk.cli(&["check"], &[]);
    assert_eq!(o.status.code(), Some(0));
    std::fs::write(&path, text.replace(&body, &wider)).unwrap();
    let o = lk.cli(&["check", "--local"], &[]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{err}");
    let line = text.lines().position(|l| l.starts_with("sealed = \"lks1:")).unwrap() + 1;
    assert!(err.contains(&format!("{}:{line}:", path.display())), "{err}");
    assert!(err.contains("credentials.anthropic.sealed: sealed for api.anthropic.com only, which does not cover evil.example.net"), "{err}");
    // Sealed for another latchkey's key.
    let other = tempfile::tempdir().unwrap();
    let other_cfg = write_config(other.path(), free_port(), None, "");
    let foreign = seal(&["--config", other_cfg.to_str().unwrap(), "--host", "api.anthropic.com"], "x");
    let foreign = String::from_utf8(foreign.stdout).unwrap().trim().to_string();
    std::fs::write(&path, text.replace(&blob, &foreign)).unwrap();
    let o = lk.cli(&["check", "--local"], &[]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("credentials.anthropic.sealed: cannot be opened with this latchkey's seal.key"),
        "{err}"
    );
}

/// `require_placeholder`: a token stands where the placeholder goes.
#[test]
fn a_token_counts_as_the_placeholder_for_require_placeholder() {
    let up = upstream(true, None);
    let cfg = "[credentials.strict]\nheader = \"x-api-key\"\nvalue = \"strict-REAL\"\ndomains = [\"api.example.com\"]\nrequire_placeholder = true\n";
    let lk = Latchkey::start(Some(&up), cfg, &[]);
    let token = token_cli(&lk, &["mint", "--credential", "strict"]);
    let (status, out) = lk.curl(&["-H", &format!("x-api-key: {token}"), "https://api.example.com/x"]);
    assert_eq!(status, 200, "{out}");
    assert_eq!(echoed(&out, "x-api-key"), ["strict-REAL"]);
    assert_eq!(lk.curl(&["-H", "x-api-key: other", "https://api.example.com/x"]).0, 403);
}

/// `explain` asks the same decision as the proxy, token checks included: against the
/// running instance (its key and revocation list) and from the config alone (`--local`,
/// the key beside the CA), it allows a token inside its scope and refuses it outside.
#[test]
fn explain_agrees_with_the_proxy_on_a_token() {
    let up = upstream(true, None);
    let lk = start(&up, "");
    let token = token_cli(&lk, &["mint", "--credential", "anthropic", "--path", "/v1", "--ttl", "10m"]);
    let header = format!("x-api-key: {token}");
    for local in [false, true] {
        let explain = |url: &str| {
            let mut args = vec!["explain", "--json", "--header", &header];
            if local {
                args.push("--local");
            }
            args.push(url);
            let out = lk.cli(&args, ENV);
            let json: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
            json
        };
        let inside = explain("https://api.anthropic.com/v1/messages");
        assert_eq!(inside["decision"], "inject", "local={local}: {inside}");
        assert!(inside["reason"].as_str().unwrap().contains("scoped token"), "{inside}");
        let outside = explain("https://api.anthropic.com/v1beta/x");
        assert_eq!(outside["decision"], "block", "local={local}: {outside}");
        assert!(outside["reason"].as_str().unwrap().contains("path"), "{outside}");
        let (status, out) = curl(&lk, &header, "https://api.anthropic.com/v1beta/x", &[]);
        assert!(refused_as_token(status, &out), "the proxy agrees: {out}");
    }
}
