//! Request trailers: a second head a client writes after the body (a chunked HTTP/1.1
//! body's trailer section, an HTTP/2 trailing HEADERS frame). Upstreams may merge them
//! into the head, so they get the head's rules: the chosen credential's header slots are
//! removed (invariant 3) and `blocked_patterns` look at every line.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::HeaderMap;
use http::header::HeaderName;
use http_body::Frame;

use super::BoxError;
use super::body::{BlockedBody, Filtered, FrameFilter};
use crate::policy::ContentFilter;

/// What a request's trailers must be cleaned of and scanned for.
#[derive(Clone, Default)]
pub struct TrailerRules {
    /// Header names of the injected credential's slots (parsed once, at load).
    pub strip: Option<Arc<[HeaderName]>>,
    /// `blocked_patterns`, when any are set.
    pub filter: Option<Arc<crate::config::Config>>,
}

impl TrailerRules {
    /// The slots of the credential a request got, and the content filter when set.
    pub fn new(credential: Option<&crate::config::Credential>, config: &Arc<crate::config::Config>) -> Self {
        let strip = credential.map(|c| c.slot_headers.clone()).filter(|names| !names.is_empty());
        let filter = (!config.policy.filters.content.is_empty()).then(|| config.clone());
        TrailerRules { strip, filter }
    }

    /// Nothing to do: the body is passed on unwrapped.
    pub fn is_empty(&self) -> bool {
        self.strip.is_none() && self.filter.is_none()
    }

    /// Clean `trailers`; the blocked pattern they hold, if any.
    fn apply(&self, trailers: &mut HeaderMap) -> Option<String> {
        for name in self.strip.iter().flat_map(|names| names.iter()) {
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

/// Request trailers through `TrailerRules`: a blocked pattern ends the body with an
/// error (the upstream request is aborted) and is recorded in `hit`.
pub struct TrailerGuard {
    rules: TrailerRules,
    pub hit: Arc<OnceLock<String>>,
}

/// A request body whose trailers pass through a [`TrailerGuard`].
pub type GuardedTrailers<B> = Filtered<B, TrailerGuard>;

impl<B> Filtered<B, TrailerGuard> {
    pub fn new(inner: B, rules: TrailerRules, hit: Arc<OnceLock<String>>) -> Self {
        Filtered::with(inner, TrailerGuard { rules, hit })
    }
}

impl FrameFilter for TrailerGuard {
    fn frame(&mut self, frame: &mut Frame<Bytes>) -> Result<(), BoxError> {
        let Some(trailers) = frame.trailers_mut() else { return Ok(()) };
        if let Some(pattern) = self.rules.apply(trailers) {
            let _ = self.hit.set(pattern.clone());
            return Err(Box::new(BlockedBody(pattern)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn slots_are_removed_in_any_case_and_count() {
        let rules =
            TrailerRules { strip: Some(Arc::from([HeaderName::from_static("x-api-key")])), filter: None };
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
        use http_body::Body as _;
        let body = http_body_util::Full::new(Bytes::from_static(b"abc")).map_err(|e| match e {}).boxed();
        let g = GuardedTrailers::new(body, TrailerRules::default(), Arc::default());
        assert_eq!(g.size_hint().exact(), Some(3));
        assert!(!g.is_end_stream());
    }
}
