//! A request going up on the own client's connection: its head and its body's frames
//! gathered into writes of up to `GATHER` bytes (a head and a small body leave in one
//! TLS record), the body held to the length the head announced, or chunked.

use std::io::{self, Write as _};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, HeaderName, header};
use http_body::Body as _;
use tokio::io::AsyncWrite;

use super::Error;
use crate::proxy::Body;

/// Bytes gathered before they are written.
const GATHER: usize = 64 * 1024;

pub struct Upload {
    /// The body still to read; `None` once it has ended (or for a request without one).
    body: Option<Body>,
    framing: Framing,
    out: Vec<u8>,
    written: usize,
    flushed: bool,
}

enum Framing {
    /// Bytes the announced length still expects.
    Length(u64),
    /// Chunked, with the trailer fields the head declared (the others are dropped).
    Chunked(Vec<HeaderName>),
}

impl Upload {
    /// `head`, then `body` of exactly `length` bytes.
    pub fn new(head: Vec<u8>, body: Option<Body>, length: u64) -> Upload {
        Upload::with(head, body, Framing::Length(length))
    }

    /// `head` (which says `Transfer-Encoding: chunked`), then `body` in chunks, each
    /// frame one, and the last chunk with the trailers `head` declares.
    pub fn chunked(head: Vec<u8>, body: Body, declared: Vec<HeaderName>) -> Upload {
        Upload::with(head, Some(body), Framing::Chunked(declared))
    }

    fn with(head: Vec<u8>, body: Option<Body>, framing: Framing) -> Upload {
        Upload { body, framing, out: head, written: 0, flushed: false }
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
            if self.written == 0 {
                // What the body has ready joins what waits, the head the first time: a
                // head and a small body are one write, so one TLS record and one segment
                // for the upstream to read, not two.
                self.gather(cx)?;
            }
            if self.written < self.out.len() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.out[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                }
                self.written += n;
                if self.written == self.out.len() {
                    self.out.clear();
                    self.written = 0;
                }
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

    /// Append the body's ready frames to `out`, up to `GATHER` bytes. A length-framed
    /// body's trailers are dropped (it cannot carry them; hyper drops them too).
    fn gather(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        while self.out.len() < GATHER
            && let Some(body) = self.body.as_mut()
        {
            match Pin::new(body).poll_frame(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => self.end(None)?,
                Poll::Ready(Some(Err(e))) => return Err(Error::Body(e)),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => self.data(&data)?,
                    Err(frame) => {
                        if let (Ok(trailers), Framing::Chunked(_)) = (frame.into_trailers(), &self.framing) {
                            self.end(Some(trailers))?;
                        }
                    }
                },
            }
        }
        Ok(())
    }

    fn data(&mut self, data: &[u8]) -> Result<(), Error> {
        match &mut self.framing {
            Framing::Length(left) => {
                *left = left.checked_sub(data.len() as u64).ok_or(Error::BodyLength)?;
                self.out.extend_from_slice(data);
                // The length is all the head promised: done, without waiting for the
                // body to say it ended (an HTTP/2 stream may stay open), as hyper.
                if *left == 0 {
                    self.body = None;
                }
            }
            // An empty chunk would be the last one.
            Framing::Chunked(_) if data.is_empty() => {}
            Framing::Chunked(_) => {
                let _ = write!(self.out, "{:x}\r\n", data.len());
                self.out.extend_from_slice(data);
                self.out.extend_from_slice(b"\r\n");
            }
        }
        Ok(())
    }

    /// The body ended (with `trailers`, for a chunked one).
    fn end(&mut self, trailers: Option<HeaderMap>) -> Result<(), Error> {
        self.body = None;
        match &self.framing {
            Framing::Length(0) => Ok(()),
            Framing::Length(_) => Err(Error::BodyLength),
            Framing::Chunked(declared) => {
                self.out.extend_from_slice(b"0\r\n");
                for (name, value) in trailers.iter().flatten() {
                    if declared.contains(name) && may_trail(name) {
                        self.out.extend_from_slice(name.as_str().as_bytes());
                        self.out.extend_from_slice(b": ");
                        self.out.extend_from_slice(value.as_bytes());
                        self.out.extend_from_slice(b"\r\n");
                    }
                }
                self.out.extend_from_slice(b"\r\n");
                Ok(())
            }
        }
    }
}

/// The fields a request's `Trailer` headers name (comma-separated, any case): the only
/// trailers sent, as hyper does.
pub fn declared_trailers(headers: &HeaderMap) -> Vec<HeaderName> {
    let names = headers.get_all(header::TRAILER).iter().filter_map(|v| v.to_str().ok());
    names
        .flat_map(|s| s.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// Not a trailer even when declared: fields that frame, route or authorise the message
/// (hyper's list).
fn may_trail(name: &HeaderName) -> bool {
    !matches!(
        *name,
        header::AUTHORIZATION
            | header::CACHE_CONTROL
            | header::CONTENT_ENCODING
            | header::CONTENT_LENGTH
            | header::CONTENT_RANGE
            | header::CONTENT_TYPE
            | header::HOST
            | header::MAX_FORWARDS
            | header::SET_COOKIE
            | header::TRAILER
            | header::TRANSFER_ENCODING
            | header::TE
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::BodyExt;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    /// A body of the given frames, then its end (`true`), or nothing more and no end
    /// (an HTTP/2 stream left open).
    struct Frames(std::collections::VecDeque<Frame<Bytes>>, bool);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = crate::proxy::BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.0.pop_front() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None if self.1 => Poll::Ready(None),
                None => Poll::Pending,
            }
        }
    }

    async fn send(body: &'static [u8], length: u64) -> (Result<(), Error>, Vec<u8>) {
        let (mut near, mut far) = tokio::io::duplex(1024);
        let body = Frames([Frame::data(Bytes::from_static(body))].into(), false).boxed();
        let mut upload = Upload::new(b"PUT / HTTP/1.1\r\n\r\n".to_vec(), Some(body), length);
        let sending = std::future::poll_fn(|cx| upload.poll_send(&mut near, cx));
        let sent = tokio::time::timeout(Duration::from_secs(5), sending).await.expect("not left waiting");
        drop(near);
        let mut wrote = Vec::new();
        far.read_to_end(&mut wrote).await.unwrap();
        (sent, wrote)
    }

    /// Every write it is given, as it was given.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.get_mut().0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_head_and_the_body_it_has_ready_leave_in_one_write() {
        let frames = [Frame::data(Bytes::from_static(b"{\"a\":")), Frame::data(Bytes::from_static(b"1}"))];
        let body = Frames(frames.into(), false).boxed();
        let mut upload = Upload::new(b"POST / HTTP/1.1\r\n\r\n".to_vec(), Some(body), 7);
        let mut io = Writes::default();
        std::future::poll_fn(|cx| upload.poll_send(&mut io, cx)).await.unwrap();
        assert_eq!(io.0, [b"POST / HTTP/1.1\r\n\r\n{\"a\":1}".to_vec()]);

        // A body not ready yet does not hold the head back.
        let body = Frames([].into(), false).boxed();
        let mut upload = Upload::new(b"POST / HTTP/1.1\r\n\r\n".to_vec(), Some(body), 7);
        let mut io = Writes::default();
        let waiting = std::future::poll_fn(|cx| upload.poll_send(&mut io, cx));
        assert!(tokio::time::timeout(Duration::from_millis(50), waiting).await.is_err());
        assert_eq!(io.0, [b"POST / HTTP/1.1\r\n\r\n".to_vec()]);
    }

    #[tokio::test]
    async fn an_upload_is_done_at_its_length_without_waiting_for_the_body_to_end() {
        let (sent, wrote) = send(b"abc", 3).await;
        assert!(sent.is_ok(), "{sent:?}");
        assert_eq!(wrote, b"PUT / HTTP/1.1\r\n\r\nabc");
    }

    #[tokio::test]
    async fn a_chunked_upload_is_a_chunk_per_frame_then_the_declared_trailers() {
        let mut trailers = HeaderMap::new();
        for (name, value) in [("x-kept", "yes"), ("authorization", "no"), ("x-undeclared", "no")] {
            trailers.insert(name, value.parse().unwrap());
        }
        let frames = [Frame::data(Bytes::from_static(b"abc")), Frame::data(Bytes::new())];
        let frames =
            frames.into_iter().chain([Frame::data(Bytes::from(vec![b'x'; 17])), Frame::trailers(trailers)]);
        let mut head = HeaderMap::new();
        head.append(header::TRAILER, "X-Kept, authorization".parse().unwrap());
        let declared = declared_trailers(&head);
        let body = Frames(frames.collect(), true).boxed();
        let mut upload = Upload::chunked(b"POST / HTTP/1.1\r\n\r\n".to_vec(), body, declared);
        let (mut near, mut far) = tokio::io::duplex(1 << 16);
        std::future::poll_fn(|cx| upload.poll_send(&mut near, cx)).await.unwrap();
        assert!(upload.is_done());
        drop(near);
        let mut wrote = Vec::new();
        far.read_to_end(&mut wrote).await.unwrap();
        let want = format!(
            "POST / HTTP/1.1\r\n\r\n3\r\nabc\r\n11\r\n{}\r\n0\r\nx-kept: yes\r\n\r\n",
            "x".repeat(17)
        );
        assert_eq!(
            String::from_utf8_lossy(&wrote),
            want,
            "no empty chunk, only declared trailers that may trail"
        );
    }

    #[tokio::test]
    async fn frames_larger_than_a_write_go_whole_and_in_order() {
        let big = |b: u8| Bytes::from(vec![b; GATHER + 3]);
        let frames = || [big(b'a'), Bytes::from_static(b"small"), big(b'b')].map(Frame::data);
        let total = 2 * (GATHER + 3) + 5;
        let uploads = [
            (Upload::new(b"H".to_vec(), Some(Frames(frames().into(), true).boxed()), total as u64), false),
            (Upload::chunked(b"H".to_vec(), Frames(frames().into(), true).boxed(), Vec::new()), true),
        ];
        for (mut upload, chunked) in uploads {
            // A pipe much smaller than a frame: every write is partial.
            let (mut near, mut far) = tokio::io::duplex(1000);
            let reading = tokio::spawn(async move {
                let mut wrote = Vec::new();
                far.read_to_end(&mut wrote).await.unwrap();
                wrote
            });
            std::future::poll_fn(|cx| upload.poll_send(&mut near, cx)).await.unwrap();
            drop(near);
            let mut want = b"H".to_vec();
            for piece in frames().map(|f| f.into_data().unwrap()) {
                if chunked {
                    want.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                }
                want.extend_from_slice(&piece);
                if chunked {
                    want.extend_from_slice(b"\r\n");
                }
            }
            if chunked {
                want.extend_from_slice(b"0\r\n\r\n");
            }
            assert!(reading.await.unwrap() == want, "chunked: {chunked}");
        }
    }

    #[tokio::test]
    async fn a_chunked_upload_without_trailers_ends_with_the_last_chunk() {
        let frames = [Frame::data(Bytes::from_static(b"abc"))];
        let body = Frames(frames.into_iter().collect(), true).boxed();
        let mut upload = Upload::chunked(b"PUT / HTTP/1.1\r\n\r\n".to_vec(), body, Vec::new());
        let (mut near, mut far) = tokio::io::duplex(1 << 16);
        std::future::poll_fn(|cx| upload.poll_send(&mut near, cx)).await.unwrap();
        drop(near);
        let mut wrote = Vec::new();
        far.read_to_end(&mut wrote).await.unwrap();
        assert_eq!(wrote, b"PUT / HTTP/1.1\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
    }

    #[tokio::test]
    async fn a_body_longer_than_its_length_is_refused_before_any_of_it_goes() {
        let (sent, wrote) = send(b"abcd", 3).await;
        assert!(matches!(sent, Err(Error::BodyLength)), "{sent:?}");
        assert_eq!(wrote, b"", "nothing: the body was too long before the head left");
    }
}
