//! Header credentials — `auth_type = "header"`, `"bearer"` and `"basic"` — and their
//! builders: the secret written into one header slot, in the form the client chose.

use std::borrow::Cow;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http::header::{HeaderName, HeaderValue};
use http::request::Parts;

use super::build::{BuildError, Built, Sources};
use super::{Held, InjectError, Injector, Slot, is_hop_by_hop};
use crate::config::raw::RawCredential;
use crate::policy::{Destination, RequestHead};
use crate::secrets::{Secret, SecretValue, Source};

message_error! {
    /// A header slot, or the secret for one, that cannot be used: why.
    pub SlotError
}

/// One header slot: `"Name"` (raw value) or `"Name: Prefix"`.
#[derive(Clone, Debug)]
pub struct HeaderSlot {
    pub name: HeaderName,
    pub prefix: Option<String>,
}

impl HeaderSlot {
    /// `value` is `placeholder` in this slot's form. Compared as bytes: a slot holding a
    /// long scoped token is told apart by its length, without reading it through (asked
    /// on every request).
    fn holds(&self, value: &HeaderValue, placeholder: &str) -> bool {
        let body = match &self.prefix {
            Some(p) => match value.as_bytes().split_at_checked(p.len()) {
                Some((scheme, rest))
                    if scheme.eq_ignore_ascii_case(p.as_bytes()) && rest.first() == Some(&b' ') =>
                {
                    rest
                }
                _ => return false,
            },
            None => value.as_bytes(),
        };
        body.trim_ascii() == placeholder.as_bytes()
    }

    pub fn parse(raw: &str) -> Result<Self, SlotError> {
        let (name, prefix) = match raw.split_once(':') {
            Some((n, p)) => (n.trim(), Some(p.trim().to_string()).filter(|p| !p.is_empty())),
            None => (raw.trim(), None),
        };
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("bad header name {name:?}"))?;
        if is_hop_by_hop(&name) || name == http::header::HOST {
            return Err(format!("{name} cannot carry a credential").into());
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
    pub fn new(slots: Vec<HeaderSlot>, source: HeaderValueSource) -> Result<Self, SlotError> {
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
    /// The slot a request uses, for injecting and for reading alike (one rule, so the
    /// slot checked for the placeholder is the slot written): the first whose header it
    /// has, else the first. By index, with that header's first value.
    fn chosen<'h>(&self, headers: &'h http::HeaderMap) -> (usize, Option<&'h HeaderValue>) {
        self.slots
            .iter()
            .enumerate()
            .find_map(|(i, s)| headers.get(&s.name).map(|v| (i, Some(v))))
            .unwrap_or((0, None))
    }

    /// The slot's value without its scheme prefix, the password of a basic credential.
    fn read<'h>(&self, slot: &HeaderSlot, value: &'h HeaderValue) -> Option<Cow<'h, str>> {
        let value = visible_ascii(value.as_bytes())?;
        let body = match &slot.prefix {
            Some(p) => match value.split_once(' ') {
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case(p) => rest.trim(),
                _ => return None,
            },
            None => value.trim(),
        };
        match &self.source {
            HeaderValueSource::Raw(_) => Some(Cow::Borrowed(body)),
            HeaderValueSource::Basic { .. } => B64
                .decode(body)
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .and_then(|d| d.split_once(':').map(|(_, p)| Cow::Owned(p.to_string()))),
        }
    }
}

impl Injector for HeaderInjector {
    fn inject(
        &self,
        parts: &mut Parts,
        captures: &[(String, String)],
        _: Option<&[u8]>,
    ) -> Result<(), InjectError> {
        let chosen = self.chosen(&parts.headers).0;
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

    fn carries_placeholder(&self, dest: &Destination, head: &RequestHead<'_>, placeholder: &str) -> bool {
        self.held(dest, head, placeholder) == Held::Placeholder
    }

    fn presented<'h>(&self, _: &Destination, head: &RequestHead<'h>) -> Option<Cow<'h, str>> {
        let (i, value) = self.chosen(head.headers);
        self.read(&self.slots[i], value?)
    }

    /// One look at the request's headers for both questions (they were four lookups).
    fn held<'h>(&self, _: &Destination, head: &RequestHead<'h>, placeholder: &str) -> Held<'h> {
        let (i, Some(value)) = self.chosen(head.headers) else { return Held::Presented(None) };
        let slot = &self.slots[i];
        match &self.source {
            HeaderValueSource::Raw(_) if slot.holds(value, placeholder) => Held::Placeholder,
            HeaderValueSource::Raw(_) => Held::Presented(self.read(slot, value)),
            HeaderValueSource::Basic { .. } => match self.read(slot, value) {
                Some(v) if v == placeholder => Held::Placeholder,
                v => Held::Presented(v),
            },
        }
    }

    fn slots(&self) -> Vec<Slot> {
        self.slots.iter().map(|s| Slot::Header { header: s.name.to_string() }).collect()
    }

    fn secrets(&self, out: &mut Vec<Secret>) {
        match &self.source {
            HeaderValueSource::Raw(v) => v.add_to(out),
            HeaderValueSource::Basic { password, .. } => {
                password.add_to(out);
                out.extend(self.source.render(&[]));
            }
        }
    }
}

/// Where header credentials write: `header` (one name or several alternatives), each
/// `"Name"` or `"Name: Prefix"`, else `default`; `prefix` for slots that name none.
fn slots(c: &RawCredential, default: &str, prefix: Option<&str>) -> Result<Vec<HeaderSlot>, BuildError> {
    let names = c.header.clone().map(|h| h.into_vec()).unwrap_or_else(|| vec![default.to_string()]);
    if names.is_empty() {
        return Err(BuildError::new("header", "name at least one header"));
    }
    names
        .iter()
        .map(|n| {
            let mut slot = HeaderSlot::parse(n).map_err(|x| BuildError::new("header", x.to_string()))?;
            if slot.prefix.is_none() {
                slot.prefix = prefix.map(str::to_string);
            }
            Ok(slot)
        })
        .collect()
}

/// `auth_type = "header"`: the raw secret in `header`.
pub fn build_header(c: &RawCredential, sources: &mut Sources<'_>) -> Result<Built, BuildError> {
    if c.header.is_none() {
        return Err(BuildError::new("header", "auth_type \"header\" needs `header`"));
    }
    raw_value(c, sources, None)
}

/// `auth_type = "bearer"`: `Authorization: Bearer <secret>` (or the slots `header` names).
pub fn build_bearer(c: &RawCredential, sources: &mut Sources<'_>) -> Result<Built, BuildError> {
    raw_value(c, sources, Some("Bearer"))
}

fn raw_value(
    c: &RawCredential,
    sources: &mut Sources<'_>,
    prefix: Option<&str>,
) -> Result<Built, BuildError> {
    let slots = slots(c, "Authorization", prefix)?;
    let src = sources.source("value", c.value.as_ref())?;
    let v = sources.resolve_or_unset(&src);
    let inj = HeaderInjector::new(slots, HeaderValueSource::Raw(v))
        .map_err(|x| BuildError::new("value", x.to_string()))?;
    Ok(Built::new(Box::new(inj), src))
}

/// `auth_type = "basic"`: `Authorization: Basic base64(username:password)`.
pub fn build_basic(c: &RawCredential, sources: &mut Sources<'_>) -> Result<Built, BuildError> {
    let user =
        c.username.as_deref().ok_or_else(|| BuildError::new("username", "basic auth needs `username`"))?;
    let user_src = Source::Value(sources.template("username", user)?);
    let username = sources.resolve_or_unset(&user_src);
    if c.value.is_some() {
        return Err(BuildError::new("value", "basic auth takes `password` (or value_file / value_command)"));
    }
    let src = sources.source("password", c.password.as_ref())?;
    let password = sources.resolve_or_unset(&src);
    let slots = slots(c, "Authorization", Some("Basic"))?;
    let inj = HeaderInjector::new(slots, HeaderValueSource::Basic { username, password })
        .map_err(|x| BuildError::new("password", x.to_string()))?;
    Ok(Built::new(Box::new(inj), src))
}

/// The value as text when every byte is visible ASCII or a tab (what
/// `HeaderValue::to_str` accepts), checked without an early exit so that it vectorises:
/// a scoped token in a slot is ~600 bytes, read on every request.
fn visible_ascii(bytes: &[u8]) -> Option<&str> {
    let visible = bytes.iter().fold(true, |ok, &b| ok & ((b' '..=b'~').contains(&b) | (b == b'\t')));
    visible.then(|| std::str::from_utf8(bytes).ok()).flatten()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    pub(crate) fn secret(s: &str) -> SecretValue {
        SecretValue::Static(Secret::new(s.into()))
    }

    /// `carries_placeholder` asked as the decision asks it, of a request built as `parts`.
    pub(crate) fn placeholder_in(inj: &dyn Injector, p: &Parts, placeholder: &str) -> bool {
        let target = p.uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
        let head = RequestHead {
            method: p.method.as_str(),
            target,
            path: p.uri.path(),
            headers: &p.headers,
            tls: true,
        };
        let dest = Destination::parse_authority("api.example.com:443", None).unwrap();
        inj.carries_placeholder(&dest, &head, placeholder)
    }

    /// `held` asked as the decision asks it.
    fn held_in<'p>(inj: &dyn Injector, p: &'p Parts, placeholder: &str) -> Held<'p> {
        let head = RequestHead { method: "GET", target: "/", path: "/", headers: &p.headers, tls: true };
        let dest = Destination::parse_authority("api.example.com:443", None).unwrap();
        inj.held(&dest, &head, placeholder)
    }

    /// `x-api-key`, else `Authorization: Bearer`, holding `REAL`.
    fn two_slots() -> HeaderInjector {
        let slots = vec![
            HeaderSlot::parse("x-api-key").unwrap(),
            HeaderSlot::parse("Authorization: Bearer").unwrap(),
        ];
        HeaderInjector::new(slots, HeaderValueSource::Raw(secret("REAL"))).unwrap()
    }

    /// The slot read is the first whose header the request has; the placeholder is
    /// matched in that slot's form only, and anything else there is what was presented.
    #[test]
    fn what_a_raw_slot_holds() {
        let inj = two_slots();
        let presented = |v: &str| Held::Presented(Some(Cow::Owned(v.to_string())));
        let cases: [(&[(&str, &str)], Held<'_>); 7] = [
            (&[("authorization", "Bearer ph")], Held::Placeholder),
            (&[("authorization", "bearer   ph ")], Held::Placeholder),
            (&[("x-api-key", " ph")], Held::Placeholder),
            (&[("authorization", "Bearer other")], presented("other")),
            // x-api-key comes first: the Authorization placeholder is not read.
            (&[("x-api-key", "other"), ("authorization", "Bearer ph")], presented("other")),
            // Not in the slot's form: neither the placeholder nor a value.
            (&[("authorization", "Basic ph")], Held::Presented(None)),
            (&[("accept", "ph")], Held::Presented(None)),
        ];
        for (headers, want) in cases {
            let p = parts("/", headers);
            assert_eq!(held_in(&inj, &p, "ph"), want, "{headers:?}");
            assert_eq!(placeholder_in(&inj, &p, "ph"), want == Held::Placeholder, "{headers:?}");
        }
    }

    #[test]
    fn header_overrides_every_copy() {
        let inj = two_slots();
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
        assert!(placeholder_in(&inj, &p, "latchkey-gh"));
        assert!(!placeholder_in(&inj, &p, "other"));
        inj.inject(&mut p, &[], None).unwrap();
        let want = format!("Basic {}", B64.encode("x-access-token:ghp_REAL"));
        assert_eq!(p.headers.get("authorization").unwrap(), want.as_str());
    }
}
