//! Injectors: one per way a secret is written into a request, behind one trait.
//! Every injector first removes every client copy of its slots (any case, any count),
//! then writes exactly one value (invariant 3).

use std::fmt::Debug;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http::header::{AUTHORIZATION, HeaderName, HeaderValue};
use http::request::Parts;
use serde::Serialize;

use crate::secrets::{Secret, SecretValue};

/// Where an injector writes, for `explain` and docs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Slot {
    Header { header: String },
    Query { query: String },
}

pub mod gcp;
pub mod sigv4;

#[derive(Debug)]
pub enum InjectError {
    /// The secret cannot be produced for this destination (e.g. no variable for a capture).
    Unavailable(String),
    /// The request is in a form this credential cannot be applied to (status, why).
    Refused { status: u16, message: String },
}

pub trait Injector: Send + Sync + Debug {
    /// Strip the client's copies and write the secret once. `body` is the whole request
    /// body when `body_limit` asked for it (signing schemes hash it).
    fn inject(
        &self,
        parts: &mut Parts,
        captures: &[(String, String)],
        body: Option<&[u8]>,
    ) -> Result<(), InjectError>;
    /// `Some(max)`: the injector needs the body, buffered up to `max` bytes (413 beyond).
    fn body_limit(&self, _parts: &Parts) -> Option<usize> {
        None
    }
    /// For minted credentials (OAuth2): the source to refresh before `inject`.
    fn token_source(&self) -> Option<&std::sync::Arc<gcp::TokenSource>> {
        None
    }
    /// Does the request carry `placeholder` where this injector writes?
    fn carries_placeholder(&self, parts: &Parts, placeholder: &str) -> bool;
    /// What the client wrote where this injector writes (its placeholder, a scoped
    /// token, anything): the slot's value without its scheme prefix, the password of a
    /// basic credential, the query parameter's decoded value. `None`: nothing there, or
    /// an injector without such a slot.
    fn presented(&self, _parts: &Parts) -> Option<String> {
        None
    }
    fn slots(&self) -> Vec<Slot>;
    /// The values this injector may write, for leak checks and redaction.
    fn secrets(&self) -> Vec<Secret>;
}

/// One header slot: `"Name"` (raw value) or `"Name: Prefix"`.
#[derive(Clone, Debug)]
pub struct HeaderSlot {
    pub name: HeaderName,
    pub prefix: Option<String>,
}

impl HeaderSlot {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let (name, prefix) = match raw.split_once(':') {
            Some((n, p)) => (n.trim(), Some(p.trim().to_string()).filter(|p| !p.is_empty())),
            None => (raw.trim(), None),
        };
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("bad header name {name:?}"))?;
        if is_hop_by_hop(&name) || name == http::header::HOST {
            return Err(format!("{name} cannot carry a credential"));
        }
        Ok(HeaderSlot { name, prefix })
    }

    fn render(&self, secret: &str) -> Result<HeaderValue, InjectError> {
        let text = match &self.prefix {
            Some(p) => format!("{p} {secret}"),
            None => secret.to_string(),
        };
        let mut v = HeaderValue::from_str(&text)
            .map_err(|_| InjectError::Unavailable("secret is not a valid header value".into()))?;
        v.set_sensitive(true);
        Ok(v)
    }
}

/// What a header credential writes: the raw secret, or basic `user:password`.
#[derive(Debug)]
pub enum HeaderValueSource {
    Raw(SecretValue),
    Basic { username: SecretValue, password: SecretValue },
}

impl HeaderValueSource {
    fn is_fixed(&self) -> bool {
        match self {
            HeaderValueSource::Raw(v) => v.is_fixed(),
            HeaderValueSource::Basic { username, password } => username.is_fixed() && password.is_fixed(),
        }
    }

    fn render(&self, captures: &[(String, String)]) -> Option<Secret> {
        match self {
            HeaderValueSource::Raw(v) => v.get(captures),
            HeaderValueSource::Basic { username, password } => {
                let user = username.get(captures)?;
                let pass = password.get(captures)?;
                Some(Secret::new(B64.encode(format!("{}:{}", user.expose(), pass.expose()))))
            }
        }
    }
}

/// Header, bearer and basic credentials.
#[derive(Debug)]
pub struct HeaderInjector {
    slots: Vec<HeaderSlot>,
    source: HeaderValueSource,
    /// Precomputed values per slot when the secret does not depend on the destination.
    rendered: Option<Vec<HeaderValue>>,
}

impl HeaderInjector {
    pub fn new(slots: Vec<HeaderSlot>, source: HeaderValueSource) -> Result<Self, String> {
        let rendered = match source.render(&[]) {
            Some(secret) if source.is_fixed() => Some(
                slots
                    .iter()
                    .map(|s| s.render(secret.expose()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| "the secret contains characters not allowed in a header".to_string())?,
            ),
            _ => None,
        };
        Ok(HeaderInjector { slots, source, rendered })
    }

    /// The slot the client used (first holding a value), else the first.
    fn chosen_slot(&self, parts: &Parts) -> usize {
        self.slots.iter().position(|s| parts.headers.contains_key(&s.name)).unwrap_or(0)
    }
}

impl Injector for HeaderInjector {
    fn inject(
        &self,
        parts: &mut Parts,
        captures: &[(String, String)],
        _: Option<&[u8]>,
    ) -> Result<(), InjectError> {
        let chosen = self.chosen_slot(parts);
        let value = match &self.rendered {
            Some(values) => values[chosen].clone(),
            None => {
                let secret = self
                    .source
                    .render(captures)
                    .ok_or_else(|| InjectError::Unavailable("no secret for this destination".into()))?;
                self.slots[chosen].render(secret.expose())?
            }
        };
        for slot in &self.slots {
            // `remove` drops every value of the name; header names are case-insensitive.
            while parts.headers.remove(&slot.name).is_some() {}
        }
        parts.headers.insert(self.slots[chosen].name.clone(), value);
        Ok(())
    }

    fn carries_placeholder(&self, parts: &Parts, placeholder: &str) -> bool {
        self.presented(parts).is_some_and(|v| v == placeholder)
    }

    fn presented(&self, parts: &Parts) -> Option<String> {
        let slot = &self.slots[self.chosen_slot(parts)];
        let value = parts.headers.get(&slot.name)?.to_str().ok()?;
        let body = match &slot.prefix {
            Some(p) => match value.split_once(' ') {
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case(p) => rest.trim(),
                _ => return None,
            },
            None => value.trim(),
        };
        match &self.source {
            HeaderValueSource::Raw(_) => Some(body.to_string()),
            HeaderValueSource::Basic { .. } => B64
                .decode(body)
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .and_then(|d| d.split_once(':').map(|(_, p)| p.to_string())),
        }
    }

    fn slots(&self) -> Vec<Slot> {
        self.slots.iter().map(|s| Slot::Header { header: s.name.to_string() }).collect()
    }

    fn secrets(&self) -> Vec<Secret> {
        match &self.source {
            HeaderValueSource::Raw(v) => v.all(),
            HeaderValueSource::Basic { password, .. } => {
                let mut v: Vec<Secret> = password.all();
                v.extend(self.source.render(&[]));
                v
            }
        }
    }
}

/// `auth_type = "query"`: the secret as one query parameter.
#[derive(Debug)]
pub struct QueryInjector {
    param: String,
    value: SecretValue,
}

impl QueryInjector {
    pub fn new(param: String, value: SecretValue) -> Self {
        QueryInjector { param, value }
    }

    fn is_param(&self, pair: &str) -> bool {
        let name = pair.split('=').next().unwrap_or("");
        let decoded = crate::policy::percent_decode(name.replace('+', " ").as_bytes());
        decoded == self.param.as_bytes()
    }
}

impl Injector for QueryInjector {
    fn inject(
        &self,
        parts: &mut Parts,
        captures: &[(String, String)],
        _: Option<&[u8]>,
    ) -> Result<(), InjectError> {
        let secret = self
            .value
            .get(captures)
            .ok_or_else(|| InjectError::Unavailable("no secret for this destination".into()))?;
        let path = parts.uri.path();
        let mut pairs: Vec<&str> = parts
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty() && !self.is_param(p))
            .collect();
        let ours = format!("{}={}", encode_component(&self.param), encode_component(secret.expose()));
        pairs.push(&ours);
        let pq = format!("{path}?{}", pairs.join("&"));
        let mut uri = parts.uri.clone().into_parts();
        uri.path_and_query =
            Some(pq.parse().map_err(|_| InjectError::Unavailable("cannot build the query string".into()))?);
        parts.uri = http::Uri::from_parts(uri)
            .map_err(|_| InjectError::Unavailable("cannot build the request URI".into()))?;
        Ok(())
    }

    fn carries_placeholder(&self, parts: &Parts, placeholder: &str) -> bool {
        parts.uri.query().unwrap_or("").split('&').any(|p| {
            self.is_param(p)
                && p.split_once('=').map(|(_, v)| crate::policy::percent_decode(v.as_bytes()))
                    == Some(placeholder.as_bytes().to_vec())
        })
    }

    fn presented(&self, parts: &Parts) -> Option<String> {
        let pair = parts.uri.query()?.split('&').find(|p| self.is_param(p))?;
        let (_, value) = pair.split_once('=')?;
        Some(String::from_utf8_lossy(&crate::policy::percent_decode(value.as_bytes())).into_owned())
    }

    fn slots(&self) -> Vec<Slot> {
        vec![Slot::Query { query: self.param.clone() }]
    }

    fn secrets(&self) -> Vec<Secret> {
        self.value.all()
    }
}

/// `auth_type = "mtls"`: the credential is the client certificate latchkey presents on
/// the upstream connection; nothing is written into the request.
#[derive(Debug)]
pub struct NoInjection;

impl Injector for NoInjection {
    fn inject(&self, _: &mut Parts, _: &[(String, String)], _: Option<&[u8]>) -> Result<(), InjectError> {
        Ok(())
    }
    fn carries_placeholder(&self, _: &Parts, _: &str) -> bool {
        false
    }
    fn slots(&self) -> Vec<Slot> {
        vec![]
    }
    fn secrets(&self) -> Vec<Secret> {
        vec![]
    }
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
    matches!(
        name.as_str(),
        "connection"
            | "proxy-connection"
            | "keep-alive"
            | "te"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// The header a bearer or basic credential writes when `header` is not set.
pub fn default_auth_header() -> HeaderName {
    AUTHORIZATION
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn secret(s: &str) -> SecretValue {
        SecretValue::Static(Secret::new(s.into()))
    }

    #[test]
    fn header_overrides_every_copy() {
        let inj = HeaderInjector::new(
            vec![
                HeaderSlot::parse("x-api-key").unwrap(),
                HeaderSlot::parse("Authorization: Bearer").unwrap(),
            ],
            HeaderValueSource::Raw(secret("REAL")),
        )
        .unwrap();
        let mut p = parts("/", &[("X-Api-Key", "a"), ("x-api-key", "b"), ("authorization", "Bearer c")]);
        inj.inject(&mut p, &[], None).unwrap();
        assert_eq!(p.headers.get_all("x-api-key").iter().collect::<Vec<_>>(), vec!["REAL"]);
        assert!(p.headers.get("authorization").is_none());
        assert!(p.headers.get("x-api-key").unwrap().is_sensitive());

        let mut p = parts("/", &[("authorization", "Bearer placeholder"), ("Authorization", "Basic x")]);
        inj.inject(&mut p, &[], None).unwrap();
        assert_eq!(p.headers.get_all("authorization").iter().collect::<Vec<_>>(), vec!["Bearer REAL"]);
        assert!(p.headers.get("x-api-key").is_none());

        let mut p = parts("/", &[]);
        inj.inject(&mut p, &[], None).unwrap();
        assert_eq!(p.headers.get("x-api-key").unwrap(), "REAL");
    }

    #[test]
    fn basic_and_placeholder() {
        let inj = HeaderInjector::new(
            vec![HeaderSlot::parse("Authorization: Basic").unwrap()],
            HeaderValueSource::Basic { username: secret("x-access-token"), password: secret("ghp_REAL") },
        )
        .unwrap();
        let ph = format!("Basic {}", B64.encode("x-access-token:latchkey-gh"));
        let mut p = parts("/", &[("authorization", &ph)]);
        assert!(inj.carries_placeholder(&p, "latchkey-gh"));
        assert!(!inj.carries_placeholder(&p, "other"));
        inj.inject(&mut p, &[], None).unwrap();
        let want = format!("Basic {}", B64.encode("x-access-token:ghp_REAL"));
        assert_eq!(p.headers.get("authorization").unwrap(), want.as_str());
    }

    #[test]
    fn query_overrides_every_copy() {
        let inj = QueryInjector::new("key".into(), secret("S/1"));
        let mut p = parts("https://x.com/v1?key=a&KEY=b&k%65y=c&other=1&key", &[]);
        assert!(inj.carries_placeholder(&parts("/?key=ph", &[]), "ph"));
        inj.inject(&mut p, &[], None).unwrap();
        assert_eq!(p.uri.query().unwrap(), "KEY=b&other=1&key=S%2F1");
        assert_eq!(p.uri.path(), "/v1");
    }
}
