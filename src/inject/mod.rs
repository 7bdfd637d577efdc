//! Injectors: one per way a secret is written into a request, behind one trait, and
//! one builder per `auth_type` (`build::BUILDERS`). Every injector first removes every
//! client copy of its slots (any case, any count), then writes exactly one value
//! (invariant 3).
//!
//! The exchange (`proxy::exchange`) knows no scheme by name: what a scheme needs
//! besides writing its secret — a minted token refreshed, a body hashed, a replay after
//! a 401, a token endpoint answered locally — it asks for through the hooks below.

pub mod build;
pub mod gcp;
pub mod github_app;
pub mod header;
pub mod mint;
pub mod mtls;
pub mod oauth2;
pub mod query;
pub mod sigv4;

use std::borrow::Cow;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;

use http::header::HeaderName;
use http::request::Parts;
use serde::Serialize;

pub use header::{HeaderInjector, HeaderSlot, HeaderValueSource, SlotError};
pub use mint::{MintError, TokenHttp};
pub use query::QueryInjector;

use crate::policy::{Destination, RefusalKind, RequestHead};
use crate::secrets::Secret;

/// What a request holds where an injector writes.
#[derive(Debug, PartialEq)]
pub enum Held<'h> {
    /// The credential's placeholder (`Injector::carries_placeholder`).
    Placeholder,
    /// Anything else, as `Injector::presented` reads it.
    Presented(Option<Cow<'h, str>>),
}

/// Where an injector writes, for `explain` and docs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Slot {
    Header { header: String },
    Query { query: String },
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The secret cannot be produced for this destination (e.g. no variable for a capture).
    #[error("{0}")]
    Unavailable(String),
    /// A minted credential could not get a token.
    #[error("cannot get a token: {0}")]
    Mint(#[from] MintError),
    /// The request is in a form this credential cannot be applied to.
    #[error("{message}")]
    Refused { kind: RefusalKind, message: String },
}

/// A future a hook returns (boxed: `Injector` is used as `dyn`).
pub type Hook<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The default `refresh` of a credential with nothing to refresh. A unit struct: boxing
/// it allocates nothing, and every request of such a credential asks for it.
struct UpToDate;

impl Future for UpToDate {
    type Output = Result<(), InjectError>;

    fn poll(self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The body of a token response latchkey gives client libraries itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vended {
    pub content_type: &'static str,
    pub body: String,
}

pub trait Injector: Send + Sync + Debug {
    /// Strip the client's copies and write the secret once. `body` is the whole request
    /// body when `body_limit` asked for it (signing schemes hash it). `parts.uri` is
    /// absolute: its host is the destination.
    fn inject(
        &self,
        parts: &mut Parts,
        captures: &[(String, String)],
        body: Option<&[u8]>,
    ) -> Result<(), InjectError>;

    /// Hook, phase "inject", before `inject`: bring what this credential writes up to
    /// date — a minted token fetched, or refreshed before it expires, one refresh in
    /// flight. An error makes the request fail with 502 (invariant 10).
    fn refresh<'a>(&'a self, _http: &'a dyn TokenHttp) -> Hook<'a, Result<(), InjectError>> {
        Box::pin(UpToDate)
    }

    /// Hook, phase "inject": `Some(max)` when the injector needs the whole body (a
    /// signing scheme hashes it), buffered up to `max` bytes (413 beyond).
    fn body_limit(&self, _parts: &Parts) -> Option<usize> {
        None
    }

    /// Hook, phase "send": keep a small request so it can go once more after the
    /// upstream refuses the credential with 401 (a minted token can be revoked early).
    fn replays_after_401(&self) -> bool {
        false
    }

    /// Hook, phase "send": the upstream answered 401 to the credential as written; get
    /// a new one. True when the request may be sent once more (with `inject` again).
    fn renew<'a>(&'a self, _http: &'a dyn TokenHttp) -> Hook<'a, bool> {
        Box::pin(std::future::ready(false))
    }

    /// Hook, phase "decide" answered `Vend`: the stand-in token response latchkey gives
    /// client libraries itself, never a real token.
    fn vend(&self) -> Option<Vended> {
        None
    }

    /// Does the request carry `placeholder` where this injector writes on `dest`?
    fn carries_placeholder(&self, dest: &Destination, head: &RequestHead<'_>, placeholder: &str) -> bool;

    /// What the client wrote where this injector writes on `dest` (its placeholder, a
    /// scoped token, anything): the slot's value without its scheme prefix, the password
    /// of a basic credential, the query parameter's decoded value. `None`: nothing
    /// there, or an injector without such a slot (no token can stand in for it).
    fn presented<'h>(&self, _dest: &Destination, _head: &RequestHead<'h>) -> Option<Cow<'h, str>> {
        None
    }

    /// Both questions above, as the policy asks them on every request: the placeholder,
    /// else what was presented. An injector that can answer both with one look at the
    /// request overrides this.
    fn held<'h>(&self, dest: &Destination, head: &RequestHead<'h>, placeholder: &str) -> Held<'h> {
        match self.carries_placeholder(dest, head, placeholder) {
            true => Held::Placeholder,
            false => Held::Presented(self.presented(dest, head)),
        }
    }
    fn slots(&self) -> Vec<Slot>;
    /// Add the values this injector may write to `out`, for leak checks and redaction.
    /// (Into the caller's vector: redaction asks on every response, and reuses one.)
    fn secrets(&self, out: &mut Vec<Secret>);
}

/// Percent-encode everything but RFC 3986 unreserved characters.
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Connection-specific headers (RFC 9110 7.6.1) plus the proxy's own. `Trailer` is
/// end-to-end: it declares the trailer fields a chunked HTTP/1.1 response carries.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop_name(name).is_some()
}

/// [`is_hop_by_hop`], answered with the name itself as a `&'static str`: a map can be
/// searched by it while the map is changed, with no name cloned.
pub fn hop_by_hop_name(name: &HeaderName) -> Option<&'static str> {
    hop_by_hop_lower(name.as_str())
}

/// Is a `Connection` list item (any letter case) the name of a hop-by-hop header?
pub fn is_hop_by_hop_token(token: &[u8]) -> bool {
    let mut lower = [0u8; 24];
    // Longer than every hop-by-hop name: not one.
    let Some(buf) = lower.get_mut(..token.len()) else { return false };
    for (to, from) in buf.iter_mut().zip(token) {
        *to = from.to_ascii_lowercase();
    }
    std::str::from_utf8(buf).is_ok_and(|t| hop_by_hop_lower(t).is_some())
}

fn hop_by_hop_lower(name: &str) -> Option<&'static str> {
    Some(match name {
        "connection" => "connection",
        "proxy-connection" => "proxy-connection",
        "keep-alive" => "keep-alive",
        "te" => "te",
        "transfer-encoding" => "transfer-encoding",
        "upgrade" => "upgrade",
        "proxy-authorization" => "proxy-authorization",
        "proxy-authenticate" => "proxy-authenticate",
        _ => return None,
    })
}
