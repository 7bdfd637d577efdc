//! Responses latchkey writes itself (SPEC section 6). A refusal is rendered once, here,
//! for the protocol the client speaks: one `latchkey:` text line with an
//! `X-Latchkey-Error` header, or — for a gRPC client, which cannot read that — a
//! trailers-only gRPC reply carrying the same line and kind.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::Body;
use super::upstream::UpstreamError;
use crate::policy::{Refusal, RefusalKind};

/// How a client expects latchkey's own answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Plain HTTP: a text body.
    Http,
    /// gRPC (`content-type: application/grpc[+...]`): the outcome is in `grpc-status`.
    Grpc,
}

impl Protocol {
    /// The protocol a request speaks, from its headers.
    pub fn of(headers: &HeaderMap) -> Protocol {
        let grpc = headers.get(header::CONTENT_TYPE).is_some_and(|ct| {
            let ct = ct.as_bytes();
            ct.len() >= 16 && ct[..16].eq_ignore_ascii_case(b"application/grpc")
        });
        if grpc { Protocol::Grpc } else { Protocol::Http }
    }
}

/// The one rendering of a refusal.
pub fn refusal(r: &Refusal, protocol: Protocol) -> Response<Body> {
    let line = format!("latchkey: {}", r.message);
    let mut resp = match protocol {
        Protocol::Http => text(r, line),
        Protocol::Grpc => grpc(r, &line),
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(r.token()) {
        h.insert("x-latchkey-error", v);
    }
    if let Some(secs) = r.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if r.kind == RefusalKind::ProxyAuth {
        h.insert(header::PROXY_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"latchkey\""));
    }
    resp
}

fn text(r: &Refusal, mut line: String) -> Response<Body> {
    line.push('\n');
    let mut resp = Response::new(full(line));
    *resp.status_mut() = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if r.kind.closes_connection() {
        // The rest of the stream cannot be trusted to be framed as the client meant, or
        // latchkey is stopping.
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A trailers-only gRPC reply (HTTP 200, the status in the head, no body).
fn grpc(r: &Refusal, line: &str) -> Response<Body> {
    let mut resp = Response::new(empty());
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(u16::from(grpc_status(r.status()))));
    if let Ok(v) = HeaderValue::from_str(&grpc_message(line)) {
        h.insert("grpc-message", v);
    }
    resp
}

/// gRPC's mapping of HTTP statuses to its codes (doc/http-grpc-status-mapping.md).
pub fn grpc_status(http: u16) -> u8 {
    const PERMISSION_DENIED: u8 = 7;
    const UNAUTHENTICATED: u8 = 16;
    const UNAVAILABLE: u8 = 14;
    const INTERNAL: u8 = 13;
    match http {
        403 => PERMISSION_DENIED,
        401 | 407 => UNAUTHENTICATED,
        429 | 502 | 503 | 504 => UNAVAILABLE,
        _ => INTERNAL,
    }
}

/// `grpc-message` is percent-encoded UTF-8: everything outside printable ASCII, and `%`.
fn grpc_message(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for b in line.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Answer `r` to a plain-HTTP client on a stream no HTTP server reads yet (a connection
/// that arrived without CONNECT, a blind tunnel whose client turned out to speak HTTP):
/// hyper reads the request head, writes the refusal, and the connection closes.
pub async fn on_stream<S>(io: S, r: Refusal, limits: &crate::config::Limits)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let service = hyper::service::service_fn(move |_req| {
        let resp = refusal(&r, Protocol::Http);
        async move { Ok::<_, std::convert::Infallible>(resp) }
    });
    let mut builder = super::builders::server_builder(limits);
    builder.keep_alive(false).header_read_timeout(limits.header_read_timeout);
    let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service).await;
}

pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// The refusal for an upstream failure.
pub fn upstream_refusal(e: &UpstreamError) -> Refusal {
    let kind = match e {
        UpstreamError::Refused { .. } => RefusalKind::Ssrf,
        UpstreamError::Tls { .. } | UpstreamError::NoCommonProtocol { .. } => RefusalKind::UpstreamTls,
        UpstreamError::Timeout { .. } => RefusalKind::UpstreamTimeout,
        UpstreamError::Resolve { .. } | UpstreamError::Connect { .. } | UpstreamError::Proxy { .. } => {
            RefusalKind::UpstreamUnreachable
        }
        UpstreamError::Busy { .. } => {
            return Refusal::new(RefusalKind::UpstreamBusy, e.to_string()).retry_after(1);
        }
    };
    Refusal::new(kind, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_client_gets_its_status_and_the_line() {
        let r = Refusal::new(RefusalKind::BlockedDomain, "api.example.com is blocked (100%)");
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc+proto"));
        assert_eq!(Protocol::of(&headers), Protocol::Grpc);
        let resp = refusal(&r, Protocol::of(&headers));
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["grpc-status"], "7");
        assert_eq!(resp.headers()["grpc-message"], "latchkey: api.example.com is blocked (100%25)");
        assert_eq!(resp.headers()["x-latchkey-error"], "blocked-domain");
        assert!(http_body::Body::is_end_stream(resp.body()), "trailers-only: no DATA frame");
        let plain = refusal(&r, Protocol::of(&HeaderMap::new()));
        assert_eq!(plain.status(), 403);
        assert_eq!(plain.headers()["x-latchkey-error"], "blocked-domain");
    }

    #[test]
    fn http_statuses_map_to_grpc_codes() {
        for (http, code) in [(403, 7), (407, 16), (401, 16), (429, 14), (502, 14), (503, 14), (504, 14)] {
            assert_eq!(grpc_status(http), code, "{http}");
        }
        for http in [400, 413, 421, 431, 500] {
            assert_eq!(grpc_status(http), 13, "{http}");
        }
    }
}
