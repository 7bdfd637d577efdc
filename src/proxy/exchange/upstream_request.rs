//! Phase "prepare": the request as it goes upstream — its URI built from the
//! destination (never from a client-written host), hop-by-hop headers removed, HTTP/1.1
//! semantics, `Via`, and identity encoding asked for when the response will be scanned.

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Uri, Version};

use super::super::route::Route;
use crate::config::Config;
use crate::inject::{hop_by_hop_name, is_hop_by_hop_token};
use crate::policy::Refusal;

/// Rewrite the request for the upstream. Returns whether the response will be
/// redacted: every response from a host a credential names is scanned, whether or not
/// this request carries the credential (it may return one sent earlier).
pub fn prepare(parts: &mut Parts, route: &Route, config: &Config) -> Result<bool, Refusal> {
    // `te: trailers` is the one TE value that crosses hops (gRPC needs it).
    let trailers =
        parts.headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    strip_hop_by_hop(&mut parts.headers);
    if trailers {
        parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    parts.headers.remove(header::HOST);
    proxy_authorization(parts, route, config);
    parts.uri = upstream_uri(&parts.uri, route)?;
    parts.version = Version::HTTP_11;
    if config.proxy.via {
        add_via(&mut parts.headers);
    }
    let redact = config.proxy.redact_responses && !route.naming.is_empty();
    if redact {
        // A compressed body could not be scanned for the secret: ask for identity.
        parts.headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    }
    Ok(redact)
}

/// A plain-HTTP request through the corporate proxy goes to it in absolute form, with
/// latchkey's own `Proxy-Authorization` (the client's was removed with the other
/// hop-by-hop headers).
fn proxy_authorization(parts: &mut Parts, route: &Route, config: &Config) {
    let Some(proxy) = config.upstream.proxy.as_ref() else { return };
    if route.scheme == http::uri::Scheme::HTTP
        && proxy.applies(&route.dest)
        && let Some(value) = proxy.authorization()
    {
        parts.headers.insert(header::PROXY_AUTHORIZATION, value);
    }
}

/// `scheme://destination/path?query`: the client's path, the connection's destination.
fn upstream_uri(uri: &Uri, route: &Route) -> Result<Uri, Refusal> {
    let rebuild = || Refusal::bad_request("cannot rebuild the request URI");
    let pq = match uri.path_and_query() {
        Some(pq) if pq.as_str().starts_with('/') => pq.clone(),
        Some(pq) => format!("/{pq}").parse().map_err(|_| rebuild())?,
        None => PathAndQuery::from_static("/"),
    };
    let mut out = http::uri::Parts::default();
    out.scheme = Some(route.scheme.clone());
    out.authority = Some(route.origin.clone().ok_or_else(rebuild)?);
    out.path_and_query = Some(pq);
    Uri::from_parts(out).map_err(|_| rebuild())
}

/// Append latchkey to `Via` (RFC 9110 7.6.3), keeping what earlier hops wrote.
/// One lookup: runs on every request and response.
pub fn add_via(headers: &mut HeaderMap) {
    const US: &str = "1.1 latchkey";
    match headers.entry(header::VIA) {
        header::Entry::Vacant(e) => {
            e.insert(HeaderValue::from_static(US));
        }
        header::Entry::Occupied(mut e) => {
            let prior = e.get().to_str().ok();
            if let Some(v) = prior.and_then(|p| HeaderValue::from_str(&format!("{p}, {US}")).ok()) {
                e.insert(v);
            }
        }
    }
}

/// Remove hop-by-hop headers and every header the Connection header names. Runs on
/// every request and response, so nothing is allocated for a head without them.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let header::Entry::Occupied(entry) = headers.entry(header::CONNECTION) {
        let mut values = entry.remove_entry_mult().1;
        // The first value apart: one `Connection` header (the usual) allocates nothing.
        let first = values.next();
        let rest: Vec<HeaderValue> = values.collect();
        // Split as bytes: each item of every value, an item that is no name skipped
        // alone (a value with one non-ASCII item still has its other items removed).
        let listed = first.iter().chain(&rest).flat_map(|v| v.as_bytes().split(|&b| b == b','));
        // Looked up by `&str`: an invalid or empty name finds nothing. A hop-by-hop name
        // (`keep-alive`, the usual) goes with the others below.
        for item in listed.map(<[u8]>::trim_ascii).filter(|item| !is_hop_by_hop_token(item)) {
            if let Ok(name) = std::str::from_utf8(item) {
                headers.remove(name);
            }
        }
    }
    // One pass per hop-by-hop name present, at most eight.
    while let Some(name) = headers.keys().find_map(hop_by_hop_name) {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 9110 7.6.1: every header a `Connection` header names goes (any instance, any
    /// case, comma lists), with the hop-by-hop ones; the rest stays.
    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "Keep-Alive, X-Foo"),
            ("keep-alive", "timeout=5"),
            ("x-foo", "1"),
            ("x-bar", "2"),
            ("connection", " close ,X-BAR,"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic eDp5"),
            ("x-kept", "3"),
            ("content-type", "text/plain"),
        ] {
            headers.append(http::HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        // An item that is no name (obs-text) does not keep its value's other items.
        headers.append(header::CONNECTION, HeaderValue::from_bytes(b"X-Baz, caf\xe9").unwrap());
        headers.append("x-baz", HeaderValue::from_static("4"));
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-type", "x-kept"]);
        assert!(is_hop_by_hop_token(b"Keep-Alive") && is_hop_by_hop_token(b"TE"));
        assert!(!is_hop_by_hop_token(b"close") && !is_hop_by_hop_token("a".repeat(40).as_bytes()));
    }

    /// RFC 9110 7.6.3: latchkey is added after the hops before it, or alone.
    #[test]
    fn via_names_latchkey_after_earlier_hops() {
        let mut headers = HeaderMap::new();
        add_via(&mut headers);
        assert_eq!(headers.get_all(header::VIA).iter().collect::<Vec<_>>(), ["1.1 latchkey"]);
        let mut headers = HeaderMap::new();
        headers.insert(header::VIA, HeaderValue::from_static("1.0 corp"));
        add_via(&mut headers);
        assert_eq!(headers.get_all(header::VIA).iter().collect::<Vec<_>>(), ["1.0 corp, 1.1 latchkey"]);
    }
}
