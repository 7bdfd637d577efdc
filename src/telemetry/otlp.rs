//! OpenTelemetry traces: one span per proxied request, exported with OTLP/HTTP
//! (protobuf) to `[telemetry] otlp_endpoint`. The few messages a trace export needs are
//! encoded here directly (opentelemetry.proto.trace.v1); pulling in the OpenTelemetry SDK
//! and a protobuf toolchain for them would double latchkey's dependency tree.
//!
//! Spans carry no secret: credential headers are exported as `[redacted]`, no query
//! strings, and captured bodies are the redacted bytes the client saw.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

/// Headers whose values are never exported, whatever credential is in play.
const SENSITIVE: [&str; 8] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "private-token",
];

pub const REDACTED: &str = "[redacted]";

pub fn is_sensitive(name: &str) -> bool {
    SENSITIVE.iter().any(|s| name.eq_ignore_ascii_case(s))
}

#[derive(Debug, Clone)]
pub enum Value {
    Str(String),
    Int(i64),
}

#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(String, Value)>,
    pub error: bool,
}

impl Span {
    /// A span that continues the client's trace when it sent a W3C `traceparent`.
    pub fn new(name: String, start: SystemTime, traceparent: Option<&str>) -> Span {
        let mut span_id = [0u8; 8];
        let _ = aws_lc_rs::rand::fill(&mut span_id);
        let (trace_id, parent) = traceparent.and_then(parse_traceparent).map_or_else(
            || {
                let mut t = [0u8; 16];
                let _ = aws_lc_rs::rand::fill(&mut t);
                (t, None)
            },
            |(t, p)| (t, Some(p)),
        );
        Span {
            trace_id,
            span_id,
            parent_span_id: parent,
            name,
            start,
            end: start,
            attributes: Vec::new(),
            error: false,
        }
    }

    pub fn str(&mut self, key: &str, v: impl Into<String>) {
        self.attributes.push((key.to_string(), Value::Str(v.into())));
    }

    pub fn int(&mut self, key: &str, v: i64) {
        self.attributes.push((key.to_string(), Value::Int(v)));
    }
}

/// `00-<32 hex trace id>-<16 hex parent id>-<flags>`.
fn parse_traceparent(v: &str) -> Option<([u8; 16], [u8; 8])> {
    let mut parts = v.trim().split('-');
    let (_version, trace, parent) = (parts.next()?, parts.next()?, parts.next()?);
    let trace: [u8; 16] = hex(trace)?.try_into().ok()?;
    let parent: [u8; 8] = hex(parent)?.try_into().ok()?;
    (trace != [0; 16] && parent != [0; 8]).then_some((trace, parent))
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

// --- protobuf encoding (proto3 wire format) ---

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    tag(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn key_value(key: &str, value: &Value) -> Vec<u8> {
    let mut any = Vec::new();
    match value {
        Value::Str(s) => bytes_field(&mut any, 1, s.as_bytes()),
        Value::Int(i) => {
            tag(&mut any, 3, 0);
            varint(&mut any, *i as u64);
        }
    }
    let mut kv = Vec::new();
    bytes_field(&mut kv, 1, key.as_bytes());
    bytes_field(&mut kv, 2, &any);
    kv
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Span kind CLIENT: the span is latchkey's call to the upstream on the agent's behalf.
const KIND_CLIENT: u64 = 3;

fn span(s: &Span) -> Vec<u8> {
    let mut out = Vec::new();
    bytes_field(&mut out, 1, &s.trace_id);
    bytes_field(&mut out, 2, &s.span_id);
    if let Some(p) = &s.parent_span_id {
        bytes_field(&mut out, 4, p);
    }
    bytes_field(&mut out, 5, s.name.as_bytes());
    tag(&mut out, 6, 0);
    varint(&mut out, KIND_CLIENT);
    fixed64(&mut out, 7, nanos(s.start));
    fixed64(&mut out, 8, nanos(s.end));
    for (k, v) in &s.attributes {
        bytes_field(&mut out, 9, &key_value(k, v));
    }
    let mut status = Vec::new();
    tag(&mut status, 3, 0);
    varint(&mut status, if s.error { 2 } else { 0 });
    bytes_field(&mut out, 15, &status);
    out
}

/// An `ExportTraceServiceRequest` holding `spans` under one resource and scope.
pub fn encode_request(service: &str, spans: &[Span]) -> Vec<u8> {
    let mut resource = Vec::new();
    bytes_field(&mut resource, 1, &key_value("service.name", &Value::Str(service.into())));
    let mut scope = Vec::new();
    bytes_field(&mut scope, 1, b"latchkey");
    bytes_field(&mut scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
    let mut scope_spans = Vec::new();
    bytes_field(&mut scope_spans, 1, &scope);
    for s in spans {
        bytes_field(&mut scope_spans, 2, &span(s));
    }
    let mut resource_spans = Vec::new();
    bytes_field(&mut resource_spans, 1, &resource);
    bytes_field(&mut resource_spans, 2, &scope_spans);
    let mut req = Vec::new();
    bytes_field(&mut req, 1, &resource_spans);
    req
}

// --- export ---

message_error! {
    /// An `otlp_endpoint` latchkey cannot export to: why.
    pub EndpointError
}

/// Spans waiting to be sent; a full queue drops spans rather than slowing requests.
const QUEUE: usize = 4096;
const BATCH: usize = 256;
const EVERY: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub struct Exporter {
    tx: mpsc::Sender<Span>,
}

impl Exporter {
    /// Start the export task (needs a tokio runtime). `endpoint` is the collector's base
    /// URL (`http://host:4318`); spans go to `/v1/traces`.
    pub fn start(endpoint: &str, service: String) -> Result<Exporter, EndpointError> {
        let base = endpoint.trim_end_matches('/');
        let uri: http::Uri =
            format!("{base}/v1/traces").parse().map_err(|e| format!("otlp_endpoint {endpoint:?}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "otlp_endpoint {endpoint:?}: only http:// is supported (a collector on loopback or a sidecar)"
            )
            .into());
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rx, uri, service));
        Ok(Exporter { tx })
    }

    pub fn export(&self, span: Span) {
        let _ = self.tx.try_send(span);
    }
}

async fn run(mut rx: mpsc::Receiver<Span>, uri: http::Uri, service: String) {
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut batch = Vec::new();
    loop {
        let more = tokio::time::timeout(EVERY, rx.recv_many(&mut batch, BATCH)).await;
        if matches!(more, Ok(0)) && batch.is_empty() {
            return; // the proxy is gone
        }
        if batch.is_empty() {
            continue;
        }
        let body = encode_request(&service, &batch);
        batch.clear();
        let req = http::Request::post(uri.clone())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(bytes::Bytes::from(body)));
        let Ok(req) = req else { continue };
        match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => {}
            Ok(Ok(resp)) => tracing::warn!("OTLP export refused: {}", resp.status()),
            Ok(Err(e)) => tracing::warn!("OTLP export failed: {e}"),
            Err(_) => tracing::warn!("OTLP export timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_continued_and_bad_ones_ignored() {
        let (t, p) = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(t[0], 0x4b);
        assert_eq!(p[7], 0xb7);
        assert!(parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        assert!(parse_traceparent("garbage").is_none());
    }

    #[test]
    fn varints_match_the_protobuf_encoding() {
        let mut out = Vec::new();
        varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
    }
}
