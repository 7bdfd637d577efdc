//! Responses latchkey writes itself (SPEC section 6): one `latchkey:` line and an
//! `X-Latchkey-Error` header naming the kind.

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use super::Body;
use super::upstream::UpstreamError;
use crate::policy::Refusal;

pub fn refusal(r: &Refusal) -> Response<Body> {
    let mut resp = text(r.status, r.kind, &r.message);
    if let Some(secs) = r.retry_after {
        resp.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
    }
    if r.kind == "smuggling" {
        // The rest of the stream cannot be trusted to be framed as the client meant.
        resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    }
    if r.status == 407 {
        resp.headers_mut()
            .insert(header::PROXY_AUTHENTICATE, header::HeaderValue::from_static("Basic realm=\"latchkey\""));
    }
    resp
}

pub fn text(status: u16, kind: &str, message: &str) -> Response<Body> {
    let body = format!("latchkey: {message}\n");
    let mut resp = Response::new(full(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    if let Ok(v) = header::HeaderValue::from_str(kind) {
        h.insert("x-latchkey-error", v);
    }
    resp
}

pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// The refusal for an upstream failure.
pub fn upstream_refusal(e: &UpstreamError) -> Refusal {
    let (status, kind) = match e {
        UpstreamError::Refused { .. } => (403, "ssrf"),
        UpstreamError::Tls { .. } | UpstreamError::NoCommonProtocol { .. } => (502, "upstream-tls"),
        UpstreamError::Timeout { .. } => (504, "upstream-timeout"),
        UpstreamError::Resolve { .. } | UpstreamError::Connect { .. } => (502, "upstream-unreachable"),
        UpstreamError::Busy { .. } => {
            return Refusal::new(503, "upstream-busy", e.to_string()).retry_after(1);
        }
    };
    Refusal::new(status, kind, e.to_string())
}

pub fn bad_request(message: impl Into<String>) -> Refusal {
    Refusal::new(400, "bad-request", message)
}

pub fn misdirected(message: impl Into<String>) -> Refusal {
    Refusal::new(421, "misdirected", message)
}
