//! A `Content-Length` request body read straight from the client's connection.
//!
//! The body holds the connection's read half while it streams and hands it back, with
//! whatever the client sent after the body (a pipelined request), the moment its last
//! byte is read. A body dropped before its end never hands it back: the serving loop
//! then closes the connection after the response, as hyper does.

use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::oneshot;

use super::super::BoxError;

/// Largest piece read from the client at once.
const READ: usize = 16 * 1024;

/// The connection's read half and the bytes read from it not used yet.
pub struct Reader<R> {
    pub io: R,
    pub buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// Read once, appending at most `max` bytes to `buf`; `Ok(0)` at end of input.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<std::io::Result<usize>> {
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ];
        let mut rb = ReadBuf::uninit(&mut chunk[..max.clamp(1, READ)]);
        std::task::ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        self.buf.extend_from_slice(rb.filled());
        Poll::Ready(Ok(rb.filled().len()))
    }
}

/// The client closed its connection before the body's last byte.
#[derive(Debug, thiserror::Error)]
#[error("the client closed the connection {0} bytes before the end of its body")]
pub struct Truncated(u64);

/// A request body of `remaining` bytes. The reader sits in a mutex only to make the
/// body `Sync` (as boxed bodies must be); polling takes it with `get_mut`, no lock.
pub struct LengthBody<R> {
    reader: Mutex<Option<Reader<R>>>,
    remaining: u64,
    back: Option<oneshot::Sender<Reader<R>>>,
}

impl<R> LengthBody<R> {
    pub fn new(reader: Reader<R>, length: u64, back: oneshot::Sender<Reader<R>>) -> Self {
        LengthBody { reader: Mutex::new(Some(reader)), remaining: length, back: Some(back) }
    }

    fn slot(&mut self) -> &mut Option<Reader<R>> {
        self.reader.get_mut().unwrap_or_else(|p| p.into_inner())
    }

    fn give_back(&mut self) {
        if let (Some(reader), Some(back)) = (self.slot().take(), self.back.take()) {
            let _ = back.send(reader);
        }
    }
}

impl<R: AsyncRead + Unpin> http_body::Body for LengthBody<R> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let Some(reader) = this.reader.get_mut().unwrap_or_else(|p| p.into_inner()).as_mut() else {
            return Poll::Ready(None);
        };
        if reader.buf.is_empty() {
            let want = usize::try_from(this.remaining).unwrap_or(usize::MAX);
            match std::task::ready!(reader.poll_fill(cx, want)) {
                Ok(0) => {
                    *this.slot() = None;
                    return Poll::Ready(Some(Err(Box::new(Truncated(this.remaining)))));
                }
                Ok(_) => {}
                Err(e) => {
                    *this.slot() = None;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
        let n = reader.buf.len().min(usize::try_from(this.remaining).unwrap_or(usize::MAX));
        let data = if n == reader.buf.len() {
            Bytes::from(std::mem::take(&mut reader.buf))
        } else {
            Bytes::copy_from_slice(&reader.buf[..n])
        };
        if n < reader.buf.len() {
            reader.buf.drain(..n);
        }
        this.remaining -= n as u64;
        if this.remaining == 0 {
            this.give_back();
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}
