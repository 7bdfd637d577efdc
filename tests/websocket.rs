//! WebSocket through latchkey with a real client library (Python websockets), injected
//! on the handshake, frames relayed untouched.

mod common;

use common::*;

const SECRET: &str = "ws-REAL-token";

/// The Python WebSocket upstream and a latchkey routing api.example.com to it.
fn setup() -> (PyServer, Latchkey) {
    setup_with("")
}

fn setup_with(proxy_extra: &str) -> (PyServer, Latchkey) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("up.crt"), dir.path().join("up.key"));
    std::fs::write(&cert, &pki().cert_pem).unwrap();
    std::fs::write(&key, &pki().key_pem).unwrap();
    let mut cmd = py("ws_server.py");
    cmd.args([&cert, &key]).arg(SECRET);
    let (server, addr) = python_upstream(cmd);

    let port = free_port();
    let cfg = "[credentials.ws]\nauth_type = \"bearer\"\nvalue = \"${WS_TOKEN}\"\ndomains = [\"api.example.com\"]\n";
    let config = write_config(dir.path(), port, Some(addr), &format!("{proxy_extra}{cfg}"));
    let lk = Latchkey::spawn(dir, port, config, &[("WS_TOKEN", SECRET)]);
    (server, lk)
}

#[test]
fn websocket_handshake_is_injected_and_frames_relayed() {
    let (_server, lk) = setup();
    let client =
        |script: &str| py(script).env("BUNDLE", lk.bundle()).env("PROXY", lk.proxy_url()).output().unwrap();
    let out = client("ws_client.py");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}\n{}", String::from_utf8_lossy(&out.stderr), lk.stderr());
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines, ["echo: hello", "0001ff62696e617279", "200006"]);
}

/// One masked client text frame (RFC 6455 5.2), payload under 126 bytes.
fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut f = vec![0x81, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;
type Upgraded = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

/// An HTTP/2 connection through latchkey to api.example.com, and a WebSocket opened on
/// it by extended CONNECT (RFC 8441), with the placeholder latchkey replaces.
async fn websocket_over_h2(port: u16) -> (H2Sender, Upgraded) {
    let mut sender = h2::hyper_h2(port, "api.example.com:443", "api.example.com").await;
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .version(http::Version::HTTP_2)
        .uri("https://api.example.com/ws")
        .header("sec-websocket-version", "13")
        .header("authorization", "Bearer placeholder")
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let mut resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "extended CONNECT accepted");
    let upgraded = hyper::upgrade::on(&mut resp).await.unwrap();
    (sender, hyper_util::rt::TokioIo::new(upgraded))
}

/// One text frame out, the server's one text frame back (its payload).
async fn echo(io: &mut Upgraded, text: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    io.write_all(&text_frame(text)).await.unwrap();
    let mut hdr = [0u8; 2];
    io.read_exact(&mut hdr).await.unwrap();
    assert_eq!(hdr[0], 0x81, "an unmasked text frame back");
    let mut payload = vec![0u8; (hdr[1] & 0x7f) as usize];
    io.read_exact(&mut payload).await.unwrap();
    String::from_utf8(payload).unwrap()
}

#[test]
fn websocket_over_http2_extended_connect_is_downgraded_upstream() {
    let (_server, lk) = setup();
    let reply = runtime().block_on(async {
        let (_sender, mut io) = websocket_over_h2(lk.port).await;
        echo(&mut io, b"over h2").await
    });
    assert_eq!(reply, "echo: over h2", "the upstream accepted the injected credential");
}

#[test]
fn a_websocket_over_http2_keeps_its_connection_past_the_idle_timeout() {
    // `idle_timeout` closes an HTTP/2 connection with no stream open; a WebSocket's
    // stream is open for as long as the socket is, however quiet.
    let (_server, lk) = setup_with("[proxy.limits]\nidle_timeout = 1\n");
    let (replies, later) = runtime().block_on(async {
        let (mut sender, mut io) = websocket_over_h2(lk.port).await;
        let mut replies = vec![echo(&mut io, b"before").await];
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        replies.push(echo(&mut io, b"after three quiet seconds").await);
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        // Not told to go away meanwhile: the connection still takes a new stream.
        let get = http::Request::builder()
            .uri("https://api.example.com/")
            .body(http_body_util::Empty::new())
            .unwrap();
        let later = sender.send_request(get).await.map(|r| r.status().as_u16()).map_err(|e| e.to_string());
        (replies, later)
    });
    assert_eq!(replies, ["echo: before", "echo: after three quiet seconds"]);
    assert!(later.is_ok(), "a request after the quiet WebSocket: {later:?}");
}

#[test]
fn a_reflected_credential_in_a_text_frame_is_masked() {
    let (_server, lk) = setup_with("redact_responses = true\n#END-PROXY\n");
    let out = py("ws_whoami.py").env("BUNDLE", lk.bundle()).env("PROXY", lk.proxy_url()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        format!("you are Bearer {}", "*".repeat(SECRET.len())),
        "the upstream saw it; the client did not"
    );
    assert_eq!(lines[1], lines[0], "split across fragments: masked all the same");
    assert_eq!(lines[2], "None", "no permessage-deflate on a credentialed socket");
}

/// A server frame (never masked by a well-behaved server), payload under 126 bytes.
fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![first, payload.len() as u8];
    f.extend_from_slice(payload);
    f
}

/// `text` as a raw DEFLATE stream (what permessage-deflate carries), from gzip(1).
fn deflated(text: &str) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("gzip")
        .args(["-c", "-n"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip(1) is needed for the permessage-deflate test");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let gz = child.wait_with_output().unwrap().stdout;
    gz[10..gz.len() - 8].to_vec()
}

/// A WebSocket upstream that answers the handshake and then sends exactly the frames a
/// hostile server would, per path.
fn hostile_ws_upstream() -> Upstream {
    let script: Script = std::sync::Arc::new(|req: &ScriptedRequest| {
        let secret = req.credential.trim_start_matches("Bearer ").to_string();
        let mut head = String::from(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n",
        );
        let frames = match req.path.as_str() {
            "/close-reason" => {
                server_frame(0x88, &[&[0x0f, 0xa0][..], format!("bad token {secret}").as_bytes()].concat())
            }
            "/masked-text" => {
                let key = [0x37, 0xfa, 0x21, 0x3d];
                let payload: Vec<u8> =
                    format!("you are {secret}").bytes().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
                let mut f = vec![0x81, 0x80 | payload.len() as u8];
                f.extend_from_slice(&key);
                f.extend(payload);
                f
            }
            "/reserved-opcode" => server_frame(0x83, format!("you are {secret}").as_bytes()),
            _ => {
                // Accepts the compression latchkey removed from the offer, and uses it.
                head.push_str("Sec-WebSocket-Extensions: permessage-deflate\r\n");
                server_frame(0xc1, &deflated(&format!("you are {secret}")))
            }
        };
        let mut out = format!("{head}\r\n").into_bytes();
        out.extend(frames);
        out
    });
    scripted_upstream(script)
}

/// Upgrade through the proxy with raw bytes; everything the client receives.
fn raw_websocket(lk: &Latchkey, path: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let (stream, status) = raw::tunnel(lk.port, "api.example.com:443");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    stream.set_read_timeout(Some(std::time::Duration::from_secs(3))).unwrap();
    let mut tls = raw::tls(stream, "api.example.com");
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: api.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Extensions: permessage-deflate\r\nAuthorization: Bearer placeholder\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    out
}

#[test]
fn websocket_frames_that_would_escape_masking_never_carry_the_secret() {
    let up = hostile_ws_upstream();
    let cfg = "redact_responses = true\n#END-PROXY\n[credentials.ws]\nauth_type = \"bearer\"\nvalue = \"${WS_TOKEN}\"\ndomains = [\"api.example.com\"]\n";
    let lk = Latchkey::start(Some(&up), cfg, &[("WS_TOKEN", SECRET)]);
    let split = |reply: &[u8]| {
        let at = reply.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4).unwrap_or(reply.len());
        (String::from_utf8_lossy(&reply[..at]).into_owned(), reply[at..].to_vec())
    };

    let (head, frames) = split(&raw_websocket(&lk, "/close-reason"));
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let reason = format!("bad token {}", "*".repeat(SECRET.len()));
    assert_eq!(
        frames,
        server_frame(0x88, &[&[0x0f, 0xa0][..], reason.as_bytes()].concat()),
        "masked in place"
    );

    // Failed, not passed: the client gets a close 1002 and nothing of the frame.
    for path in ["/masked-text", "/reserved-opcode"] {
        let (head, frames) = split(&raw_websocket(&lk, path));
        assert!(head.starts_with("HTTP/1.1 101"), "{path}: {head}");
        assert_eq!(frames, [0x88, 0x02, 0x03, 0xea], "{path}");
    }

    let (head, frames) = split(&raw_websocket(&lk, "/deflate"));
    assert!(head.starts_with("HTTP/1.1 502"), "an extension latchkey did not offer: {head}");
    assert!(head.to_ascii_lowercase().contains("x-latchkey-error: upstream-websocket"), "{head}");
    let body = String::from_utf8(frames).expect("a text refusal, no frame");
    assert!(body.starts_with("latchkey: "), "{body}");
    let seen = up.requests();
    assert!(
        seen.iter().all(|r| r.header_all("sec-websocket-extensions").is_empty()),
        "none offered upstream"
    );
}

#[test]
fn a_websocket_over_http2_whose_client_opens_no_window_is_let_go() {
    // 2,000 messages up, their echoes down; the client (the `h2` crate's, 64 KiB stream
    // window) releases none of the window, so latchkey's writes of the echoes wait on
    // flow control. After `idle_timeout` of that the WebSocket is closed; before, it
    // waited for as long as the client kept the connection (and the upstream's with it).
    const MESSAGES: usize = 2000;
    let (_server, lk) = setup_with("[proxy.limits]\nidle_timeout = 2\n");
    let got = runtime().block_on(async {
        let client = h2::connect_h2(lk.port, "api.example.com:443", "api.example.com").await;
        let mut client = client.ready().await.unwrap();
        for _ in 0..100 {
            if client.is_extended_connect_protocol_enabled() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("https://api.example.com/ws")
            .header("sec-websocket-version", "13")
            .header("authorization", "Bearer placeholder")
            .body(())
            .unwrap();
        req.extensions_mut().insert(::h2::ext::Protocol::from_static("websocket"));
        let (resp, mut send) = client.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200, "extended CONNECT accepted");
        for _ in 0..MESSAGES {
            send.send_data(bytes::Bytes::from(text_frame(&[b'm'; 100])), false).unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_secs(6)).await;
        let mut body = resp.into_body();
        let mut got = 0;
        while let Ok(Some(Ok(data))) =
            tokio::time::timeout(std::time::Duration::from_secs(5), body.data()).await
        {
            got += data.len();
            let _ = body.flow_control().release_capacity(data.len());
        }
        got
    });
    // Each echo: a 2-byte frame header, "echo: ", the 100 bytes.
    let all = MESSAGES * 108;
    assert!(got < all, "the WebSocket was never let go: {got} of {all} bytes of echoes came afterwards");
}

#[test]
fn a_websocket_whose_upstream_stops_reading_is_let_go() {
    // The upstream answers the handshake and then reads nothing, for 30 s. Before its
    // side was timed, the client's messages waited on it for `tunnel_timeout` (4 h).
    use std::io::{Read, Write};
    let script: KeepaliveScript = std::sync::Arc::new(|_: &KeptRequest| {
        let head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                    Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        Reply::close(head, std::time::Duration::from_secs(30))
    });
    let up = keepalive_scripted_upstream(script);
    let cfg = "[proxy.limits]\nidle_timeout = 2\n#END-PROXY\n[credentials.ws]\nauth_type = \"bearer\"\nvalue = \"${WS_TOKEN}\"\ndomains = [\"api.example.com\"]\n";
    let lk = Latchkey::start(Some(&up), cfg, &[("WS_TOKEN", SECRET)]);
    let (stream, status) = raw::tunnel(lk.port, "api.example.com:443");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut tls = raw::tls(stream, "api.example.com");
    write!(
        tls,
        "GET /deaf HTTP/1.1\r\nHost: api.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer placeholder\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && tls.read(&mut byte).unwrap() == 1 {
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    // 16 KiB binary messages (masked with a zero key), 64 MB in all: every buffer on the
    // way fills, then latchkey's writes to the upstream wait.
    let mut frame = vec![0x82, 0x80 | 126, 0x40, 0x00, 0, 0, 0, 0];
    frame.resize(frame.len() + 16 * 1024, 0);
    tls.get_mut().set_write_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    assert_let_go_while_writing(&mut tls, &frame, 4096, "the WebSocket");
}
