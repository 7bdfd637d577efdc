//! Body wrappers. Those that only look at frames as they pass — the `blocked_patterns`
//! scanner, the byte counter, the request-trailer guard, the response body that records
//! its exchange — are one wrapper, [`Filtered`], around a [`FrameFilter`]: it forwards
//! `is_end_stream` and `size_hint` once for all of them (a gRPC trailers-only reply
//! depends on it). [`Redacted`] changes what passes, so it has its own.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::BoxError;
use crate::config::Config;
use crate::telemetry::Pending;

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

/// What a [`Filtered`] body does with each frame before passing it on.
pub trait FrameFilter: Unpin {
    /// Look at (or edit) `frame`; an error ends the body with it.
    fn frame(&mut self, frame: &mut Frame<Bytes>) -> Result<(), BoxError>;
}

/// A body whose frames pass through a [`FrameFilter`]; the end and the size are the
/// inner body's.
pub struct Filtered<B, F> {
    inner: B,
    pub filter: F,
}

impl<B, F> Filtered<B, F> {
    pub fn with(inner: B, filter: F) -> Self {
        Filtered { inner, filter }
    }
}

impl<B, F> HttpBody for Filtered<B, F>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    F: FrameFilter,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> FramePoll {
        let this = &mut *self;
        let mut frame = match next_frame(&mut this.inner, cx) {
            Ok(f) => f,
            Err(poll) => return poll,
        };
        match this.filter.frame(&mut frame) {
            Ok(()) => Poll::Ready(Some(Ok(frame))),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("request body matches blocked pattern {0:?}")]
pub struct BlockedBody(pub String);

/// Scans a request body for blocked patterns as it streams, carrying an overlap
/// between chunks so a pattern split across them is still found. Bytes past
/// `inspect_body_bytes` pass unscanned (documented limit).
pub struct Scan {
    config: Arc<Config>,
    carry: Vec<u8>,
    scanned: usize,
    pub hit: Arc<OnceLock<String>>,
}

pub type ScanBody<B> = Filtered<B, Scan>;

impl<B> Filtered<B, Scan> {
    pub fn new(inner: B, config: Arc<Config>) -> Self {
        let scan = Scan { config, carry: Vec::new(), scanned: 0, hit: Arc::new(OnceLock::new()) };
        Filtered::with(inner, scan)
    }
}

impl Scan {
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

impl FrameFilter for Scan {
    fn frame(&mut self, frame: &mut Frame<Bytes>) -> Result<(), BoxError> {
        if let Some(data) = frame.data_ref()
            && let Some(pattern) = self.scan(data)
        {
            let _ = self.hit.set(pattern.clone());
            return Err(Box::new(BlockedBody(pattern)));
        }
        Ok(())
    }
}

/// Counts the data bytes that pass.
pub struct Count(Arc<AtomicU64>);

pub type Counted<B> = Filtered<B, Count>;

impl<B> Filtered<B, Count> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Filtered::with(inner, Count(count))
    }
}

impl FrameFilter for Count {
    fn frame(&mut self, frame: &mut Frame<Bytes>) -> Result<(), BoxError> {
        if let Some(d) = frame.data_ref() {
            self.0.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// A response body that records its exchange when it ends (or is dropped), and holds
/// the exchange in flight until then (a shutdown waits for it).
pub struct Log {
    pending: Pending,
    _in_flight: super::ExchangeGuard,
}

pub type Logged<B> = Filtered<B, Log>;

impl<B> Filtered<B, Log> {
    pub fn new(inner: B, pending: Pending, in_flight: super::ExchangeGuard) -> Self {
        Filtered::with(inner, Log { pending, _in_flight: in_flight })
    }
}

impl FrameFilter for Log {
    fn frame(&mut self, frame: &mut Frame<Bytes>) -> Result<(), BoxError> {
        if let Some(data) = frame.data_ref() {
            self.pending.saw(data);
        }
        Ok(())
    }
}

/// Masks secrets in a response body as it streams (see `crate::redact`).
pub struct Redacted<B> {
    inner: B,
    stream: crate::redact::Stream,
    /// The second piece a chunk released (`redact::Released`), sent next.
    then: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
    done: bool,
}

impl<B> Redacted<B> {
    /// `headers`: the response's, which tell a gRPC body (released message by message).
    pub fn new(inner: B, set: crate::redact::Set, headers: &http::HeaderMap) -> Self {
        let grpc = super::respond::Protocol::of(headers) == super::respond::Protocol::Grpc;
        let stream = match grpc {
            true => crate::redact::Stream::grpc(set),
            false => crate::redact::Stream::new(set),
        };
        Redacted { inner, stream, then: None, trailers: None, done: false }
    }
}

/// Mask secrets in header values (same length, so nothing else changes) and drop every
/// header whose name holds one.
pub fn redact_headers(headers: &mut http::HeaderMap, set: &crate::redact::Set) {
    if head_is_clean(headers, set) {
        return;
    }
    let named: Vec<http::HeaderName> =
        headers.keys().filter(|k| set.names_secret(k.as_str().as_bytes())).cloned().collect();
    for name in named {
        headers.remove(name);
    }
    for value in headers.values_mut() {
        // Copied only when it holds a secret: most headers of most responses do not.
        if let Some(masked) = set.masked(value.as_bytes())
            && let Ok(v) = http::HeaderValue::from_bytes(&masked)
        {
            *value = v;
        }
    }
}

/// Does no header name or value hold a secret? The names in one search over them
/// joined by NUL (`redact::joined_by_nul`), apart from the values (the names' search is
/// case-insensitive, and its prefilter fires often in values); then the values in one
/// search. Most heads hold no secret, and one search costs a fraction of one per header.
fn head_is_clean(headers: &http::HeaderMap, set: &crate::redact::Set) -> bool {
    use crate::redact::joined_by_nul;
    !joined_by_nul(headers.keys().map(|k| k.as_str().as_bytes()), |names| set.names_secret(names))
        && joined_by_nul(headers.values().map(|v| v.as_bytes()), |values| set.count(values)) == 0
}

/// Mask secrets in a response head: the HTTP/1.1 reason phrase, header names and values.
pub fn redact_head<B>(resp: &mut http::Response<B>, set: &crate::redact::Set) {
    if let Some(reason) = resp.extensions().get::<hyper::ext::ReasonPhrase>()
        && let Some(bytes) = set.masked(reason.as_bytes())
    {
        // Without the upstream's phrase, hyper writes the canonical one.
        let masked = hyper::ext::ReasonPhrase::try_from(bytes);
        resp.extensions_mut().remove::<hyper::ext::ReasonPhrase>();
        if let Ok(r) = masked {
            resp.extensions_mut().insert(r);
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
            if let Some(then) = self.then.take() {
                return Poll::Ready(Some(Ok(Frame::data(then))));
            }
            if self.done {
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match next_frame(&mut self.inner, cx) {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => {
                        // A body that knows it is over (a length reached) is released in
                        // one frame rather than its held tail in a second one.
                        let (out, then) = match self.inner.is_end_stream() {
                            true => (self.stream.push_last(data), None),
                            false => self.stream.push(data),
                        };
                        self.then = then.filter(|t| !t.is_empty());
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => {
                        let mut trailers = frame.into_trailers().unwrap_or_default();
                        redact_headers(&mut trailers, self.stream.set());
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
        let pending = self.stream.held() > 0 || self.then.is_some() || self.trailers.is_some();
        !pending && (self.done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        // Masking keeps lengths; what is held back is still to come.
        let inner = self.inner.size_hint();
        let held = (self.stream.held() + self.then.as_ref().map_or(0, Bytes::len)) as u64;
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
    use base64::Engine;
    use http_body_util::BodyExt;

    fn redactors() -> crate::redact::Set {
        let secret = crate::secrets::Secret::new("body-secret-0123456789".into());
        crate::redact::Set::new(vec![Arc::new(crate::redact::Redactor::new(&[secret]).unwrap())]).unwrap()
    }

    #[test]
    fn a_secret_split_across_two_headers_is_no_secret() {
        let set = redactors();
        let mut headers = http::HeaderMap::new();
        headers.append("x-a", http::HeaderValue::from_static("body-secret-"));
        headers.append("x-b", http::HeaderValue::from_static("0123456789"));
        assert!(head_is_clean(&headers, &set), "the joined search spans two values");
        headers.append("x-c", http::HeaderValue::from_static("u:body-secret-0123456789"));
        assert!(!head_is_clean(&headers, &set));
    }

    proptest::proptest! {
        /// The one search over the joined head answers exactly as the search per header
        /// does: the secret, its encodings and fragments of both, anywhere in any header.
        #[test]
        fn the_joined_head_search_agrees_with_the_search_per_header(
            heads in proptest::collection::vec(
                (0usize..5, proptest::collection::vec(0usize..10, 0..5)), 0..6),
        ) {
            let set = redactors();
            let b64 = base64::engine::general_purpose::STANDARD.encode("u:body-secret-0123456789");
            let pieces = ["body-secret-0123456789", "body-secret-", "0123456789", &b64, "\\", "u0062",
                "ody-secret-0123456789", "text/html", " ", "%2D"];
            // Names are searched joined too: a secret split across two names is none.
            let names = ["x-a", "body-secret-0123456789", "x-body-secret-0123456789", "body-secret-", "0123456789"];
            let mut headers = http::HeaderMap::new();
            for (name, value) in &heads {
                let value: String = value.iter().map(|i| pieces[*i]).collect();
                headers.append(names[*name], http::HeaderValue::from_str(&value).unwrap());
            }
            let per_header = headers.keys().all(|k| !set.names_secret(k.as_str().as_bytes()))
                && headers.values().all(|v| set.masked(v.as_bytes()).is_none());
            proptest::prop_assert_eq!(head_is_clean(&headers, &set), per_header, "{:?}", headers);
        }
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
