//! `GET /api/events`: Server-Sent Events for the live view — `request` (one per log
//! record, as it is finished) and `approvals` (the pending list, whenever it changes).
//!
//! A watcher costs the proxy nothing it could be made to wait on: records go into a
//! broadcast ring that never blocks its sender, and each watcher has a short queue of
//! its own. A watcher that falls behind either (it stopped reading) is disconnected.
//! Records that finish close together arrive as one batch (`live::BATCH`), written once
//! for every watcher: under load a watcher costs a few wake-ups and writes a second,
//! not one per request.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Response, header};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::{Notify, broadcast, mpsc};

use super::Reply;
use crate::approvals::Approvals;
use crate::proxy::Proxy;

/// Chunks (a batch of records each, `live::BATCH`) queued for one watcher before it
/// counts as stalled: ~0.3 s of events, a few MiB at most at full load, shared with
/// every other watcher's queue.
const QUEUE: usize = 16;
/// A comment line this often, so a watcher that went away is noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);

struct Sse(mpsc::Receiver<Bytes>);

impl http_body::Body for Sse {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

pub fn stream(proxy: &Arc<Proxy>, cut: Arc<Notify>) -> Reply {
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
    let records = proxy.telemetry.live.subscribe();
    let approvals = proxy.approvals.clone();
    tokio::spawn(feed(tx, records, approvals, cut));
    let mut r = Response::new(Sse(rx).boxed());
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

async fn feed(
    tx: mpsc::Sender<Bytes>,
    mut records: broadcast::Receiver<Bytes>,
    approvals: Arc<Approvals>,
    cut: Arc<Notify>,
) {
    let mut changed = approvals.changed.subscribe();
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    let mut next = Some(pending(&approvals).await);
    loop {
        if let Some(event) = next.take()
            && tx.try_send(event).is_err()
        {
            // Stalled (or gone): cut the connection rather than queue more.
            cut.notify_one();
            return;
        }
        next = tokio::select! {
            r = records.recv() => match r {
                Ok(batch) => Some(batch),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    cut.notify_one();
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            c = changed.changed() => match c {
                Ok(()) => Some(pending(&approvals).await),
                Err(_) => return,
            },
            _ = keepalive.tick() => Some(Bytes::from_static(b": keep-alive\n\n")),
            _ = tx.closed() => return,
        };
    }
}

fn event(kind: &str, data: &str) -> Bytes {
    let mut out = BytesMut::new();
    push_event(&mut out, kind, data);
    out.freeze()
}

fn push_event(out: &mut BytesMut, kind: &str, data: &str) {
    for part in ["event: ", kind, "\ndata: ", data, "\n\n"] {
        out.extend_from_slice(part.as_bytes());
    }
}

async fn pending(approvals: &Approvals) -> Bytes {
    // Shared state out of reach: an empty list (the API says why, with a 503).
    let list = approvals.pending().await.unwrap_or_default();
    event("approvals", &serde_json::to_string(&list).unwrap_or_default())
}
