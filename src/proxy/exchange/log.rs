//! Phases "admit" and "log": an exchange is counted in flight and its record and span
//! begun when the request arrives; it is written once — when the response body ends,
//! with the bytes, duration and LLM usage that passed, or at once for a refusal or an
//! answer latchkey wrote itself.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use http::Response;
use http::header;
use http::request::Parts;
use http_body_util::BodyExt;

use super::super::body::Logged;
use super::super::respond::{self, Protocol};
use super::super::route::Route;
use super::super::{Body, ExchangeGuard, Generation, Proxy};
use super::Answer;
use crate::config::Config;
use crate::policy::Refusal;
use crate::telemetry::otlp::Span;
use crate::telemetry::record::{self, Path};
use crate::telemetry::usage::Meter;
use crate::telemetry::{Pending, Record, Telemetry};

/// Where a request's body counts the bytes it sends upstream.
pub type UpCount = OnceLock<Arc<AtomicU64>>;

/// One request while it is handled.
pub struct Exchange {
    telemetry: Arc<Telemetry>,
    in_flight: ExchangeGuard,
    pub record: Record,
    span: Option<Span>,
    started: Instant,
    /// How the client reads latchkey's own answers.
    protocol: Protocol,
    /// Request body bytes sent upstream: the counter is made by the first body sent (most
    /// requests have none, and allocate nothing for it).
    pub up: UpCount,
}

impl Exchange {
    /// Phase "admit": the request is in flight (a shutdown waits for it) and recorded.
    pub fn admit(proxy: &Proxy, generation: &Generation, route: &Route, parts: &Parts) -> Exchange {
        let scheme = if route.tls { "https" } else { "http" };
        let method = record::method(&parts.method);
        let mut record =
            Record::new(route.peer.ip(), method, scheme, route.host_text.clone(), route.dest.port);
        record.path = Some(Path::Target(
            parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        ));
        record.agent = route.agent.map(|i| Arc::from(generation.config.agents[i].name.as_str()));
        Exchange {
            span: proxy.telemetry.start_span(&generation.config, parts.method.as_str(), &parts.headers),
            telemetry: proxy.telemetry.clone(),
            in_flight: proxy.exchanges.start(),
            record,
            started: Instant::now(),
            protocol: Protocol::of(&parts.headers),
            up: UpCount::new(),
        }
    }

    /// Phase "log": what the client gets, the record written when it has got it.
    pub fn end(
        mut self,
        answered: Result<Answer, Refusal>,
        config: &Arc<Config>,
        route: &Route,
    ) -> Response<Body> {
        if answered.is_ok() && config.policy.warned(&route.dest) {
            // Let through although unlisted (`on_unlisted = "warn"`): shown as such.
            self.record.decision = "warned";
        }
        match answered {
            Ok(Answer::Forwarded(resp)) => self.streamed(resp, config, route),
            Ok(Answer::Local(resp)) => self.at_once(resp),
            Err(r) => self.refused(&r, route),
        }
    }

    /// The upstream's response: recorded when its body ends, with the usage read from
    /// it (credentialed responses only: those are the metered APIs).
    fn streamed(mut self, resp: Response<Body>, config: &Arc<Config>, route: &Route) -> Response<Body> {
        let (parts, body) = resp.into_parts();
        self.record.status = Some(parts.status.as_u16());
        tracing::debug!(target: "latchkey::request", dest = %route.dest, status = parts.status.as_u16(), decision = self.record.decision, "forwarded");
        let meter = self
            .record
            .credential
            .as_ref()
            .and(parts.headers.get(header::CONTENT_TYPE))
            .and_then(|ct| Meter::for_content_type(ct.to_str().unwrap_or("")));
        let cap = config.telemetry.capture_body_bytes;
        let capture = (self.span.is_some() && cap > 0).then(|| (cap, Vec::new()));
        let pending = Pending {
            telemetry: self.telemetry,
            record: self.record,
            up: self.up.into_inner(),
            down: 0,
            started: self.started,
            upstream: Some(self.started.elapsed()),
            meter,
            span: self.span,
            capture,
            config: config.clone(),
        };
        Response::from_parts(parts, Logged::new(body, pending, self.in_flight).boxed())
    }

    /// An answer latchkey wrote itself.
    fn at_once(mut self, resp: Response<Body>) -> Response<Body> {
        self.record.status = Some(resp.status().as_u16());
        self.record.duration_ms = self.started.elapsed().as_millis() as u64;
        self.telemetry.finish(&self.record, None, self.span);
        resp
    }

    /// A refusal, in the client's protocol, and its `blocked` line.
    fn refused(mut self, r: &Refusal, route: &Route) -> Response<Body> {
        self.record.decision = "blocked";
        self.record.status = Some(r.status());
        self.record.reason = Some(r.message.clone().into());
        self.record.duration_ms = self.started.elapsed().as_millis() as u64;
        self.telemetry.finish(&self.record, None, self.span);
        tracing::info!(target: "latchkey::request", dest = %route.dest, status = r.status(), kind = r.token(), "refused");
        respond::refusal(r, self.protocol)
    }
}
