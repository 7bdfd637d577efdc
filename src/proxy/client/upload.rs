//! A request going up on the own client's connection: its head and its body's frames
//! gathered into writes of up to `GATHER` bytes (a head and a small body leave in one
//! TLS record), the body held to the length the head announced.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::Body as _;
use tokio::io::AsyncWrite;

use super::Error;
use crate::proxy::Body;

/// Bytes gathered before they are written.
const GATHER: usize = 64 * 1024;

pub struct Upload {
    /// The body still to read; `None` once it has ended (or for a request without one).
    body: Option<Body>,
    /// Bytes the announced length still expects.
    left: u64,
    out: Vec<u8>,
    written: usize,
    flushed: bool,
}

impl Upload {
    /// `head`, then `body` of exactly `length` bytes.
    pub fn new(head: Vec<u8>, body: Option<Body>, length: u64) -> Upload {
        Upload { body, left: length, out: head, written: 0, flushed: false }
    }

    /// Everything written and flushed.
    pub fn is_done(&self) -> bool {
        self.body.is_none() && self.written == self.out.len() && self.flushed
    }

    /// Write what there is to write; ready once the whole request has been written.
    pub fn poll_send<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Error>> {
        loop {
            if self.written < self.out.len() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.out[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                }
                self.written += n;
                continue;
            }
            self.out.clear();
            self.written = 0;
            if self.gather(cx)? {
                continue;
            }
            // Whatever was written goes out before waiting for more of the body.
            ready!(Pin::new(&mut *io).poll_flush(cx))?;
            if self.body.is_some() {
                return Poll::Pending;
            }
            self.flushed = true;
            return Poll::Ready(Ok(()));
        }
    }

    /// Append the body's ready frames to `out`, up to `GATHER` bytes; `true`: there is
    /// something to write. Trailers are dropped: a length-framed body cannot carry them
    /// (hyper drops them too).
    fn gather(&mut self, cx: &mut Context<'_>) -> Result<bool, Error> {
        while self.out.len() < GATHER
            && let Some(body) = self.body.as_mut()
        {
            match Pin::new(body).poll_frame(cx) {
                Poll::Pending => break,
                Poll::Ready(None) if self.left == 0 => self.body = None,
                Poll::Ready(None) => return Err(Error::BodyLength),
                Poll::Ready(Some(Err(e))) => return Err(Error::Body(e)),
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else { continue };
                    self.left = self.left.checked_sub(data.len() as u64).ok_or(Error::BodyLength)?;
                    self.out.extend_from_slice(&data);
                    // The length is all the head promised: done, without waiting for the
                    // body to say it ended (an HTTP/2 stream may stay open), as hyper.
                    if self.left == 0 {
                        self.body = None;
                    }
                }
            }
        }
        Ok(!self.out.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::BodyExt;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    /// A body that yields its one piece and then never ends (an HTTP/2 stream left open).
    struct OpenEnded(Option<Bytes>);

    impl http_body::Body for OpenEnded {
        type Data = Bytes;
        type Error = crate::proxy::BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.0.take() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => Poll::Pending,
            }
        }
    }

    async fn send(body: &'static [u8], length: u64) -> (Result<(), Error>, Vec<u8>) {
        let (mut near, mut far) = tokio::io::duplex(1024);
        let body = OpenEnded(Some(Bytes::from_static(body))).boxed();
        let mut upload = Upload::new(b"PUT / HTTP/1.1\r\n\r\n".to_vec(), Some(body), length);
        let sending = std::future::poll_fn(|cx| upload.poll_send(&mut near, cx));
        let sent = tokio::time::timeout(Duration::from_secs(5), sending).await.expect("not left waiting");
        drop(near);
        let mut wrote = Vec::new();
        far.read_to_end(&mut wrote).await.unwrap();
        (sent, wrote)
    }

    #[tokio::test]
    async fn an_upload_is_done_at_its_length_without_waiting_for_the_body_to_end() {
        let (sent, wrote) = send(b"abc", 3).await;
        assert!(sent.is_ok(), "{sent:?}");
        assert_eq!(wrote, b"PUT / HTTP/1.1\r\n\r\nabc");
    }

    #[tokio::test]
    async fn a_body_longer_than_its_length_is_refused_before_any_of_it_goes() {
        let (sent, wrote) = send(b"abcd", 3).await;
        assert!(matches!(sent, Err(Error::BodyLength)), "{sent:?}");
        assert_eq!(wrote, b"PUT / HTTP/1.1\r\n\r\n", "the head only: nothing past the length");
    }
}
