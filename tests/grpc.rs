//! gRPC (HTTP/2, trailers) through latchkey with grpcio on both ends: unary and
//! server-streaming, metadata injected, grpc-status and trailing metadata intact.

mod common;

use common::*;

const SECRET: &str = "grpc-REAL-token";

/// Start the grpcio upstream (`extra` args: token, optional client CA) and a latchkey
/// with credential `cfg` routing api.example.com to it.
fn setup(token: &str, mtls: bool, cfg: impl Fn(&std::path::Path) -> String) -> (PyServer, Latchkey) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("up.crt"), dir.path().join("up.key"));
    std::fs::write(&cert, &pki().cert_pem).unwrap();
    std::fs::write(&key, &pki().key_pem).unwrap();
    let (ca, _, _) = write_pki(dir.path());
    let mut cmd = py("grpc_server.py");
    cmd.args([&cert, &key]).arg(token);
    if mtls {
        cmd.arg(&ca);
    }
    let (server, addr) = python_upstream(cmd);
    let port = free_port();
    let config = write_config(dir.path(), port, Some(addr), &cfg(dir.path()));
    let lk = Latchkey::spawn(dir, port, config, &[("GRPC_TOKEN", SECRET)]);
    (server, lk)
}

fn client(lk: &Latchkey) -> std::process::Output {
    client_with(lk, &[])
}

fn client_with(lk: &Latchkey, args: &[&str]) -> std::process::Output {
    py("grpc_client.py")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("HOME", lk.dir.path())
        .env("BUNDLE", lk.bundle())
        .env("https_proxy", lk.proxy_url())
        .output()
        .unwrap()
}

const EXPECTED: [&str; 4] = ["echo:hi", "OK unary-done", "msg0,msg1,msg2,msg3,msg4", "OK stream-done"];

#[test]
fn grpc_unary_and_streaming_with_injected_metadata() {
    let cfg = |_: &std::path::Path| {
        "[credentials.grpc]\nauth_type = \"bearer\"\nvalue = \"${GRPC_TOKEN}\"\ndomains = [\"api.example.com\"]\n"
            .to_string()
    };
    let (_server, lk) = setup(SECRET, false, cfg);

    let out = client(&lk);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}\n{}", String::from_utf8_lossy(&out.stderr), lk.stderr());
    assert_eq!(text.lines().collect::<Vec<_>>(), EXPECTED);
}

#[test]
fn grpc_with_a_client_certificate_like_talos() {
    let cfg = |dir: &std::path::Path| {
        format!(
            "[credentials.talos]\nauth_type = \"mtls\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\ndomains = [\"api.example.com\"]\n",
            dir.join("client.crt").display(),
            dir.join("client.key").display()
        )
    };
    let (_server, lk) = setup("-", true, cfg);
    let out = client(&lk);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}\n{}", String::from_utf8_lossy(&out.stderr), lk.stderr());
    assert_eq!(text.lines().collect::<Vec<_>>(), EXPECTED);
}

const REDACTING: &str = "redact_responses = true\n#END-PROXY\n[credentials.grpc]\nauth_type = \"bearer\"\nvalue = \"${GRPC_TOKEN}\"\ndomains = [\"api.example.com\"]\n";

#[test]
fn a_bidirectional_call_gets_each_reply_before_it_sends_the_next() {
    // Redaction holds back the tail of a chunk; a gRPC message's end releases it, or a
    // ping-pong client would wait forever for a reply ending in "ping0".
    let (_server, lk) = setup(SECRET, false, |_| REDACTING.to_string());
    let out = client_with(&lk, &["chat"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}\n{}", String::from_utf8_lossy(&out.stderr), lk.stderr());
    assert_eq!(text.lines().collect::<Vec<_>>(), ["pong:ping0", "pong:ping1", "pong:ping2", "OK"]);
}

#[test]
fn a_trailers_only_refusal_reaches_the_client_as_sent() {
    // Redaction on, as by default: every body wrapper must keep the reply trailers-only.
    let (_server, lk) = setup(SECRET, false, |_| REDACTING.to_string());
    let out = client_with(&lk, &["denied"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}\n{}", String::from_utf8_lossy(&out.stderr), lk.stderr());
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["PERMISSION_DENIED", "project alpha is not yours", "policy-7"]
    );
}

#[test]
fn a_grpc_client_reads_latchkeys_refusal_as_a_grpc_status() {
    // A host blocked while the client's channel is open: the next call is refused at
    // the request, and a gRPC client can only read a refusal from grpc-status.
    use std::io::{BufRead, Write};
    let (_server, lk) = setup(SECRET, false, |_| REDACTING.to_string());
    let mut child = py("grpc_client.py")
        .arg("again")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("HOME", lk.dir.path())
        .env("BUNDLE", lk.bundle())
        .env("https_proxy", lk.proxy_url())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "OK echo:hi", "{}", lk.stderr());

    let mut config = std::fs::read_to_string(&lk.config_path).unwrap();
    config.push_str("\n[proxy.filters]\nblocked_domains = [\"api.example.com\"]\n");
    std::fs::write(&lk.config_path, config).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !lk.stderr().contains("reloaded") {
        assert!(std::time::Instant::now() < deadline, "no reload: {}", lk.stderr());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(
        rest.lines().collect::<Vec<_>>(),
        [
            "PERMISSION_DENIED",
            "latchkey: api.example.com is blocked by blocked_domains pattern \"api.example.com\"",
            "blocked-domain",
        ],
        "{}",
        lk.stderr()
    );
}

const DLP: &str = "[proxy.dlp]\nenabled = true\n#END-PROXY\n[credentials.grpc]\nauth_type = \"bearer\"\nvalue = \"${GRPC_TOKEN}\"\ndomains = [\"api.example.com\"]\n";

#[test]
fn with_dlp_a_bidirectional_call_still_flows_and_a_secret_message_is_refused() {
    // `[proxy.dlp]` holds a body before forwarding it; a gRPC body only up to a
    // message's end, or this ping-pong would wait forever.
    let (_server, lk) = setup(SECRET, false, |_| DLP.to_string());
    let out = client_with(&lk, &["chat"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["pong:ping0", "pong:ping1", "pong:ping2", "OK"],
        "{}",
        lk.stderr()
    );
    // latchkey's own secret in a message: a gRPC status, nothing upstream.
    let out = py("grpc_client.py")
        .arg("once")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("HOME", lk.dir.path())
        .env("BUNDLE", lk.bundle())
        .env("https_proxy", lk.proxy_url())
        .env("GRPC_MESSAGE", format!("please store {SECRET} for later"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"PERMISSION_DENIED"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(lines[1].contains("latchkey-secret") && lines[2] == "dlp", "{text}");
}
