//! gRPC (HTTP/2, trailers) through latchkey with grpcio on both ends: unary and
//! server-streaming, metadata injected, grpc-status and trailing metadata intact.

mod common;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const SECRET: &str = "grpc-REAL-token";

/// Start the grpcio upstream (`extra` args: token, optional client CA) and a latchkey
/// with credential `cfg` routing api.example.com to it.
fn setup(token: &str, mtls: bool, cfg: impl Fn(&std::path::Path) -> String) -> (Child, Latchkey) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("up.crt"), dir.path().join("up.key"));
    std::fs::write(&cert, &pki().cert_pem).unwrap();
    std::fs::write(&key, &pki().key_pem).unwrap();
    let (ca, _, _) = write_pki(dir.path());
    let py = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py");
    let mut cmd = Command::new("python3");
    cmd.arg(format!("{py}/grpc_server.py")).args([&cert, &key]).arg(token);
    if mtls {
        cmd.arg(&ca);
    }
    let mut server = Child(cmd.stdout(Stdio::piped()).spawn().unwrap());
    let mut line = String::new();
    BufReader::new(server.0.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", line.trim()).parse().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, Some(addr), &cfg(dir.path()));
    let lk = Latchkey::spawn(dir, port, config, &[("GRPC_TOKEN", SECRET)]);
    (server, lk)
}

fn client(lk: &Latchkey) -> std::process::Output {
    let py = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py");
    Command::new("python3")
        .arg(format!("{py}/grpc_client.py"))
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
