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
//! it) is handed back whole, to be sent again on another connection, when its body was
//! not streamed ([`Failed::Refused`]).
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

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, Request, Response, header};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::oneshot;

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
    /// a graceful GOAWAY below it): the request, whole again (its body was not
    /// streamed), to send on another connection.
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
    pub async fn send(self, req: Request<Body>, limit: Duration) -> Result<Response<Body>, Failed> {
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
        let upload = Upload::of(body).await.map_err(Failed::Error)?;
        let mut tx = match tx.ready().await {
            Ok(tx) => tx,
            Err(e) => {
                tracing::debug!("upstream h2 connection takes no new stream: {e}");
                closed.store(true, Ordering::Relaxed);
                return Err(Failed::Unsent(Box::new(head.map(|()| upload.into_body()))));
            }
        };
        // What a refused stream is sent again with: a copy of the head (~600 instructions)
        // and the body, if it is not streamed. nginx refuses streams so every
        // `keepalive_requests` (docs/protocols.md).
        let again = (!matches!(upload, Upload::Streamed(_))).then(|| copy_head(&head));
        let eos = matches!(upload, Upload::None(_));
        let (response, mut send) = tx.send_request(head, eos).map_err(|e| Failed::Error(e.into()))?;
        // A streamed upload's task hears of the answer's end, and tells of its failure.
        let (mut over, mut failed) = (None, None);
        let upload = match upload {
            Upload::Streamed(body) => {
                let (over_tx, answered) = oneshot::channel();
                let (failed_tx, failed_rx) = oneshot::channel();
                (over, failed) = (Some(over_tx), Some(failed_rx));
                tokio::spawn(self::upload(send, body, answered, limit, failed_tx));
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
            Err(e) => {
                if e.is_go_away() {
                    // Going away: no new stream goes on it.
                    closed.store(true, Ordering::Relaxed);
                }
                if unprocessed(&e)
                    && let (Some(again), Some(upload)) = (again, upload)
                {
                    return Err(Failed::Refused(Box::new(again.map(|()| upload.into_body()))));
                }
                // The upload's own failure (the client's body, a blocked pattern) says
                // more than the reset it caused.
                let upload = failed.as_mut().and_then(|f| f.try_recv().ok());
                return Err(Failed::Error(upload.unwrap_or_else(|| e.into())));
            }
        };
        let (parts, recv) = resp.into_parts();
        let remaining = content_length(&parts.headers);
        let body = Answer { recv, data_done: false, remaining, over };
        Ok(Response::from_parts(parts, body.boxed()))
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
        let whole = body.collect().await?;
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

/// The request body up the stream, then its end; reset once the answer has been over
/// for `limit` without the upload ending. A failure is told to the request's task.
async fn upload(
    mut send: SendStream<Bytes>,
    body: Body,
    answered: oneshot::Receiver<()>,
    limit: Duration,
    failed: oneshot::Sender<BoxError>,
) {
    let late = async {
        // Sent or dropped, either way the answer is over.
        let _ = answered.await;
        tokio::time::sleep(limit).await;
    };
    let outcome = tokio::select! {
        outcome = pipe(&mut send, body) => outcome,
        () = late => {
            tracing::debug!("upload not over within {}s of its answer's end: reset", limit.as_secs());
            Err(None)
        }
    };
    if let Err(error) = outcome {
        send.send_reset(Reason::CANCEL);
        if let Some(error) = error {
            let _ = failed.send(error);
        }
    }
}

/// Each frame of `body` up `send`, waiting for room in the stream's window before each
/// data frame (so a slow upstream slows the client, not latchkey's memory). An error
/// is for the stream to be reset, with the body's own error if it failed.
async fn pipe(send: &mut SendStream<Bytes>, mut body: Body) -> Result<(), Option<BoxError>> {
    loop {
        let frame = tokio::select! {
            biased;
            reason = poll_fn(|cx| send.poll_reset(cx)) => {
                tracing::debug!("upstream reset the upload: {reason:?}");
                return Ok(());
            }
            frame = body.frame() => frame,
        };
        let frame = match frame {
            None => return send.send_data(Bytes::new(), true).map_err(|_| None),
            Some(Err(e)) => return Err(Some(e)),
            Some(Ok(frame)) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                let eos = body.is_end_stream();
                if !data.is_empty() {
                    // As hyper (#4003): a claim of one byte, not the chunk's length, so
                    // a stream waiting here does not pin the connection's window.
                    send.reserve_capacity(1);
                    wait_for_room(send).await?;
                }
                send.send_data(data, eos).map_err(|_| None)?;
                if eos {
                    return Ok(());
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            send.reserve_capacity(0);
            return send.send_trailers(trailers).map_err(|_| None);
        }
    }
}

/// Until the stream has room for at least a byte; an error when it was reset.
async fn wait_for_room(send: &mut SendStream<Bytes>) -> Result<(), Option<BoxError>> {
    while send.capacity() == 0 {
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err(None),
        }
    }
    Ok(())
}

/// A response body from the stream: its window returned as it is read, its end (or
/// its drop) told to the upload.
struct Answer {
    recv: RecvStream,
    data_done: bool,
    /// What `Content-Length` says is left.
    remaining: Option<u64>,
    over: Option<oneshot::Sender<()>>,
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(left) = &mut this.remaining {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.over = None;
        Poll::Ready(match trailers {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(e) => Some(Err(e.into())),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(left) => SizeHint::with_exact(left),
            None => SizeHint::default(),
        }
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

/// `Content-Length`, when it is there once and a number.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    value.to_str().ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_length_counts_only_when_it_is_one_number() {
        let length = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(header::CONTENT_LENGTH, v.parse().unwrap());
            }
            content_length(&headers)
        };
        assert_eq!(length(&["42"]), Some(42));
        assert_eq!(length(&[]), None);
        assert_eq!(length(&["4x"]), None);
        assert_eq!(length(&["42", "42"]), None);
    }
}
