//! What latchkey tells about the requests it handled: the request log (`audit`), the
//! Prometheus metrics (`metrics`), OpenTelemetry spans (`otlp`) and LLM usage (`usage`).
//! It outlives a config generation. Every finished exchange — forwarded, refused or
//! tunnelled — passes through [`Telemetry::finish`] as one record, so the log, the
//! metrics, the budgets and the traces agree.

pub mod audit;
pub mod live;
pub mod metrics;
pub mod otlp;
mod pending;
pub mod record;
pub mod usage;

pub use pending::Pending;
pub use record::Record;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderMap;

use crate::cluster::limits::SharedLimits;
use crate::cluster::store::Unavailable;
use crate::config::Config;
use crate::limits::{Limiter, Scope};
use crate::policy::{Budgets, Policy, Refusal, RefusalKind};
use audit::Audit;
use metrics::Metrics;
use otlp::{Exporter, REDACTED, Span};

pub struct Telemetry {
    pub audit: Audit,
    pub metrics: Metrics,
    /// Rate-limit and token-budget state: spent here from each finished exchange's
    /// usage, checked by [`Telemetry::admit`] before a request goes out.
    pub limits: Limiter,
    /// `[cluster]`: the same limits kept in Redis for every replica; `limits` then
    /// serves only while Redis is down with `on_store_error = "open"`.
    pub shared: Option<Arc<SharedLimits>>,
    pub spans: Option<Exporter>,
    /// The live view's feed (`GET /api/events`).
    pub live: live::Live,
}

impl Telemetry {
    pub fn new(audit: Audit, spans: Option<Exporter>) -> Telemetry {
        Telemetry {
            audit,
            metrics: Metrics::new(),
            limits: Limiter::default(),
            shared: None,
            spans,
            live: Default::default(),
        }
    }

    /// Record one finished exchange everywhere it is counted.
    pub fn finish(&self, record: &Record, upstream: Option<Duration>, span: Option<Span>) {
        self.audit.log(record);
        self.metrics.request(record, upstream);
        if let Some(tokens) = record.usage.as_ref().map(|u| u.total()).filter(|t| *t > 0) {
            let named = [(Scope::Credential, &record.credential), (Scope::Agent, &record.agent)];
            for (scope, name) in named.iter().filter_map(|(s, n)| n.as_ref().map(|n| (*s, n))) {
                self.limits.spend(scope, name, tokens);
                if let Some(shared) = &self.shared {
                    shared.spend(scope, name, tokens);
                }
            }
        }
        self.live.publish(record);
        if let (Some(exporter), Some(mut span)) = (&self.spans, span) {
            fill_span(&mut span, record);
            exporter.export(span);
        }
    }

    /// A span for a request just received, when spans are exported. Header values are
    /// exported except the sensitive ones and every credential slot, which read
    /// `[redacted]`; any other value still has every live secret masked (an agent
    /// should not hold one, but if it does, the span does not repeat it).
    pub fn start_span(&self, config: &Config, method: &str, headers: &HeaderMap) -> Option<Span> {
        self.spans.as_ref()?;
        let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
        let mut span = Span::new(method.to_string(), SystemTime::now(), traceparent);
        let redactors = all_redactors(config);
        for (name, value) in headers {
            let hidden = otlp::is_sensitive(name.as_str()) || is_credential_slot(config, name.as_str());
            let shown = if hidden {
                REDACTED.to_string()
            } else {
                let mut bytes = value.as_bytes().to_vec();
                for r in &redactors {
                    r.mask(&mut bytes);
                }
                String::from_utf8_lossy(&bytes).into_owned()
            };
            span.str(&format!("http.request.header.{}", name.as_str()), shown);
        }
        Some(span)
    }

    /// Refuse while the request log is required and cannot be written (`[proxy.logging]
    /// on_log_error = "block"`): nothing is served unlogged.
    pub fn log_ready(&self) -> Result<(), Refusal> {
        match self.audit.refusing() {
            false => Ok(()),
            true => Err(Refusal::new(
                RefusalKind::LogUnavailable,
                "the request log cannot be written (disk full or file unwritable); requests are refused until it can ([proxy.logging] on_log_error = \"block\")",
            )
            .retry_after(1)),
        }
    }

    /// Admit a request under the budgets the decision named (its credential's and its
    /// agent's limits): 429 beyond them. With `[cluster]`, in Redis; while it is down,
    /// 503 (`closed`) or this replica's own state (`open`).
    pub async fn admit(&self, policy: &Policy, budgets: Budgets) -> Result<(), Refusal> {
        if budgets.is_empty() {
            return Ok(());
        }
        let credential = budgets.credential.map(|i| &policy.credentials[i]);
        let agent = budgets.agent.map(|i| &policy.agents[i]);
        let checks: Vec<(Scope, &str, crate::limits::Limits)> = credential
            .map(|c| (Scope::Credential, c.name.as_str(), c.limits))
            .into_iter()
            .chain(agent.map(|a| (Scope::Agent, a.name.as_str(), a.limits)))
            .collect();
        let admitted = match &self.shared {
            None => self.limits.admit(&checks),
            // Boxed: a round trip to the shared store would otherwise size the future
            // of every request, clustered or not.
            Some(shared) => match Box::pin(shared.admit(&checks)).await {
                Ok(answer) => answer,
                Err(Unavailable) if shared.store().fails_open() => {
                    self.metrics.shared_fallback.inc();
                    self.limits.admit(&checks)
                }
                Err(Unavailable) => return Err(shared_unavailable(shared.store())),
            },
        };
        admitted.map_err(|e| {
            self.metrics
                .limited
                .get_or_create(&metrics::LimitLabels {
                    scope: e.scope.as_str(),
                    name: e.name.clone(),
                    limit: e.limit,
                })
                .inc();
            Refusal::new(
                RefusalKind::RateLimited,
                format!(
                    "{} {} is over its {} limit; retry in {}s",
                    e.scope.as_str(),
                    e.name,
                    e.limit,
                    e.retry_after_secs
                ),
            )
            .retry_after(e.retry_after_secs)
        })
    }
}

/// 503: the request needs shared state Redis holds, and Redis does not answer.
fn shared_unavailable(store: &crate::cluster::store::Store) -> Refusal {
    Refusal::new(
        RefusalKind::SharedState,
        format!(
            "shared state unavailable: the rate limits and budgets are kept in Redis at {}, which does not answer; nothing was sent, retry shortly",
            store.server()
        ),
    )
    .retry_after(1)
}

/// The redactors of every credential (only used when spans are exported).
pub fn all_redactors(config: &Config) -> Vec<std::sync::Arc<crate::redact::Redactor>> {
    config.credentials.iter().filter_map(|c| c.redactor.get(|out| c.injector.secrets(out))).collect()
}

fn is_credential_slot(config: &Config, name: &str) -> bool {
    config.credentials.iter().any(|c| c.slot_headers.iter().any(|h| h.as_str().eq_ignore_ascii_case(name)))
}

fn fill_span(span: &mut Span, r: &Record) {
    span.end = SystemTime::now();
    span.str("http.request.method", r.method.clone());
    span.str("server.address", &*r.host);
    span.int("server.port", i64::from(r.port));
    span.str("url.scheme", r.scheme);
    if let Some(p) = &r.path {
        span.str("url.path", p.as_str());
    }
    if let Some(s) = r.status {
        span.int("http.response.status_code", i64::from(s));
        span.error = s >= 500;
    }
    span.str("latchkey.decision", r.decision);
    if let Some(c) = &r.credential {
        span.str("latchkey.credential", &**c);
    }
    if let Some(a) = &r.agent {
        span.str("latchkey.agent", &**a);
    }
    if let Some(why) = &r.reason {
        span.str("latchkey.reason", why.clone());
    }
    if let Some(d) = &r.dlp {
        span.str("latchkey.dlp.action", d.action);
        span.str("latchkey.dlp.rules", d.rules_text());
    }
    span.int("latchkey.bytes_up", r.bytes_up as i64);
    span.int("latchkey.bytes_down", r.bytes_down as i64);
    if let Some(u) = &r.usage {
        if let Some(m) = &u.model {
            span.str("gen_ai.response.model", m.clone());
        }
        if let Some(n) = u.input_tokens {
            span.int("gen_ai.usage.input_tokens", n as i64);
        }
        if let Some(n) = u.output_tokens {
            span.int("gen_ai.usage.output_tokens", n as i64);
        }
    }
}
