//! Server-to-client WebSocket frames on a credentialed connection: a text message is
//! held until its last fragment (up to a bound) and the credential's secret masked in
//! place across the fragments — same length, so frame headers stay valid. Control frames
//! interleaved with the fragments go ahead at once; other frames stream through.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::redact::Redactor;

/// Largest text message latchkey scans; a larger one ends the connection (fail closed).
const MAX_TEXT_MESSAGE: u64 = 1 << 20;

/// The frames of a text message waiting for its last fragment.
#[derive(Default)]
struct Message {
    frames: BytesMut,
    /// Where each frame's payload sits in `frames`.
    payloads: Vec<std::ops::Range<usize>>,
    size: u64,
}

impl Message {
    /// Mask the secret across the fragments' joined payload and hand back the frames.
    fn finish(&mut self, redactor: &Redactor) -> BytesMut {
        let mut joined: Vec<u8> =
            self.payloads.iter().flat_map(|r| self.frames[r.clone()].to_vec()).collect();
        redactor.mask(&mut joined);
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

struct Header {
    len: usize,
    payload: u64,
    opcode: u8,
    fin: bool,
    masked: bool,
}

fn header(b: &[u8]) -> Option<Header> {
    if b.len() < 2 {
        return None;
    }
    let (fin, opcode, masked) = (b[0] & 0x80 != 0, b[0] & 0x0f, b[1] & 0x80 != 0);
    let (mut len, payload) = match b[1] & 0x7f {
        126 => (4, u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as u64),
        127 => (10, u64::from_be_bytes(b.get(2..10)?.try_into().ok()?)),
        l => (2, l as u64),
    };
    if masked {
        len += 4;
    }
    (b.len() >= len).then_some(Header { len, payload, opcode, fin, masked })
}

/// Copy frames from `from` to `to`, masking secrets in text messages.
pub async fn mask<R, W>(mut from: R, mut to: W, redactor: Arc<Redactor>) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut in_text = false;
    let mut message = Message::default();
    let mut passthrough: u64 = 0;
    loop {
        if passthrough > 0 {
            if buf.is_empty() && from.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
            let take = buf.len().min(usize::try_from(passthrough).unwrap_or(usize::MAX));
            to.write_all(&buf[..take]).await?;
            buf.advance(take);
            passthrough -= take as u64;
            continue;
        }
        let Some(h) = header(&buf) else {
            if from.read_buf(&mut buf).await? == 0 {
                to.write_all(&buf).await?;
                return to.shutdown().await;
            }
            continue;
        };
        // Server frames are never masked; a masked one is not ours to rewrite.
        let text = !h.masked && (h.opcode == 1 || (h.opcode == 0 && in_text));
        if h.opcode == 1 {
            in_text = !h.fin;
        } else if h.opcode == 0 && h.fin {
            in_text = false;
        }
        if !text {
            to.write_all(&buf[..h.len]).await?;
            buf.advance(h.len);
            passthrough = h.payload;
            continue;
        }
        message.size += h.payload;
        if message.size > MAX_TEXT_MESSAGE {
            return Err(std::io::Error::other("text message too large to scan for the credential"));
        }
        let total = h.len + h.payload as usize;
        while buf.len() < total {
            if from.read_buf(&mut buf).await? == 0 {
                return Err(std::io::Error::other("connection ended inside a frame"));
            }
        }
        let start = message.frames.len();
        message.frames.extend_from_slice(&buf[..total]);
        message.payloads.push(start + h.len..start + total);
        buf.advance(total);
        if h.fin {
            to.write_all(&message.finish(&redactor)).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::Secret;

    fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
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

    #[tokio::test]
    async fn text_frames_are_masked_binary_untouched() {
        let secret = "ws-secret-value-0123";
        let r = Arc::new(Redactor::new(&[Secret::new(secret.into())]).unwrap());
        let mut input = frame(1, true, format!("hello {secret}!").as_bytes());
        input.extend(frame(2, true, secret.as_bytes()));
        input.extend(frame(1, false, format!("part {secret}").as_bytes()));
        input.extend(frame(0, true, format!("{secret} end").as_bytes()));
        // Split across three fragments, with a ping between them.
        let (a, b) = secret.split_at(7);
        let (b, c) = b.split_at(6);
        input.extend(frame(1, false, format!("split {a}").as_bytes()));
        input.extend(frame(0, false, b.as_bytes()));
        input.extend(frame(9, true, b"ping"));
        input.extend(frame(0, true, format!("{c} done").as_bytes()));
        input.extend(frame(1, true, "x".repeat(300).as_bytes()));
        let mut out = Vec::new();
        // Feed in awkward pieces: the reader returns a few bytes at a time.
        let reader = tokio_test_reader(input.clone());
        mask(reader, &mut out, r).await.unwrap();
        assert_eq!(out.len(), input.len(), "frame lengths unchanged");
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches(secret).count(), 1, "only the binary frame keeps it: {text}");
        assert!(!text.contains(&format!("split {a}")) && !text.contains(&format!("{c} done")), "{text}");
        assert!(text.contains("split *******") && text.contains("******* done"), "{text}");
        assert!(out.windows(4).any(|w| w == b"ping"), "control frame passed");
    }

    /// A reader that hands out 3 bytes per read.
    fn tokio_test_reader(data: Vec<u8>) -> impl AsyncRead + Unpin {
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
