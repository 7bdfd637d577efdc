//! The upstream HTTP/2 leg, on the `h2` crate directly.
//!
//! hyper's HTTP/2 client put every request through a channel to its connection task and
//! spawned a task per request to wait for the response (and one per request body). Here
//! the request's own task opens the stream and waits for the answer: no channel, no
//! task, ~7k instructions a request fewer (docs/performance.md, thirteenth session). A
//! small body of known length is read whole first and sent from the request's task; any
//! other goes up from a task of its own ([`pipe`]), since it may outlive the response's
//! head (an early answer, a gRPC stream).
//!
//! A stream the upstream refused unprocessed (`REFUSED_STREAM`, a graceful GOAWAY below
//! it) is handed back whole, to be sent again on another connection
//! ([`Failed::Refused`]): a small body from its copy, a streamed one from what its task
//! kept of what it sent (up to [`KEPT`] bytes) and what is left of it.
//!
//! It also bounds what hyper could not: an upstream that answers and then never opens
//! the stream's window again. hyper's body task waited for room for ever, the body
//! unpolled and so untimed by `answered::Bounded`. Here the upload gets `[proxy]
//! timeout` from its answer's end in all — waits for the client and for room alike —
//! and is then reset (`CANCEL`), which lets go of the client's body and the stream.
//!
//! What hyper's client did that is done here too: its connection settings
//! ([`handshake`]), a `Content-Length` from a body of known length, returning the
//! flow-control window as the response body is read. (Connection-specific headers,
//! which hyper removed too, are gone before the pool: `exchange::upstream_request`.)
//! The `h2` crate itself checks what it receives (framing, `Content-Length` against
//! the DATA, header list size) and resets what breaks it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, SendStream};
use http::{HeaderMap, Request, Response, header};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::oneshot;

use super::h2_streams::{Keep, Piped, Received, pipe};
use super::upstream::UpstreamIo;
use super::{Body, BoxError};

// hyper's client defaults, kept: large windows so a download is not held back by
// WINDOW_UPDATE round trips, no server push.
const CONN_WINDOW: u32 = 5 * 1024 * 1024;
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const MAX_FRAME: u32 = 16 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// One HTTP/2 connection upstream, shared by the requests to its destination.
#[derive(Clone)]
pub struct Conn {
    tx: SendRequest<Bytes>,
    /// The connection's task has ended (closed by either side, or failed).
    closed: Arc<AtomicBool>,
}

/// A request that could not be sent.
pub enum Failed {
    /// The connection takes no new stream (closed, or going away): the request is
    /// untouched, to send on another.
    Unsent(Box<Request<Body>>),
    /// The upstream refused the stream unprocessed (RFC 9113 §8.7: `REFUSED_STREAM`, or
    /// a graceful GOAWAY below it): the request, whole again, to send on another
    /// connection.
    Refused(Box<Request<Body>>),
    Error(BoxError),
}

/// An HTTP/2 connection on `io`, driven by a task of its own.
pub async fn handshake(io: UpstreamIo) -> Result<Conn, h2::Error> {
    let (tx, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    let done = closed.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("upstream h2 connection: {e}");
        }
        done.store(true, Ordering::Relaxed);
    });
    let tx = tx.ready().await?;
    Ok(Conn { tx, closed })
}

impl Conn {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Send `req` (absolute URI) and wait for its response's head. A small body of
    /// known length is read first and sent whole; any other goes up from a task of its
    /// own, and gets `limit` from the response's end to finish.
    /// Taken by value: the pool hands each request a clone of its own.
    ///
    /// The head is made before the future: the future holds it once, where awaiting in
    /// an `async fn` would keep the request as passed and the head made from it.
    pub fn send(
        self,
        req: Request<Body>,
        limit: Duration,
    ) -> impl Future<Output = Result<Response<Body>, Failed>> + Send {
        let Conn { tx, closed } = self;
        let (parts, body) = req.into_parts();
        // Connection-specific headers are gone already (`exchange::upstream_request`
        // strips every hop-by-hop one); were one left, `h2` would refuse the request.
        let mut head = Request::from_parts(parts, ());
        if let Some(length) = body.size_hint().exact()
            && (length != 0 || !matches!(*head.method(), http::Method::GET | http::Method::HEAD))
        {
            head.headers_mut().entry(header::CONTENT_LENGTH).or_insert_with(|| length.into());
        }
        async move {
            let upload = Upload::of(body).await.map_err(Failed::Error)?;
            let mut tx = match tx.ready().await {
                Ok(tx) => tx,
                Err(e) => {
                    tracing::debug!("upstream h2 connection takes no new stream: {e}");
                    closed.store(true, Ordering::Relaxed);
                    return Err(Failed::Unsent(Box::new(head.map(|()| upload.into_body()))));
                }
            };
            // What a refused stream is sent again with: a copy of the head (~600
            // instructions) and the body. nginx refuses streams so every
            // `keepalive_requests` (docs/protocols.md).
            let again = copy_head(&head);
            let eos = matches!(upload, Upload::None(_));
            let (response, mut send) = tx.send_request(head, eos).map_err(|e| Failed::Error(e.into()))?;
            // A streamed upload's task hears of the answer's head and end, and tells how it
            // stopped short.
            let (mut over, mut stopped, mut heard) = (None, None, None);
            let upload = match upload {
                Upload::Streamed(body) => {
                    let (over_tx, answered) = oneshot::channel();
                    let (stopped_tx, stopped_rx) = oneshot::channel();
                    let kept = Kept::new();
                    (over, stopped, heard) = (Some(over_tx), Some(stopped_rx), Some(kept.heard.clone()));
                    tokio::spawn(self::upload(send, body, kept, answered, limit, stopped_tx));
                    None
                }
                Upload::Whole(data) => {
                    // Queued whole: the stream's window only paces it, and a stream the
                    // upstream never reads is reset once its answer is dropped.
                    send.send_data(data.clone(), true).map_err(|e| Failed::Error(e.into()))?;
                    Some(Upload::Whole(data))
                }
                upload => Some(upload),
            };
            let resp = match response.await {
                Ok(resp) => resp,
                // Boxed: a failed stream is rare, and its wait for the upload's task
                // would size every request's future.
                Err(e) => return Err(Box::pin(failed(e, &closed, again, upload, stopped, limit)).await),
            };
            if let Some(heard) = heard {
                // Processed: what the upload kept to send again can go.
                heard.store(true, Ordering::Relaxed);
            }
            let (parts, recv) = resp.into_parts();
            let body = Received::new(recv, &parts.headers, over);
            Ok(Response::from_parts(parts, body.boxed()))
        }
    }
}

/// Why a stream failed: refused unprocessed (the request, whole again, goes back with
/// `again`'s head), or its error — the upload's own when it stopped the stream.
async fn failed(
    e: h2::Error,
    closed: &AtomicBool,
    again: Request<()>,
    upload: Option<Upload>,
    stopped: Option<oneshot::Receiver<Stopped>>,
    limit: Duration,
) -> Failed {
    if e.is_go_away() {
        // Going away: no new stream goes on it.
        closed.store(true, Ordering::Relaxed);
    }
    let stopped = match stopped {
        // The upload's task ends once its stream does.
        Some(rx) => tokio::time::timeout(limit, rx).await.ok().and_then(Result::ok),
        None => None,
    };
    match (unprocessed(&e), upload, stopped) {
        (true, Some(upload), _) => Failed::Refused(Box::new(again.map(|()| upload.into_body()))),
        (true, None, Some(Stopped::Refused(body))) => Failed::Refused(Box::new(again.map(|()| body))),
        // The upload's own failure (the client's body, a blocked pattern) says more
        // than the reset it caused.
        (_, _, Some(Stopped::Failed(error))) => Failed::Error(error),
        _ => Failed::Error(e.into()),
    }
}

/// A request body as it goes up: none, small and read whole before the stream opens
/// (sent in one go from the request's task, and kept — shared, not copied — to send
/// again), or streamed from a task of its own.
enum Upload {
    None(Body),
    Whole(Bytes),
    Streamed(Body),
}

/// A body of known length up to this is read whole first. A small upload (an API call's
/// JSON) arrives at once anyway; reading it first costs no task and makes it replayable.
const WHOLE: u64 = 64 * 1024;

impl Upload {
    async fn of(body: Body) -> Result<Upload, BoxError> {
        if body.is_end_stream() {
            return Ok(Upload::None(body));
        }
        if body.size_hint().exact().is_none_or(|n| n > WHOLE) {
            return Ok(Upload::Streamed(body));
        }
        // Boxed: only a small body of known length waits here; inline, its collection
        // would size every request's future.
        let whole = Box::pin(body.collect()).await?;
        match whole.trailers() {
            // Trailers on a small upload: rare; streamed as they come.
            Some(trailers) => {
                let trailers = std::future::ready(Some(Ok(trailers.clone())));
                let data = http_body_util::Full::new(whole.to_bytes()).map_err(|never| match never {});
                Ok(Upload::Streamed(data.with_trailers(trailers).boxed()))
            }
            None => Ok(Upload::Whole(whole.to_bytes())),
        }
    }

    fn into_body(self) -> Body {
        match self {
            Upload::None(body) | Upload::Streamed(body) => body,
            Upload::Whole(data) => http_body_util::Full::new(data).map_err(|never| match never {}).boxed(),
        }
    }
}

/// How a streamed upload stopped short, told to the request's task.
enum Stopped {
    /// The body failed (the client's, a blocked pattern).
    Failed(BoxError),
    /// The stream was reset before the upstream answered, with all that was sent still
    /// kept: the body again, whole, in case the upstream refused the stream unprocessed.
    Refused(Body),
}

/// The request body up the stream, then its end; reset once the answer has been over
/// for `limit` without the upload ending. How it stopped short is told to the
/// request's task.
async fn upload(
    mut send: SendStream<Bytes>,
    mut body: Body,
    mut kept: Kept,
    answered: oneshot::Receiver<()>,
    limit: Duration,
    stopped: oneshot::Sender<Stopped>,
) {
    let late = async {
        // Sent or dropped, either way the answer is over.
        let _ = answered.await;
        tokio::time::sleep(limit).await;
    };
    let outcome = tokio::select! {
        outcome = pipe(&mut send, &mut body, &mut kept, None) => outcome,
        () = late => {
            tracing::debug!("upload not over within {}s of its answer's end: reset", limit.as_secs());
            Err(None)
        }
    };
    let stop = match outcome {
        Ok(Piped::Whole) => return,
        Ok(Piped::Reset) => None,
        Err(error) => {
            send.send_reset(Reason::CANCEL);
            error
        }
    };
    let stop = match stop {
        Some(error) => Some(Stopped::Failed(error)),
        // Reset, or the stream would take no more (refused, gone with its connection):
        // the request's task sends it again if the upstream never acted on it.
        None => kept.again(body).map(Stopped::Refused),
    };
    if let Some(stop) = stop {
        let _ = stopped.send(stop);
    }
}

/// What a streamed upload has sent, kept until the upstream answers: were the stream
/// refused unprocessed (nginx's GOAWAY every `keepalive_requests`), the body is sent
/// again on another connection from it and what is left. The refusal comes within a
/// round trip, so little is kept; past [`KEPT`] bytes, or once answered, nothing is,
/// and a refusal then is a 502.
struct Kept {
    data: Vec<Bytes>,
    bytes: usize,
    trailers: Option<HeaderMap>,
    given_up: bool,
    /// Set by the request's task when the answer's head came.
    heard: Arc<AtomicBool>,
}

/// What a streamed upload keeps at most to send again.
const KEPT: usize = 256 * 1024;

impl Kept {
    fn new() -> Kept {
        Kept { data: Vec::new(), bytes: 0, trailers: None, given_up: false, heard: Arc::default() }
    }

    /// The whole body again: what was sent, then what is left of `rest`; `None` when
    /// not all that was sent was kept.
    fn again(self, rest: Body) -> Option<Body> {
        if self.given_up || self.heard.load(Ordering::Relaxed) {
            return None;
        }
        let replay = Replay { sent: self.data.into(), trailers: self.trailers, rest };
        Some(replay.boxed())
    }
}

impl Keep for Kept {
    fn data(&mut self, data: &Bytes) {
        if self.given_up {
            return;
        }
        if self.heard.load(Ordering::Relaxed) || self.bytes + data.len() > KEPT {
            self.given_up = true;
            self.data = Vec::new();
            return;
        }
        self.bytes += data.len();
        self.data.push(data.clone());
    }

    fn trailers(&mut self, trailers: &HeaderMap) {
        if !self.given_up {
            self.trailers = Some(trailers.clone());
        }
    }
}

/// A body sent again: the chunks sent the first time, then the rest of the body as it
/// comes (or the trailers the first time ended with).
struct Replay {
    sent: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    rest: Body,
}

impl http_body::Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(data) = self.sent.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(trailers) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.sent.is_empty() && self.trailers.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let sent: u64 = self.sent.iter().map(|d| d.len() as u64).sum();
        let rest = self.rest.size_hint();
        // Built anew, lower bound first: `SizeHint` asserts lower <= upper at each step.
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(sent));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(sent));
        }
        hint
    }
}

/// The stream was refused before the upstream acted on it: `REFUSED_STREAM`, or above
/// the last stream a graceful GOAWAY (`NO_ERROR`) says it will process. A GOAWAY with an
/// error may also end streams it processed, so those are not sent again.
fn unprocessed(e: &h2::Error) -> bool {
    e.reason() == Some(Reason::REFUSED_STREAM)
        || (e.is_go_away() && e.is_remote() && e.reason() == Some(Reason::NO_ERROR))
}

/// A request's head without its extensions (none matter upstream).
fn copy_head(head: &Request<()>) -> Request<()> {
    let mut copy = Request::new(());
    *copy.method_mut() = head.method().clone();
    *copy.uri_mut() = head.uri().clone();
    *copy.version_mut() = head.version();
    *copy.headers_mut() = head.headers().clone();
    copy
}
