//! WebSocket through latchkey with a real client library (Python websockets), injected
//! on the handshake, frames relayed untouched.

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

const SECRET: &str = "ws-REAL-token";

#[test]
fn websocket_handshake_is_injected_and_frames_relayed() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("up.crt"), dir.path().join("up.key"));
    std::fs::write(&cert, &pki().cert_pem).unwrap();
    std::fs::write(&key, &pki().key_pem).unwrap();
    let py = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py");
    let mut server = Child(
        Command::new("python3")
            .arg(format!("{py}/ws_server.py"))
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
    let cfg = "[credentials.ws]\nauth_type = \"bearer\"\nvalue = \"${WS_TOKEN}\"\ndomains = [\"api.example.com\"]\n";
    let config = write_config(dir.path(), port, Some(addr), cfg);
    let lk = Latchkey::spawn(dir, port, config, &[("WS_TOKEN", SECRET)]);

    let client = |script: &str| {
        Command::new("python3")
            .arg(format!("{py}/{script}"))
            .env("BUNDLE", lk.bundle())
            .env("PROXY", lk.proxy_url())
            .output()
            .unwrap()
    };
    let out = client("ws_client.py");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}\n{}", String::from_utf8_lossy(&out.stderr), lk.stderr());
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines, ["echo: hello", "0001ff62696e617279", "200006"]);
}
