//! Parking idle HTTP/1.1 keep-alive connections (issue 20: 1,000 idle intercepted
//! connections under 30 MiB, 10,000 under 300 MiB).
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer for an HTTP/1.1
//! connection's whole life, and an agent's keep-alive connections mostly sit idle. A
//! connection that has rested for [`PARK_AFTER`] is taken back from hyper
//! (`into_parts`), which frees them: the bare client stream waits for the next byte
//! ([`framing::Guarded::arrival`]) and is then served by a new hyper connection.
//!
//! "At rest" is what makes `into_parts` safe (hyper: only once nothing is left to
//! flush): no request in flight (its response sent to the end), every byte hyper wrote
//! flushed, and the reader waiting at a head boundary with nothing buffered — so hyper
//! holds no state worth keeping. [`framing::Guarded`] keeps the flags as hyper drives
//! it; the serving task reads them while it does not poll hyper, so they cannot move
//! under it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};

/// How long a connection rests before it is parked: long enough that a client sending
/// request after request never pays for it, short next to any real idle spell.
pub const PARK_AFTER: Duration = Duration::from_millis(500);

/// What the serving task needs to know about a connection hyper is driving.
#[derive(Default, Debug)]
pub struct Rest {
    /// Requests whose response has not been sent to its end.
    in_flight: AtomicUsize,
    /// hyper wrote bytes it has not flushed yet.
    unflushed: AtomicBool,
    /// The reader waits at a head boundary, nothing buffered.
    waiting: AtomicBool,
    /// Bumped by every read that returned bytes and every write.
    activity: AtomicU64,
}

impl Rest {
    pub fn wrote(&self) {
        self.unflushed.store(true, Relaxed);
        self.activity.fetch_add(1, Relaxed);
    }

    pub fn flushed(&self) {
        self.unflushed.store(false, Relaxed);
    }

    pub fn read(&self) {
        self.waiting.store(false, Relaxed);
        self.activity.fetch_add(1, Relaxed);
    }

    pub fn waiting(&self) {
        self.waiting.store(true, Relaxed);
    }

    pub fn activity(&self) -> u64 {
        self.activity.load(Relaxed)
    }

    pub fn at_rest(&self) -> bool {
        self.in_flight.load(Relaxed) == 0 && !self.unflushed.load(Relaxed) && self.waiting.load(Relaxed)
    }

    /// One request in flight until the returned guard is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Relaxed);
        Busy(self.clone())
    }
}

/// A request in flight (see [`Rest::busy`]).
pub struct Busy(Arc<Rest>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// A response body that keeps its request in flight until hyper has read it to its end
/// (or dropped it).
pub struct BusyBody<B> {
    inner: B,
    busy: Option<Busy>,
}

impl<B> BusyBody<B> {
    pub fn new(inner: B, busy: Busy) -> Self {
        BusyBody { inner, busy: Some(busy) }
    }
}

impl<B: Body + Unpin> Body for BusyBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.busy = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn a_request_is_in_flight_until_its_body_ends() {
        let rest = Arc::new(Rest::default());
        rest.waiting();
        assert!(rest.at_rest());
        let mut body = BusyBody::new(Full::new(bytes::Bytes::from_static(b"hi")), rest.busy());
        assert!(!rest.at_rest(), "a request without its response sent is not at rest");
        assert!(body.frame().await.is_some());
        assert!(body.frame().await.is_none());
        assert!(rest.at_rest(), "the body's end ends the request");
        rest.wrote();
        assert!(!rest.at_rest(), "unflushed bytes");
        rest.flushed();
        rest.read();
        assert!(!rest.at_rest(), "the reader is not waiting at a boundary");
    }
}
