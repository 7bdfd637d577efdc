//! Server-to-client WebSocket frames on a connection to a credential's host. Every data
//! message, text or binary, is held until its last fragment (up to a bound) and the
//! secrets are masked in place across its fragments — same length, so frame headers stay
//! valid. Control frames go ahead at once, masked on their own (a close frame's reason,
//! a ping's or pong's payload).
//!
//! What latchkey cannot read as a plain RFC 6455 server frame — a masked frame, RSV bits
//! (no extension was negotiated), a reserved opcode, a fragmented or oversized control
//! frame, a continuation of nothing — fails the connection: the client gets a close frame
//! with status 1002 and nothing after it. Such a frame is never passed on unscanned.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::redact::Set;

/// Largest message latchkey scans; a larger one ends the connection (fail closed).
pub(super) const MAX_MESSAGE: u64 = 1 << 20;

/// Close frame, status 1002 (protocol error), no reason.
const PROTOCOL_ERROR: [u8; 4] = [0x88, 0x02, 0x03, 0xea];

/// The frames of a message waiting for its last fragment.
#[derive(Default)]
struct Message {
    frames: BytesMut,
    /// Where each frame's payload sits in `frames`.
    payloads: Vec<std::ops::Range<usize>>,
    size: u64,
}

impl Message {
    fn push(&mut self, frame: &[u8], header_len: usize) {
        let start = self.frames.len();
        self.frames.extend_from_slice(frame);
        self.payloads.push(start + header_len..start + frame.len());
    }

    /// Mask secrets across the fragments' joined payload and hand back the frames.
    fn finish(&mut self, set: &Set) -> BytesMut {
        let mut joined: Vec<u8> =
            self.payloads.iter().flat_map(|r| self.frames[r.clone()].to_vec()).collect();
        set.mask(&mut joined);
        let mut at = 0;
        for r in self.payloads.drain(..) {
            let n = r.len();
            self.frames[r].copy_from_slice(&joined[at..at + n]);
            at += n;
        }
        self.size = 0;
        std::mem::take(&mut self.frames)
    }
}

pub(super) struct Header {
    pub(super) len: usize,
    pub(super) payload: u64,
    pub(super) opcode: u8,
    pub(super) fin: bool,
    pub(super) masked: bool,
    pub(super) rsv: bool,
}

pub(super) fn header(b: &[u8]) -> Option<Header> {
    if b.len() < 2 {
        return None;
    }
    let (fin, rsv, opcode, masked) = (b[0] & 0x80 != 0, b[0] & 0x70 != 0, b[0] & 0x0f, b[1] & 0x80 != 0);
    let (mut len, payload) = match b[1] & 0x7f {
        126 => (4, u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as u64),
        127 => (10, u64::from_be_bytes(b.get(2..10)?.try_into().ok()?)),
        l => (2, l as u64),
    };
    if masked {
        len += 4;
    }
    (b.len() >= len).then_some(Header { len, payload, opcode, fin, masked, rsv })
}

/// Why a frame cannot be passed on, if it cannot.
fn refuse(h: &Header, in_message: bool, size: u64) -> Option<&'static str> {
    let control = h.opcode >= 8;
    match h.opcode {
        _ if h.masked => Some("a masked frame from the server"),
        _ if h.rsv => Some("RSV bits set, but no extension was negotiated"),
        3..=7 | 11..=15 => Some("a reserved opcode"),
        _ if control && (!h.fin || h.payload > 125) => Some("a fragmented or oversized control frame"),
        0 if !in_message => Some("a continuation frame outside a message"),
        1 | 2 if in_message => Some("a new message inside a fragmented one"),
        _ if !control && size.saturating_add(h.payload) > MAX_MESSAGE => {
            Some("a message too large to scan for credentials")
        }
        _ => None,
    }
}

/// Copy frames from `from` to `to`, masking secrets in every frame's payload.
pub async fn mask<R, W>(mut from: R, mut to: W, set: Set) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut message = Message::default();
    let mut in_message = false;
    loop {
        let Some(h) = header(&buf) else {
            if from.read_buf(&mut buf).await? == 0 {
                // A frame cut off by the upstream's close is never passed on.
                return to.shutdown().await;
            }
            continue;
        };
        if let Some(why) = refuse(&h, in_message, message.size) {
            to.write_all(&PROTOCOL_ERROR).await?;
            to.shutdown().await?;
            return Err(std::io::Error::other(format!("WebSocket connection failed: {why}")));
        }
        // Bounded: control payloads by 125 bytes, messages by `MAX_MESSAGE`.
        let total = h.len + h.payload as usize;
        while buf.len() < total {
            if from.read_buf(&mut buf).await? == 0 {
                return to.shutdown().await;
            }
        }
        if h.opcode >= 8 {
            let mut frame = buf.split_to(total);
            // A close frame's payload starts with a two-byte status code.
            let text = h.len + if h.opcode == 8 { 2.min(h.payload as usize) } else { 0 };
            set.mask(&mut frame[text..]);
            to.write_all(&frame).await?;
            continue;
        }
        message.size += h.payload;
        message.push(&buf[..total], h.len);
        buf.advance(total);
        in_message = !h.fin;
        if h.fin {
            to.write_all(&message.finish(&set)).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::Redactor;
    use crate::secrets::Secret;
    use std::sync::Arc;

    const SECRET: &str = "ws-secret-value-0123";

    fn set() -> Set {
        Set::new(vec![Arc::new(Redactor::new(&[Secret::new(SECRET.into())]).unwrap())]).unwrap()
    }

    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![first];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    fn data(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        frame((if fin { 0x80 } else { 0 }) | opcode, payload)
    }

    async fn run(input: Vec<u8>) -> (Vec<u8>, std::io::Result<()>) {
        let mut out = Vec::new();
        // Feed in awkward pieces: the reader returns a few bytes at a time.
        let result = mask(slow_reader(input), &mut out, set()).await;
        (out, result)
    }

    #[tokio::test]
    async fn every_message_and_control_payload_is_masked() {
        let mut input = data(1, true, format!("hello {SECRET}!").as_bytes());
        input.extend(data(2, true, SECRET.as_bytes()));
        input.extend(data(1, false, format!("part {SECRET}").as_bytes()));
        input.extend(data(0, true, format!("{SECRET} end").as_bytes()));
        // Split across three fragments, with a ping between them.
        let (a, b) = SECRET.split_at(7);
        let (b, c) = b.split_at(6);
        input.extend(data(1, false, format!("split {a}").as_bytes()));
        input.extend(data(0, false, b.as_bytes()));
        input.extend(data(9, true, format!("ping {SECRET}").as_bytes()));
        input.extend(data(0, true, format!("{c} done").as_bytes()));
        input.extend(data(1, true, "x".repeat(300).as_bytes()));
        input.extend(data(8, true, &[&[0x03, 0xe8][..], format!("bye {SECRET}").as_bytes()].concat()));
        let (out, result) = run(input.clone()).await;
        result.unwrap();
        assert_eq!(out.len(), input.len(), "frame lengths unchanged");
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains(SECRET), "{text}");
        assert!(!text.contains(&format!("split {a}")) && !text.contains(&format!("{c} done")), "{text}");
        assert!(text.contains("split *******") && text.contains("******* done"), "{text}");
        assert!(text.contains("ping ****") && text.contains("bye ****"), "{text}");
        assert!(out.windows(2).any(|w| w == [0x03, 0xe8]), "the close status is kept");
    }

    #[tokio::test]
    async fn frames_latchkey_cannot_read_fail_the_connection() {
        let masked = {
            let key = [1u8, 2, 3, 4];
            let payload: Vec<u8> = SECRET.bytes().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
            let mut f = vec![0x81, 0x80 | payload.len() as u8];
            f.extend_from_slice(&key);
            f.extend(payload);
            f
        };
        let cases = [
            ("masked", masked),
            ("reserved opcode", data(3, true, SECRET.as_bytes())),
            ("reserved control opcode", data(0xb, true, SECRET.as_bytes())),
            ("rsv1", frame(0x80 | 0x40 | 1, SECRET.as_bytes())),
            ("stray continuation", data(0, true, SECRET.as_bytes())),
            ("fragmented ping", data(9, false, SECRET.as_bytes())),
        ];
        for (what, bad) in cases {
            let mut input = data(1, true, b"before");
            input.extend(bad);
            input.extend(data(1, true, format!("after {SECRET}").as_bytes()));
            let (out, result) = run(input).await;
            assert!(result.is_err(), "{what}");
            let mut expected = data(1, true, b"before");
            expected.extend(PROTOCOL_ERROR);
            assert_eq!(out, expected, "{what}: the message before, then close 1002, nothing else");
        }
    }

    #[tokio::test]
    async fn a_frame_cut_off_by_the_upstream_is_not_passed_on() {
        let mut input = data(1, true, b"whole");
        let cut = data(2, true, format!("{SECRET}{SECRET}").as_bytes());
        input.extend_from_slice(&cut[..cut.len() - 3]);
        let (out, result) = run(input).await;
        result.unwrap();
        assert_eq!(out, data(1, true, b"whole"));
    }

    /// A reader that hands out 3 bytes per read.
    fn slow_reader(data: Vec<u8>) -> impl AsyncRead + Unpin {
        struct Slow(std::io::Cursor<Vec<u8>>);
        impl AsyncRead for Slow {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                let mut chunk = [0u8; 3];
                let n = std::io::Read::read(&mut self.0, &mut chunk)?;
                buf.put_slice(&chunk[..n]);
                std::task::Poll::Ready(Ok(()))
            }
        }
        Slow(std::io::Cursor::new(data))
    }
}
