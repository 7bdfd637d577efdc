//! latchkey's own HTTP/1.1 client for the upstream leg (issue 20).
//!
//! hyper's client runs each connection in a task of its own: a request is handed to it
//! through a channel, its response comes back through another, and every body frame
//! wakes a second task, often on the other worker thread. This client does the exchange
//! in the request's own task: the head (and a small body with it) is written in one
//! write, the response head is parsed off the connection, and the response body is read
//! by whoever polls it (the client's connection task), the connection going back to the
//! pool at the body's last byte. It takes requests without a body, with a body of known
//! length, or chunked (`upload`).
//!
//! An upload and its response are full duplex: an upstream may answer before it has read
//! the whole body, and then keep reading it while it streams its answer. So the body
//! goes up while the response head is awaited, and if the head comes first, what is
//! left of the body goes up from a task of its own on the connection's write half —
//! never waiting on the client reading the response — and that connection is not pooled
//! again.
//!
//! The framing rules are the codec's ([`codec`]); this file only moves bytes.

pub mod codec;
mod upload;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Response;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::sync::oneshot;

use super::upstream::UpstreamIo;
use super::{Body, BoxError};
use codec::{Decoder, Head, Malformed, Parsed, Step};
pub use upload::{Upload, declared_trailers};

/// The first read of a response head.
const HEAD_READ: usize = 4 * 1024;
/// A body is read into allocations of up to `BODY_ALLOC` bytes, each filled by several
/// reads (a TLS record's worth apiece) before the next: one allocation per read, or
/// allocations past glibc's mmap threshold (128 KiB), cost a 1 MiB download 10–20%
/// (page faults; measured against 16, 128 and 256 KiB).
const BODY_ALLOC: usize = 64 * 1024;
/// Least room worth reading into: one TLS record.
const BODY_READ: usize = 16 * 1024;
/// Most read buffer an idle connection keeps.
const IDLE_BUF: usize = 64 * 1024;

/// An HTTP/1.1 upstream connection between exchanges, with what was read and not used.
pub struct Conn {
    io: Io,
    buf: BytesMut,
}

/// The connection, or only its read half once an upload went on without the response
/// (with what tells the upload when the response is over: dropped with the half).
enum Io {
    Whole(UpstreamIo),
    Read { half: ReadHalf<UpstreamIo>, _over: oneshot::Sender<()> },
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Whole(io) => Pin::new(io).poll_read(cx, buf),
            Io::Read { half, .. } => Pin::new(half).poll_read(cx, buf),
        }
    }
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Malformed(#[from] Malformed),
    #[error("connection closed before message completed")]
    Closed,
    /// The request body failed (the client's read, a scan that refused it).
    #[error("{0}")]
    Body(#[source] BoxError),
    #[error("the request body's length is not its content-length")]
    BodyLength,
}

/// A failed exchange, and whether the upstream can have seen any of a response.
#[derive(Debug)]
pub struct Failed {
    pub error: Error,
    /// Nothing came back before the connection failed: an idempotent request without
    /// a body may be sent again on another connection.
    pub unanswered: bool,
}

impl Conn {
    pub fn new(io: UpstreamIo) -> Conn {
        Conn { io: Io::Whole(io), buf: BytesMut::new() }
    }

    /// Still open and silent. An idle upstream connection may have been closed by the
    /// upstream at any moment; a look without waiting finds most such before a request
    /// is written on them (the close, or bytes nobody asked for, are already read).
    /// Costs no system call unless the socket has something to say.
    pub fn is_fit(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = [0u8; 1];
        let mut rb = ReadBuf::new(&mut probe);
        matches!(Pin::new(&mut self.io).poll_read(&mut cx, &mut rb), Poll::Pending)
    }

    /// Send the request (`upload`) and read the response head (1xx skipped), the body
    /// going up while the head is awaited.
    pub async fn exchange(&mut self, upload: &mut Upload, head_request: bool) -> Result<Head, Failed> {
        // Only a whole connection is ever pooled (`Returning::finish`).
        let Io::Whole(io) = &mut self.io else {
            return Err(Failed { error: Error::Closed, unanswered: true });
        };
        let buf = &mut self.buf;
        let mut answered = false;
        // A write that failed: the upstream may have answered and closed without reading
        // the rest (a 413), so its answer is still read, and this said only if none came.
        let mut unsent: Option<Error> = None;
        std::future::poll_fn(|cx| {
            let failed =
                |error: Error, answered: bool| Poll::Ready(Err(Failed { error, unanswered: !answered }));
            loop {
                if unsent.is_none()
                    && !upload.is_done()
                    && let Poll::Ready(Err(e)) = upload.poll_send(io, cx)
                {
                    match e {
                        Error::Io(_) => unsent = Some(e),
                        e => return failed(e, answered),
                    }
                }
                match codec::parse_head(buf, head_request) {
                    Ok(Parsed::Final(head)) => return Poll::Ready(Ok(head)),
                    Ok(Parsed::Interim) => continue,
                    Ok(Parsed::Partial) => {}
                    Err(e) => return failed(e.into(), true),
                }
                let want = if buf.is_empty() { HEAD_READ } else { buf.len() };
                buf.reserve(want);
                match ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf)) {
                    Ok(0) => return failed(unsent.take().unwrap_or(Error::Closed), answered),
                    Ok(_) => answered = true,
                    Err(e) => return failed(unsent.take().unwrap_or(e.into()), answered),
                }
            }
        })
        .await
    }
}

/// Where a connection goes once a response has been read to its end.
pub trait Home: Send + Sync + Unpin + 'static {
    fn take_back(self, conn: Conn);
}

/// A response body read off its connection by whoever polls it; at its last byte the
/// connection goes home when it is fit for another exchange. Dropped before its end,
/// the connection closes with it.
pub struct Returning<H: Home> {
    conn: Option<Conn>,
    decoder: Decoder,
    home: Option<H>,
}

/// A response whose body returns its connection to `home`. An upload not finished when
/// the head came goes on from a task of its own, for at most `limit` after the
/// response's end, and the connection is not reused.
pub fn response<H: Home>(conn: Conn, head: Head, upload: Upload, home: H, limit: Duration) -> Response<Body> {
    use http_body_util::BodyExt;
    let mut home = head.reusable.then_some(home);
    let conn = match (upload.is_done(), conn) {
        (false, Conn { io: Io::Whole(io), buf }) => {
            let (read, write) = tokio::io::split(io);
            let (over, response_over) = oneshot::channel();
            home = None;
            tokio::spawn(finish_upload(upload, write, response_over, limit));
            Conn { io: Io::Read { half: read, _over: over }, buf }
        }
        (_, conn) => conn,
    };
    let mut body = Returning { conn: Some(conn), decoder: Decoder::new(head.framing), home };
    if body.decoder.is_done() {
        body.finish();
    }
    head.response.map(|()| body.boxed())
}

/// The rest of an upload the upstream answered before reading it all. A body that
/// fails now (the client's read, a scan that refused it) or is not all sent within
/// `limit` of the response's end shuts the connection's write side: the upstream sees
/// the request cut short, never the refused part. Without the limit a client that stops
/// sending (its connection or HTTP/2 stream left open), or an upstream that stops
/// reading, would hold this connection and the client's for ever (`proxy/answered.rs`
/// bounds the body the same way on every path, but only while it is polled; this also
/// bounds a write the upstream never takes, which hyper's paths do not).
async fn finish_upload(
    mut upload: Upload,
    mut write: WriteHalf<UpstreamIo>,
    response_over: oneshot::Receiver<()>,
    limit: Duration,
) {
    let send = std::future::poll_fn(|cx| upload.poll_send(&mut write, cx));
    let late = async {
        let _ = response_over.await; // sent or dropped: over
        tokio::time::sleep(limit).await;
    };
    let failed = tokio::select! {
        sent = send => match sent {
            Ok(()) => return,
            Err(e) => e.to_string(),
        },
        () = late => format!("not sent within {}s of the response's end", limit.as_secs()),
    };
    tracing::debug!("the rest of an upload after an early response: {failed}");
    drop(upload); // the client's side goes first: its connection is let go
    // An upstream that reads nothing more may never take the close either.
    let _ = tokio::time::timeout(Duration::from_secs(1), write.shutdown()).await;
}

impl<H: Home> Returning<H> {
    /// The body has ended: the connection goes home if nothing past the body was sent.
    fn finish(&mut self) {
        if let (Some(mut conn), Some(home)) = (self.conn.take(), self.home.take())
            && conn.buf.is_empty()
            && matches!(conn.io, Io::Whole(_))
        {
            // An idle connection keeps a read buffer only of a usual size (a large head
            // or body read grew it).
            if conn.buf.capacity() > IDLE_BUF {
                conn.buf = BytesMut::new();
            }
            home.take_back(conn);
        }
    }

    fn fail(&mut self, e: impl Into<Error>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.home = None;
        Poll::Ready(Some(Err(Box::new(e.into()))))
    }
}

impl<H: Home> http_body::Body for Returning<H> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.decoder.is_done() {
                this.finish();
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            match this.decoder.step(&mut conn.buf) {
                Err(e) => return this.fail(e),
                Ok(Step::Data(data)) => {
                    if this.decoder.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::Trailers(map)) => {
                    this.finish();
                    return Poll::Ready(Some(Ok(Frame::trailers(map))));
                }
                Ok(Step::Done) => continue,
                Ok(Step::More) => {}
            }
            let want = this.decoder.remaining().map_or(BODY_ALLOC, |n| n.min(BODY_ALLOC as u64) as usize);
            if conn.buf.capacity() - conn.buf.len() < want.min(BODY_READ) {
                conn.buf.reserve(want.max(1));
            }
            match ready!(tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf)) {
                Ok(0) => match this.decoder.eof() {
                    Ok(()) => {
                        // Read to the close: the connection is spent.
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    Err(e) => return this.fail(e),
                },
                Ok(_) => {}
                Err(e) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
