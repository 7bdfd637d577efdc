//! latchkey's own HTTP/1.1 server for intercepted connections (issue 20).
//!
//! hyper's server keeps an 8 KiB read buffer and an 8 KiB write buffer per connection,
//! parses every head a second time after the framing guard, and hands each request to
//! its service through a dispatcher. This loop serves the requests agents send most —
//! HTTP/1.1, no body or a `Content-Length` one — with buffers sized to what a request
//! holds and freed between requests: the request head is copied once into its own
//! allocation, the response head is written into a buffer that lives while the response
//! is written; a body that came whole with its head is handed over as those bytes, and
//! a longer one reads the connection's read half while the answer is written on the
//! other (`with_body`). Whatever it does not take ([`codec::Parsed::Hyper`]) goes to
//! hyper from that head on, with everything read so far; hyper gives the connection
//! back once it rests (`park`).
//!
//! Every byte has passed the framing guard ([`framing::Guarded`]) first, so smuggling
//! is refused here exactly as before; the guard also times each head.

mod body;
pub mod codec;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::io;
use std::task::Poll;
use std::time::Duration;

use http::{Method, Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Body;
use super::framing::Guarded;
use super::linger::ClientBody;
use super::park::PARK_AFTER;
use body::{LengthBody, Reader};
use codec::{Framing, Parsed};

/// Response bytes gathered before they are written: small bodies go out with their
/// head in one TLS record and one write.
const GATHER: usize = 16 * 1024;

/// How the own server let go of a connection.
pub enum Served<S> {
    /// The connection is over.
    Closed,
    /// hyper serves it from here, starting with what was read and put back.
    Hyper(Box<Guarded<S>>),
}

/// What the loop needs from the configuration.
pub struct Settings {
    pub idle_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: usize,
}

/// Serve requests on `io` until it closes or a request needs hyper; `between_requests`
/// when it comes back from hyper, at rest. `parked` counts the connections resting
/// between requests longer than [`PARK_AFTER`].
pub async fn serve<S, F, Fut>(
    mut io: Box<Guarded<S>>,
    between_requests: bool,
    settings: &Settings,
    parked: &prometheus_client::metrics::gauge::Gauge,
    mut service: F,
) -> Served<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut(Request<ClientBody>) -> Fut,
    Fut: Future<Output = Response<Body>>,
{
    let mut buf: Vec<u8> = Vec::new();
    // One timer for every rest of the connection, moved on each time (`rest`).
    let park_timer = tokio::time::sleep(PARK_AFTER);
    tokio::pin!(park_timer);
    // Since when the connection rests between requests (`None` before its first
    // request, whose head the guard times): empty lines do not end a rest, so they cannot
    // hold a connection open.
    let mut resting = between_requests.then(Instant::now);
    loop {
        if let Some(since) = resting
            && buf.is_empty()
        {
            // `rest` times a wait; a client sending empty lines without pause never lets
            // it wait, so the rest's end is also checked here.
            let (now, until) = (Instant::now(), since + settings.idle_timeout);
            if now >= until || !rest(&mut io, now, until, parked, park_timer.as_mut()).await {
                let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
                return Served::Closed;
            }
        }
        let (head, mut after) = match read_head(&mut io, &mut buf, settings, resting.is_some()).await {
            Ok(Read::Head(head, mut read)) => {
                let after = read.split_off(head.len);
                (head, after)
            }
            Ok(Read::Blank) => continue,
            Ok(Read::Hyper) => {
                io.unread(&buf);
                return Served::Hyper(io);
            }
            Err(_) => return Served::Closed,
        };
        let body = match head.body {
            0 => ClientBody::empty(),
            // The whole body came with its head (a JSON request, mostly): it is handed
            // over as the bytes read, and the connection stays here, unsplit.
            length if length <= after.len() as u64 => ClientBody::own(
                http_body_util::Full::new(after.split_to(length as usize))
                    .map_err(|never| match never {})
                    .boxed(),
            ),
            _ => {
                match with_body(io, after.to_vec(), head, settings.idle_timeout, &mut service).await {
                    Some((back, rest)) => (io, buf) = (back, rest),
                    None => return Served::Closed,
                }
                resting = Some(Instant::now());
                continue;
            }
        };
        // A request sent right behind this one (pipelined, rare) waits in `buf`; mostly
        // nothing does, and nothing is held while the request is served.
        buf = after.to_vec();
        let (head_request, close) = (head.request.method() == Method::HEAD, head.close);
        let resp = service(head.request.map(|()| body)).await;
        match respond(&mut io, resp, head_request, close).await {
            Ok(true) => resting = Some(Instant::now()),
            Ok(false) => {
                let _ = io.shutdown().await;
                return Served::Closed;
            }
            Err(_) => return Served::Closed,
        }
    }
}

/// A request with a `Content-Length` body: the body reads the connection while the
/// answer is written; the connection and what was read past the body come back when the
/// body was read to its end and the connection stays open (`None`: it was closed).
async fn with_body<S, F, Fut>(
    io: Box<Guarded<S>>,
    buf: Vec<u8>,
    head: codec::Head,
    idle: Duration,
    service: &mut F,
) -> Option<(Box<Guarded<S>>, Vec<u8>)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut(Request<ClientBody>) -> Fut,
    Fut: Future<Output = Response<Body>>,
{
    let head_request = head.request.method() == Method::HEAD;
    let (rd, mut wr) = tokio::io::split(io);
    let (back, mut returned) = oneshot::channel();
    let body = LengthBody::new(Reader { io: rd, buf }, head.body, back);
    let resp = service(head.request.map(|()| ClientBody::own(body.boxed()))).await;
    let keep = respond(&mut wr, resp, head_request, head.close).await.ok()?;
    let reader = match returned.try_recv() {
        Ok(reader) => Some(reader),
        // Answered while the body is still read (an upstream that answered before the
        // upload ended): the client's next bytes are that body's, and nothing else reads
        // the connection until it ends or is dropped, as with hyper. A lingering close
        // now would read them too.
        Err(oneshot::error::TryRecvError::Empty) => match tokio::time::timeout(idle, returned).await {
            Ok(read_out) => read_out.ok(),
            Err(_) => return None, // still held: closed once its holder lets go
        },
        Err(oneshot::error::TryRecvError::Closed) => None,
    };
    match reader {
        Some(reader) if keep => Some((reader.io.unsplit(wr), reader.buf)),
        Some(reader) => {
            let _ = reader.io.unsplit(wr).shutdown().await;
            None
        }
        // Dropped before its end (nobody reads the rest): the guard's lingering close
        // lets the client read the answer.
        None => {
            let _ = wr.shutdown().await;
            None
        }
    }
}

/// What the next bytes of a connection are.
// Not boxed, as `Parsed`: made once per request and taken apart at once.
#[allow(clippy::large_enum_variant)]
enum Read {
    /// A head, and what was read with it (the head first).
    Head(codec::Head, bytes::Bytes),
    /// Empty lines only, between requests: still at rest.
    Blank,
    /// Not this server's to serve: hyper takes the connection from here.
    Hyper,
}

/// Read until `buf` starts with a complete head: `Hyper` when it is hyper's to serve
/// (or incomplete at the end of input, which hyper answers as it does), `Err` when the
/// connection failed or ended between requests. Between requests (`resting`), empty
/// lines (RFC 9112 2.2) are dropped and read as `Blank`.
async fn read_head<S>(
    io: &mut Guarded<S>,
    buf: &mut Vec<u8>,
    settings: &Settings,
    resting: bool,
) -> io::Result<Read>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        if !buf.is_empty() {
            // Shared for the parse: a head's parts are slices of what was read, not a
            // copy; bytes the parse keeps no part of come back to `buf` as they were.
            let read = bytes::Bytes::from(std::mem::take(buf));
            let partial = match codec::parse_shared(&read, settings.max_headers) {
                Parsed::Simple(head) => return Ok(Read::Head(head, read)),
                Parsed::Hyper => false,
                Parsed::Partial => true,
            };
            *buf = Vec::from(read);
            if !partial || buf.len() > settings.max_header_bytes {
                return Ok(Read::Hyper);
            }
            if resting && buf.iter().all(|b| matches!(b, b'\r' | b'\n')) {
                buf.clear();
                return Ok(Read::Blank);
            }
        }
        let mut reader = Reader { io: &mut *io, buf: std::mem::take(buf) };
        let read = std::future::poll_fn(|cx| reader.poll_fill(cx, usize::MAX)).await;
        *buf = reader.buf;
        match read? {
            0 if buf.is_empty() => return Err(io::ErrorKind::UnexpectedEof.into()),
            0 => return Ok(Read::Hyper),
            _ => {}
        }
    }
}

/// Rest between two requests from `now`: `true` once the client sends again, `false`
/// when it closes or stays silent until `until`.
///
/// `park_timer` is the connection's, moved later at every rest rather than made anew: a
/// timer set sooner than the one the runtime is due to wake for makes tokio's time
/// driver wake its own thread (an eventfd write and an extra `epoll_wait`), which a new
/// 0.5 s timer after each answer did on every request of a sequential client; moving a
/// pending timer later only stores its new deadline. (A request longer than the rest
/// before it lets the timer fire while it is served: one needless wake of this task.)
async fn rest<S>(
    io: &mut Guarded<S>,
    now: Instant,
    until: Instant,
    parked: &prometheus_client::metrics::gauge::Gauge,
    mut park_timer: std::pin::Pin<&mut tokio::time::Sleep>,
) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    park_timer.as_mut().reset(until.min(now + PARK_AFTER));
    tokio::select! {
        biased;
        arrived = io.arrival() => return matches!(arrived, Ok(true)),
        () = park_timer => {}
    }
    let _parked = Parked::count(parked);
    let arrived = tokio::time::timeout_at(until, io.arrival()).await;
    matches!(arrived, Ok(Ok(true)))
}

/// One parked connection on the gauge, for as long as it lives (a serve dropped while
/// parked, at shutdown, does not leave it counted).
struct Parked<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> Parked<'a> {
    fn count(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Parked(gauge)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Write `resp`; `Ok(true)` when the connection may serve another request.
async fn respond<W: AsyncWrite + Unpin>(
    w: &mut W,
    resp: Response<Body>,
    head_request: bool,
    close: bool,
) -> io::Result<bool> {
    let (parts, body) = resp.into_parts();
    let mut out = Vec::with_capacity(512);
    let exact = body.size_hint().exact();
    let written = date::with(|date| codec::encode_head(&parts, exact, head_request, close, date, &mut out));
    drop(parts);
    if written.framing == Framing::Empty {
        drop(body);
        w.write_all(&out).await?;
        w.flush().await?;
        return Ok(!written.close);
    }
    send_body(w, body, out, written.framing).await?;
    Ok(!written.close)
}

/// Stream `body` after the head gathered in `out`, framed as the head said.
async fn send_body<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut body: Body,
    mut out: Vec<u8>,
    framing: Framing,
) -> io::Result<()> {
    let mut left = match framing {
        Framing::Length(n) => Some(n),
        _ => None,
    };
    loop {
        // A frame ready now joins what waits to be written; before waiting for one, what
        // waits goes out (a server-sent event must not sit in a buffer).
        let frame = match std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut body).poll_frame(cx)))
            .await
        {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !out.is_empty() {
                    w.write_all(&out).await?;
                    out.clear();
                }
                w.flush().await?;
                body.frame().await
            }
        };
        let data = match frame {
            None => break,
            // The client must see the body cut off, never a shorter body as complete.
            Some(Err(e)) => return Err(io::Error::other(e)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers: only hyper sends them (`TE: trailers` goes there)
            },
        };
        if data.is_empty() {
            continue;
        }
        let tail = framed(&mut out, data.len(), &mut left)?;
        if data.len() < GATHER / 4 {
            out.extend_from_slice(&data);
            out.extend_from_slice(tail);
            if out.len() >= GATHER {
                w.write_all(&out).await?;
                out.clear();
            }
        } else {
            // Large pieces are not copied: rustls takes the slices as they are.
            write_all_vectored(
                w,
                &mut [io::IoSlice::new(&out), io::IoSlice::new(&data), io::IoSlice::new(tail)],
            )
            .await?;
            out.clear();
        }
    }
    match left {
        Some(0) | None => {}
        Some(_) => return Err(io::Error::other("the response body ended before its length")),
    }
    if left.is_none() {
        out.extend_from_slice(codec::LAST_CHUNK);
    }
    w.write_all(&out).await?;
    w.flush().await
}

/// Frame one piece of `len` body bytes: a chunk's size line goes into `out`, and the
/// bytes that must follow the piece are returned; a length is counted down.
fn framed(out: &mut Vec<u8>, len: usize, left: &mut Option<u64>) -> io::Result<&'static [u8]> {
    match left {
        None => {
            codec::chunk_head(len, out);
            Ok(b"\r\n")
        }
        Some(n) if len as u64 > *n => Err(io::Error::other("the response body is longer than its length")),
        Some(n) => {
            *n -= len as u64;
            Ok(b"")
        }
    }
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut bufs: &mut [io::IoSlice<'_>],
) -> io::Result<()> {
    io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// The `Date` header's value, formatted once a second per thread, as hyper caches it.
pub(super) mod date {
    use std::cell::RefCell;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    pub fn with<T>(f: impl FnOnce(&[u8]) -> T) -> T {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != now || c.1.is_empty() {
                *c = (now, httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(now)));
            }
            f(c.1.as_bytes())
        })
    }
}
