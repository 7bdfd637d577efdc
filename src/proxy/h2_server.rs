//! The HTTP/2 server of intercepted tunnels that negotiated `h2`, on the `h2` crate
//! directly.
//!
//! hyper's HTTP/2 server spawned a task per stream, and every answer went from that task
//! to the connection's by a wake-up. Here a connection's streams are futures of the
//! connection's own task (a `FuturesUnordered`): a stream's answer is queued and written
//! in the same turn. The streams of one connection never ran in parallel anyway: a
//! connection lives on one shard (`shards`), a single-threaded runtime.
//!
//! What hyper's server did that is done here too: its settings ([`Settings`]), a
//! keep-alive PING that closes a connection whose client stopped answering
//! ([`KeepAlive`]), a `Date` on answers without one, no connection-specific header in
//! an answer, a `Content-Length` from a body of known length, an answer's body sent as
//! the client's window allows, a stream the client resets dropped at once (its
//! request's future with it), and the extended CONNECT of RFC 8441 (WebSockets over
//! HTTP/2): the stream becomes a byte stream ([`Upgraded`]) once the answer is a 2xx.
//! The `h2` crate itself checks what the client sends (framing, `Content-Length`
//! against the DATA, header list size, the stream limit, resets) and answers PINGs and
//! SETTINGS, whose floods `h2guard` stops.
//!
//! What hyper's server did not: a deadline for the client's preface
//! (`header_read_timeout`), and a connection with no stream open told to go away after
//! `idle_timeout` ([`Idle`]), as an HTTP/1.1 connection between requests is closed.
//! Without them a silent or idle tunnel held its connection slot for ever.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, Stream};
use futures_util::task::AtomicWaker;
use h2::server::SendResponse;
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use http::{HeaderValue, Method, Request, Response, header};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use super::Body;
use super::h2_streams::{Received, pipe};
use super::linger::ClientBody;

// hyper's server defaults, kept: 1 MiB windows, 16 KiB frames, 400 KiB of answer
// buffered per stream before the stream waits.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONN_WINDOW: u32 = 1024 * 1024;
const MAX_FRAME: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
/// Streams a client may have open at once (hyper's default is 200).
const MAX_STREAMS: u32 = 256;
/// Streams the client made fail (and latchkey reset) before the connection is closed:
/// hyper's bound against floods of bad streams.
const MAX_LOCAL_RESETS: usize = 1024;
/// How often an idle-or-not connection is PINGed, and how long the PONG may take.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Serve the HTTP/2 connection on `io`: each stream's request to `service`, its answer
/// back, until the connection ends.
///
/// Not an `async fn`: its arguments would stay in the future for the connection's life,
/// the stream (~1.3 KiB) beside the copy h2's codec holds. The handshake is boxed, and
/// freed once done, for the same reason: its state holds the stream too.
pub fn serve<I, S, F>(
    io: I,
    limits: &crate::config::Limits,
    service: S,
) -> impl Future<Output = ()> + use<I, S, F>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: Fn(Request<ClientBody>) -> F,
    F: Future<Output = Response<Body>>,
{
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(MAX_STREAMS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_RESETS))
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_connect_protocol();
    // The client's preface gets the time a request head gets: h2 would wait for it
    // for ever, a silent tunnel holding its connection slot.
    let handshake = builder.handshake::<_, Bytes>(io);
    let handshake = Box::pin(tokio::time::timeout(limits.header_read_timeout, handshake));
    let idle_timeout = limits.idle_timeout;
    async move {
        let mut conn = match handshake.await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return tracing::debug!("h2 tunnel handshake: {e}"),
            Err(_) => return tracing::debug!("h2 tunnel: no client preface in time"),
        };
        let mut keep_alive = conn.ping_pong().map(KeepAlive::new);
        let mut idle = Idle::new(idle_timeout);
        let mut streams = FuturesUnordered::new();
        let wake = Arc::new(ConnWake::default());
        let conn_waker = Waker::from(wake.clone());
        // The connection is polled only when it asked to be (`ConnWake`): a stream's waker
        // firing after the stream is done must not cost a poll of the connection.
        wake.asked.store(true, Ordering::Release);
        let ended = poll_fn(|cx| {
            wake.task.register(cx.waker());
            wake.polling.store(true, Ordering::Release);
            let ended = loop {
                // Streams first: what they queue is written by the connection's poll below.
                while let Poll::Ready(Some(())) = Pin::new(&mut streams).poll_next(cx) {}
                if !wake.asked.swap(false, Ordering::AcqRel) {
                    break Poll::Pending;
                }
                match conn.poll_accept(&mut Context::from_waker(&conn_waker)) {
                    Poll::Ready(Some(Ok((req, respond)))) => {
                        if let Some(stream) = stream(req, respond, &service, idle_timeout) {
                            streams.push(stream);
                        }
                        // More may be read already: polled again after the new stream.
                        wake.asked.store(true, Ordering::Release);
                    }
                    Poll::Ready(Some(Err(e))) => break Poll::Ready(Some(e)),
                    Poll::Ready(None) => break Poll::Ready(None),
                    // Asked again while it ran (it yields so, to let other tasks run, and
                    // when tokio's budget is spent): the task is woken below, never looped.
                    Poll::Pending => break Poll::Pending,
                }
            };
            wake.polling.store(false, Ordering::Release);
            if ended.is_ready() {
                return ended;
            }
            // A stream of this task wakes it when it ends. One only the h2 crate counts (an
            // upgraded WebSocket's, one whose request body is dropped elsewhere) does not:
            // for those the timer looks again every `idle_timeout`.
            let expired =
                if streams.is_empty() { idle.poll_expired(conn.has_streams(), cx) } else { idle.busy() };
            if expired.is_ready() {
                tracing::debug!("h2 tunnel: no stream for {}s, going away", idle_timeout.as_secs());
                // GOAWAY: what the client sent meanwhile is still served, then it ends.
                conn.graceful_shutdown();
                // Queued, not written: the connection's next poll sends it.
                wake.asked.store(true, Ordering::Release);
            }
            if wake.asked.load(Ordering::Acquire) {
                cx.waker().wake_by_ref();
            }
            if keep_alive.as_mut().is_some_and(|k| k.poll_dead(cx).is_ready()) {
                tracing::debug!("h2 tunnel: no PONG within {}s, closing", KEEP_ALIVE_TIMEOUT.as_secs());
                conn.abrupt_shutdown(Reason::NO_ERROR);
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        if let Some(e) = ended {
            tracing::debug!("h2 tunnel: {e}");
        }
        // After an abrupt shutdown the GOAWAY still has to be written.
        let _ = poll_fn(|cx| conn.poll_closed(cx)).await;
    }
}

/// One stream: its request to `service`, unless the client resets it first; the answer
/// back. `None`: refused at once (reset).
///
/// Not an `async fn`: a stream's future is allocated for every request, and an `async
/// fn`'s would keep the request as passed, its parts, and the service's future made
/// from them. Here the request is handed to `service` first; the future holds the
/// service's future, then the answer's body being piped.
fn stream<S, F>(
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    service: &S,
    stall: Duration,
) -> Option<impl Future<Output = ()> + use<S, F>>
where
    S: Fn(Request<ClientBody>) -> F,
    F: Future<Output = Response<Body>>,
{
    let (mut parts, recv) = req.into_parts();
    let mut upgrade = None;
    let body = if parts.method == Method::CONNECT {
        if super::h2_streams::content_length(&parts.headers).is_some_and(|n| n != 0) {
            // A CONNECT's stream carries the tunnel's bytes, never a body.
            let mut respond = respond;
            respond.send_reset(Reason::PROTOCOL_ERROR);
            return None;
        }
        let (tx, rx) = oneshot::channel();
        parts.extensions.insert(Pending(Arc::new(Mutex::new(Some(rx)))));
        upgrade = Some((tx, recv));
        ClientBody::empty()
    } else {
        let body = Received::new(recv, &parts.headers, None);
        ClientBody::H2(body)
    };
    let answering = Answering { answered: service(Request::from_parts(parts, body)), respond: Some(respond) };
    Some(answering.then(move |answered| {
        let piping = answered.and_then(|(resp, respond)| send_head(resp, respond, upgrade));
        async move {
            let Some((mut send, mut body)) = piping else { return };
            // A client that opens no window for `idle_timeout` is not reading: its stream
            // is reset, and the upstream body it held let go.
            if let Err(error) = pipe(&mut send, &mut body, &mut (), Some(stall)).await {
                // A body that failed upstream fails here too, never ends as if complete.
                send.send_reset(error.as_deref().map_or(Reason::INTERNAL_ERROR, reason));
            }
        }
    }))
}

pin_project_lite::pin_project! {
    /// The service's answer to a stream, with the stream to send it on; `None` once the
    /// client resets the stream first (the request's future is dropped with it).
    struct Answering<F> {
        #[pin]
        answered: F,
        respond: Option<SendResponse<Bytes>>,
    }
}

impl<F: Future<Output = Response<Body>>> Future for Answering<F> {
    type Output = Option<(Response<Body>, SendResponse<Bytes>)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // An answer ready goes, even when a reset came with it.
        if let Poll::Ready(resp) = this.answered.poll(cx) {
            return Poll::Ready(this.respond.take().map(|respond| (resp, respond)));
        }
        let Some(respond) = this.respond.as_mut() else { return Poll::Ready(None) };
        let reason = ready!(respond.poll_reset(cx));
        tracing::debug!("client reset its stream: {reason:?}");
        Poll::Ready(None)
    }
}

/// The answer's head on the stream; its body and the stream to pipe it on, unless the
/// head ended the stream (no body) or made it a tunnel (RFC 8441).
fn send_head(
    resp: Response<Body>,
    mut respond: SendResponse<Bytes>,
    upgrade: Option<(oneshot::Sender<Upgraded>, RecvStream)>,
) -> Option<(SendStream<Bytes>, Body)> {
    let (mut head, body) = resp.into_parts();
    super::exchange::strip_hop_by_hop(&mut head.headers);
    if !head.headers.contains_key(header::DATE) {
        let date = super::h1::date::with(HeaderValue::from_bytes);
        if let Ok(date) = date {
            head.headers.insert(header::DATE, date);
        }
    }
    if let Some((tx, recv)) = upgrade
        && head.status.is_success()
    {
        // RFC 8441: the stream is the tunnel now; no body, no length.
        head.headers.remove(header::CONTENT_LENGTH);
        if let Ok(send) = respond.send_response(Response::from_parts(head, ()), false) {
            let _ = tx.send(Upgraded { send, recv, read: Bytes::new() });
        }
        return None;
    }
    let eos = body.is_end_stream();
    if !eos && let Some(length) = body.size_hint().exact() {
        head.headers.entry(header::CONTENT_LENGTH).or_insert_with(|| length.into());
    }
    match respond.send_response(Response::from_parts(head, ()), eos) {
        Ok(send) => (!eos).then_some((send, body)),
        Err(e) => {
            tracing::debug!("h2 tunnel: answer not sent: {e}");
            respond.send_reset(Reason::INTERNAL_ERROR);
            None
        }
    }
}

/// The reason to reset a client's stream with, for an answer whose body failed: the
/// upstream's own, when it reset its stream; otherwise an internal error.
fn reason(error: &(dyn std::error::Error + Send + Sync + 'static)) -> Reason {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(reason) = e.downcast_ref::<h2::Error>().and_then(h2::Error::reason)
            && reason != Reason::NO_ERROR
        {
            return reason;
        }
        source = e.source();
    }
    Reason::INTERNAL_ERROR
}

/// The waker `h2` gets for the connection. `h2` asks for the connection to be polled
/// whenever a stream queues a frame; the streams here run in the connection's task,
/// just before the connection is polled anyway, so a wake-up then would only poll it a
/// second time for nothing (two extra polls per request, ~3k instructions). While the
/// task polls, a request is only noted; any other time (the socket is ready, a stream
/// of another task queued a frame) it wakes the task.
#[derive(Default)]
struct ConnWake {
    task: AtomicWaker,
    polling: AtomicBool,
    asked: AtomicBool,
}

impl Wake for ConnWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.asked.store(true, Ordering::Release);
        if !self.polling.load(Ordering::Acquire) {
            self.task.wake();
        }
    }
}

/// PINGs the client every [`KEEP_ALIVE_INTERVAL`]; dead when a PONG does not come
/// within [`KEEP_ALIVE_TIMEOUT`]. A client gone without a FIN (a laptop closed, a NAT
/// that forgot the flow) would otherwise hold its connection for ever.
struct KeepAlive {
    ping_pong: PingPong,
    sleep: Pin<Box<Sleep>>,
    waiting: bool,
}

impl KeepAlive {
    fn new(ping_pong: PingPong) -> KeepAlive {
        let sleep = Box::pin(tokio::time::sleep(KEEP_ALIVE_INTERVAL));
        KeepAlive { ping_pong, sleep, waiting: false }
    }

    fn poll_dead(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.waiting {
                match self.ping_pong.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.waiting = false;
                        self.sleep.as_mut().reset(Instant::now() + KEEP_ALIVE_INTERVAL);
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => {}
                }
            }
            ready!(self.sleep.as_mut().poll(cx));
            if self.waiting || self.ping_pong.send_ping(Ping::opaque()).is_err() {
                return Poll::Ready(());
            }
            self.waiting = true;
            self.sleep.as_mut().reset(Instant::now() + KEEP_ALIVE_TIMEOUT);
        }
    }
}

/// `[proxy.limits] idle_timeout` for a connection with no stream open, as an HTTP/1.1
/// connection gets between requests; the connection is then told to go away. Ready
/// once, when that time has passed. A connection going idle only notes when: the
/// timer is reset at most once per timeout, not per request.
struct Idle {
    after: Duration,
    since: Option<Instant>,
    sleep: Pin<Box<Sleep>>,
    expired: bool,
}

impl Idle {
    fn new(after: Duration) -> Idle {
        let now = Instant::now();
        Idle {
            after,
            since: Some(now),
            sleep: Box::pin(tokio::time::sleep_until(now + after)),
            expired: false,
        }
    }

    /// A stream of the connection's own task is open.
    fn busy(&mut self) -> Poll<()> {
        self.since = None;
        Poll::Pending
    }

    /// No stream of the task is open; `open` when the h2 crate still counts one.
    fn poll_expired(&mut self, open: bool, cx: &mut Context<'_>) -> Poll<()> {
        if self.expired {
            return Poll::Pending;
        }
        if open {
            self.since = None;
        }
        let until = (!open).then(|| *self.since.get_or_insert_with(Instant::now) + self.after);
        while self.sleep.as_mut().poll(cx).is_ready() {
            match until {
                Some(until) if self.sleep.deadline() >= until => {
                    self.expired = true;
                    return Poll::Ready(());
                }
                // Idle since later than the timer was set for.
                Some(until) => self.sleep.as_mut().reset(until),
                None => self.sleep.as_mut().reset(Instant::now() + self.after),
            }
        }
        Poll::Pending
    }
}

/// A request extension on an HTTP/2 CONNECT: the stream as a byte stream, once the
/// answer was a 2xx (`upgrade::ClientSide`).
#[derive(Clone)]
pub struct Pending(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl Pending {
    pub fn take(&self) -> Option<oneshot::Receiver<Upgraded>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// An extended CONNECT's stream, read and written as bytes: DATA frames both ways, the
/// client's window returned as its bytes are read, a write waiting for the client's.
pub struct Upgraded {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// What is left of the last DATA frame read.
    read: Bytes,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.read.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.read = data;
                }
                Some(Err(e))
                    if e.reason() == Some(Reason::NO_ERROR) || e.reason() == Some(Reason::CANCEL) =>
                {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read[..n]);
        this.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        // As hyper (#4003): a claim of one byte, so a write waiting here does not pin the
        // connection's window; the write's bytes are queued whole once there is room.
        send.reserve_capacity(1);
        while send.capacity() == 0 {
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
        match send.send_data(Bytes::copy_from_slice(buf), false) {
            Ok(()) => Poll::Ready(Ok(buf.len())),
            Err(e) => Poll::Ready(Err(io::Error::other(e))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

impl std::fmt::Debug for Upgraded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("h2_server::Upgraded")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Serve `io` with nothing but the keep-alive; how long until it found the client
    /// dead, `None` if the connection ended first.
    async fn dead_after(io: tokio::io::DuplexStream) -> Option<Duration> {
        let start = Instant::now();
        let mut conn = h2::server::handshake(io).await.unwrap();
        let mut keep_alive = KeepAlive::new(conn.ping_pong().unwrap());
        poll_fn(|cx| {
            loop {
                match conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok(_))) => continue,
                    Poll::Ready(_) => return Poll::Ready(None),
                    Poll::Pending => return keep_alive.poll_dead(cx).map(|()| Some(start.elapsed())),
                }
            }
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_answering_pings_is_found_dead_one_that_answers_is_not() {
        // Silent: the preface and its SETTINGS, then nothing read or written (a laptop
        // closed, a NAT that forgot the flow: no FIN ever comes).
        let (server, mut silent) = tokio::io::duplex(64 * 1024);
        silent.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
        let watched = tokio::time::timeout(KEEP_ALIVE_INTERVAL * 10, dead_after(server)).await;
        let dead = watched.expect("a client answering no PING was never found dead").expect("ended");
        assert_eq!(dead, KEEP_ALIVE_INTERVAL + KEEP_ALIVE_TIMEOUT);
        // Answering: the h2 crate's client sends each PONG; ten intervals pass.
        let (server, answering) = tokio::io::duplex(64 * 1024);
        let (_send, client) = h2::client::handshake(answering).await.unwrap();
        let client = tokio::spawn(client);
        let watched = tokio::time::timeout(KEEP_ALIVE_INTERVAL * 10, dead_after(server)).await;
        assert!(watched.is_err(), "a client answering every PING was found dead: {watched:?}");
        client.abort();
    }
}
