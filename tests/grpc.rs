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

#[test]
fn grpc_unary_and_streaming_with_injected_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("up.crt"), dir.path().join("up.key"));
    std::fs::write(&cert, &pki().cert_pem).unwrap();
    std::fs::write(&key, &pki().key_pem).unwrap();
    let py = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py");
    let mut server = Child(
        Command::new("python3")
            .arg(format!("{py}/grpc_server.py"))
            .args([&cert, &key])
            .arg(SECRET)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(server.0.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", line.trim()).parse().unwrap();

    let port = free_port();
    let cfg = "[credentials.grpc]\nauth_type = \"bearer\"\nvalue = \"${GRPC_TOKEN}\"\ndomains = [\"api.example.com\"]\n";
    let config = write_config(dir.path(), port, Some(addr), cfg);
    let lk = Latchkey::spawn(dir, port, config, &[("GRPC_TOKEN", SECRET)]);

    let out = Command::new("python3")
        .arg(format!("{py}/grpc_client.py"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("HOME", lk.dir.path())
        .env("BUNDLE", lk.bundle())
        .env("https_proxy", lk.proxy_url())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}\n{}", String::from_utf8_lossy(&out.stderr), lk.stderr());
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines, ["echo:hi", "OK unary-done", "msg0,msg1,msg2,msg3,msg4", "OK stream-done"]);
}
