//! Request trailers: a second head a client writes after the body (a chunked HTTP/1.1
//! body's trailer section, an HTTP/2 trailing HEADERS frame). Upstreams may merge them
//! into the head, so they get the head's rules: the chosen credential's header slots are
//! removed (invariant 3) and `blocked_patterns` look at every line.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http::header::HeaderName;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::BoxError;
use super::body::BlockedBody;
use crate::policy::ContentFilter;

/// What a request's trailers must be cleaned of and scanned for.
#[derive(Clone, Default)]
pub struct TrailerRules {
    /// Header names of the injected credential's slots.
    pub strip: Vec<HeaderName>,
    /// `blocked_patterns`, when any are set.
    pub filter: Option<Arc<crate::config::Config>>,
}

impl TrailerRules {
    /// The slots of the credential a request got, and the content filter when set.
    pub fn new(credential: Option<&crate::config::Credential>, config: &Arc<crate::config::Config>) -> Self {
        let strip = credential
            .map(|c| c.injector.slots())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|s| match s {
                crate::inject::Slot::Header { header } => HeaderName::from_bytes(header.as_bytes()).ok(),
                crate::inject::Slot::Query { .. } => None,
            })
            .collect();
        let filter = (!config.policy.filters.content.is_empty()).then(|| config.clone());
        TrailerRules { strip, filter }
    }

    /// Nothing to do: the body is passed on unwrapped.
    pub fn is_empty(&self) -> bool {
        self.strip.is_empty() && self.filter.is_none()
    }

    /// Clean `trailers`; the blocked pattern they hold, if any.
    fn apply(&self, trailers: &mut HeaderMap) -> Option<String> {
        for name in &self.strip {
            trailers.remove(name);
        }
        let filter: &ContentFilter = &self.filter.as_ref()?.policy.filters.content;
        trailers.iter().find_map(|(name, value)| {
            let mut line = Vec::with_capacity(name.as_str().len() + 2 + value.len());
            line.extend_from_slice(name.as_str().as_bytes());
            line.extend_from_slice(b": ");
            line.extend_from_slice(value.as_bytes());
            filter.find(&line).map(str::to_string)
        })
    }
}

/// A request body whose trailers pass through `TrailerRules`. A blocked pattern ends the
/// body with an error (the upstream request is aborted) and is recorded in `hit`.
pub struct GuardedTrailers<B> {
    inner: B,
    rules: TrailerRules,
    pub hit: Arc<OnceLock<String>>,
}

impl<B> GuardedTrailers<B> {
    pub fn new(inner: B, rules: TrailerRules, hit: Arc<OnceLock<String>>) -> Self {
        GuardedTrailers { inner, rules, hit }
    }
}

impl<B> HttpBody for GuardedTrailers<B>
where
    B: HttpBody<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let mut trailers = match frame.into_trailers() {
            Ok(t) => t,
            Err(frame) => return Poll::Ready(Some(Ok(frame))),
        };
        if let Some(pattern) = self.rules.apply(&mut trailers) {
            let _ = self.hit.set(pattern.clone());
            return Poll::Ready(Some(Err(Box::new(BlockedBody(pattern)))));
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
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
    use http_body_util::BodyExt;

    #[test]
    fn slots_are_removed_in_any_case_and_count() {
        let rules = TrailerRules { strip: vec![HeaderName::from_static("x-api-key")], filter: None };
        let mut t = HeaderMap::new();
        t.append("X-Api-Key", "a".parse().unwrap());
        t.append("x-api-key", "b".parse().unwrap());
        t.append("x-other", "kept".parse().unwrap());
        assert_eq!(rules.apply(&mut t), None);
        assert!(t.get("x-api-key").is_none());
        assert_eq!(t["x-other"], "kept");
    }

    #[test]
    fn end_of_stream_and_size_pass_through() {
        let body = http_body_util::Full::new(Bytes::from_static(b"abc")).map_err(|e| match e {}).boxed();
        let g = GuardedTrailers::new(body, TrailerRules::default(), Arc::default());
        assert_eq!(g.size_hint().exact(), Some(3));
        assert!(!g.is_end_stream());
    }
}
