//! Body wrappers: a streaming scanner for `blocked_patterns`, byte counters, and the
//! response body that writes the audit record when the exchange ends.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::BoxError;
use crate::config::Config;
use crate::telemetry::audit::Record;

type FramePoll = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

/// Poll `inner` for its next frame with the error boxed; `Err(poll)` when there is no
/// frame to look at (pending, end, or an error to pass on as it is).
fn next_frame<B>(inner: &mut B, cx: &mut Context<'_>) -> Result<Frame<Bytes>, FramePoll>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    match Pin::new(inner).poll_frame(cx) {
        Poll::Ready(Some(Ok(f))) => Ok(f),
        Poll::Ready(Some(Err(e))) => Err(Poll::Ready(Some(Err(e.into())))),
        Poll::Ready(None) => Err(Poll::Ready(None)),
        Poll::Pending => Err(Poll::Pending),
    }
}

#[derive(Debug)]
pub struct BlockedBody(pub String);

impl std::fmt::Display for BlockedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request body matches blocked pattern {:?}", self.0)
    }
}

impl std::error::Error for BlockedBody {}

/// Scans a request body for blocked patterns as it streams, carrying an overlap
/// between chunks so a pattern split across them is still found. Bytes past
/// `inspect_body_bytes` pass unscanned (documented limit).
pub struct ScanBody<B> {
    inner: B,
    config: Arc<Config>,
    carry: Vec<u8>,
    scanned: usize,
    pub hit: Arc<OnceLock<String>>,
}

impl<B> ScanBody<B> {
    pub fn new(inner: B, config: Arc<Config>) -> Self {
        ScanBody { inner, config, carry: Vec::new(), scanned: 0, hit: Arc::new(OnceLock::new()) }
    }

    fn scan(&mut self, data: &[u8]) -> Option<String> {
        let limit = self.config.proxy.limits.inspect_body_bytes;
        if self.scanned >= limit {
            return None;
        }
        let take = data.len().min(limit - self.scanned);
        self.scanned += take;
        let filter = &self.config.policy.filters.content;
        let mut window = std::mem::take(&mut self.carry);
        window.extend_from_slice(&data[..take]);
        let found = filter.find(&window).map(str::to_string);
        let keep = filter.overlap().min(window.len());
        self.carry = window.split_off(window.len() - keep);
        found
    }
}

impl<B> HttpBody for ScanBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll {
        let frame = match next_frame(&mut self.inner, cx) {
            Ok(f) => f,
            Err(poll) => return poll,
        };
        if let Some(data) = frame.data_ref()
            && let Some(pattern) = self.scan(data)
        {
            let _ = self.hit.set(pattern.clone());
            return Poll::Ready(Some(Err(Box::new(BlockedBody(pattern)))));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts the data bytes that pass.
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl<B> HttpBody for Counted<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll {
        let frame = match next_frame(&mut self.inner, cx) {
            Ok(f) => f,
            Err(poll) => return poll,
        };
        if let Some(d) = frame.data_ref() {
            self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An audit record waiting for its exchange to end.
pub struct Pending {
    /// Held until the response body ends: shutdown waits for it.
    pub _exchange: super::ExchangeGuard,
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    pub record: Record,
    pub up: Arc<AtomicU64>,
    pub down: Arc<AtomicU64>,
    pub started: Instant,
    /// Time to the upstream's response head.
    pub upstream: Option<std::time::Duration>,
    /// Reads LLM token usage from the (redacted) body as it passes.
    pub meter: Option<crate::telemetry::usage::Meter>,
    pub span: Option<crate::telemetry::otlp::Span>,
    /// Up to this many redacted body bytes go on the span.
    pub capture: Option<(usize, Vec<u8>)>,
    /// Where every credential's redactor is found when something read out of the
    /// response (a captured body, a model name) is about to leave latchkey.
    pub config: Arc<Config>,
}

impl Pending {
    fn saw(&mut self, data: &[u8]) {
        if let Some(m) = &mut self.meter {
            m.feed(data);
        }
        if let Some((cap, buf)) = &mut self.capture {
            let room = cap.saturating_sub(buf.len());
            buf.extend_from_slice(&data[..room.min(data.len())]);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.record.bytes_up = self.up.load(Ordering::Relaxed);
        self.record.bytes_down = self.down.load(Ordering::Relaxed);
        self.record.duration_ms = self.started.elapsed().as_millis() as u64;
        let usage = self.meter.take().and_then(crate::telemetry::usage::Meter::finish);
        let read_out = self.capture.is_some() || usage.as_ref().is_some_and(|u| u.model.is_some());
        // Masked again here: with `redact_responses = false` (or a form the body redactor
        // does not know) the client saw raw bytes, but no log, label or span carries them.
        let redactors = if read_out { crate::telemetry::all_redactors(&self.config) } else { Vec::new() };
        self.record.usage = usage.map(|u| u.redacted(&redactors));
        let mut span = self.span.take();
        if let (Some(s), Some((cap, mut body))) = (&mut span, self.capture.take()) {
            let cut_short = body.len() >= cap;
            for r in &redactors {
                r.mask(&mut body);
                // A form cut off by the capture limit: its start is not exported either.
                if cut_short {
                    let cut = r.holdback(&body);
                    body.truncate(body.len() - cut);
                }
            }
            s.str("latchkey.response.body", String::from_utf8_lossy(&body));
        }
        self.telemetry.finish(&self.record, self.upstream, span);
    }
}

/// A response body that logs its exchange when it ends (or is dropped).
pub struct Logged<B> {
    inner: Counted<B>,
    pending: Pending,
}

impl<B> Logged<B> {
    pub fn new(inner: B, pending: Pending) -> Self {
        Logged { inner: Counted::new(inner, pending.down.clone()), pending }
    }
}

impl<B> HttpBody for Logged<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &poll
            && let Some(data) = frame.data_ref()
        {
            this.pending.saw(data);
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Masks secrets in a response body as it streams (see `crate::redact`).
pub struct Redacted<B> {
    inner: B,
    stream: crate::redact::Stream,
    set: crate::redact::Set,
    trailers: Option<http::HeaderMap>,
    done: bool,
}

impl<B> Redacted<B> {
    /// `headers`: the response's, which tell a gRPC body (released message by message).
    pub fn new(inner: B, set: crate::redact::Set, headers: &http::HeaderMap) -> Self {
        let grpc = headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().to_ascii_lowercase().starts_with(b"application/grpc"));
        let stream = match grpc {
            true => crate::redact::Stream::grpc(set.clone()),
            false => crate::redact::Stream::new(set.clone()),
        };
        Redacted { inner, stream, set, trailers: None, done: false }
    }
}

/// Mask secrets in header values (same length, so nothing else changes) and drop every
/// header whose name holds one.
pub fn redact_headers(headers: &mut http::HeaderMap, set: &crate::redact::Set) {
    let named: Vec<http::HeaderName> =
        headers.keys().filter(|k| set.names_secret(k.as_str().as_bytes())).cloned().collect();
    for name in named {
        headers.remove(name);
    }
    for value in headers.values_mut() {
        let mut bytes = value.as_bytes().to_vec();
        if set.mask(&mut bytes) > 0
            && let Ok(v) = http::HeaderValue::from_bytes(&bytes)
        {
            *value = v;
        }
    }
}

/// Mask secrets in a response head: the HTTP/1.1 reason phrase, header names and values.
pub fn redact_head<B>(resp: &mut http::Response<B>, set: &crate::redact::Set) {
    if let Some(reason) = resp.extensions().get::<hyper::ext::ReasonPhrase>() {
        let mut bytes = reason.as_bytes().to_vec();
        if set.mask(&mut bytes) > 0 {
            // Without the upstream's phrase, hyper writes the canonical one.
            let masked = hyper::ext::ReasonPhrase::try_from(bytes);
            resp.extensions_mut().remove::<hyper::ext::ReasonPhrase>();
            if let Ok(r) = masked {
                resp.extensions_mut().insert(r);
            }
        }
    }
    redact_headers(resp.headers_mut(), set);
}

/// The first coding, in any instance of `Content-Encoding` or `Transfer-Encoding`, that
/// a body would have to be decoded through before it could be scanned: anything but
/// `identity` (and `chunked`, which hyper has already undone).
pub fn unscannable_coding(headers: &http::HeaderMap) -> Option<String> {
    let find = |name: http::HeaderName, allowed: &[&[u8]]| {
        headers
            .get_all(&name)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(|c| c.trim_ascii())
            .find(|c| !c.is_empty() && !allowed.iter().any(|a| c.eq_ignore_ascii_case(a)))
            .map(|c| format!("{name}: {}", String::from_utf8_lossy(c)))
    };
    find(http::header::CONTENT_ENCODING, &[b"identity"])
        .or_else(|| find(http::header::TRANSFER_ENCODING, &[b"identity", b"chunked"]))
}

impl<B> HttpBody for Redacted<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll {
        loop {
            if self.done {
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match next_frame(&mut self.inner, cx) {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => {
                        // A body that knows it is over (a length reached) is released in
                        // one frame rather than its held tail in a second one.
                        let out = match self.inner.is_end_stream() {
                            true => self.stream.push_last(&data),
                            false => self.stream.push(&data),
                        };
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => {
                        let mut trailers = frame.into_trailers().unwrap_or_default();
                        redact_headers(&mut trailers, &self.set);
                        self.trailers = Some(trailers);
                        self.done = true;
                        let rest = self.stream.finish();
                        if !rest.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(rest))));
                        }
                    }
                },
                Err(Poll::Ready(None)) => {
                    self.done = true;
                    let rest = self.stream.finish();
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                }
                Err(poll) => return poll,
            }
        }
    }

    /// Forwarded, so a response that ends with its head (a gRPC trailers-only reply)
    /// still ends with its head rather than with an empty DATA frame.
    fn is_end_stream(&self) -> bool {
        let pending = self.stream.held() > 0 || self.trailers.is_some();
        !pending && (self.done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        // Masking keeps lengths; what is held back is still to come.
        let inner = self.inner.size_hint();
        let held = self.stream.held() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn redactors() -> crate::redact::Set {
        let secret = crate::secrets::Secret::new("body-secret-0123456789".into());
        crate::redact::Set::new(vec![Arc::new(crate::redact::Redactor::new(&[secret]).unwrap())]).unwrap()
    }

    #[tokio::test]
    async fn wrappers_forward_the_end_and_the_size() {
        // hyper sends a head with END_STREAM (a gRPC trailers-only reply) only when the
        // body says it is over before the first poll.
        let empty = || http_body_util::Empty::<Bytes>::new();
        let full = || http_body_util::Full::new(Bytes::from_static(b"abc"));
        let headers = http::HeaderMap::new();
        assert!(Counted::new(empty(), Arc::default()).is_end_stream());
        assert!(Redacted::new(empty(), redactors(), &headers).is_end_stream());
        assert_eq!(Counted::new(full(), Arc::default()).size_hint().exact(), Some(3));
        let mut redacted = Redacted::new(full(), redactors(), &headers);
        assert!(!redacted.is_end_stream());
        assert_eq!(redacted.size_hint().exact(), Some(3));
        // "abc" is all form characters, but the body is over once it is read: one frame.
        let frame = redacted.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "abc");
        assert!(redacted.is_end_stream());
        assert!(redacted.frame().await.is_none());
    }
}
