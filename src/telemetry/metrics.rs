//! Prometheus metrics: one registry owned by the proxy (no global), served on the admin
//! port. Labels stay bounded: credential and agent names come from the config, decisions
//! and status classes are fixed words, hosts never appear, and model names from
//! responses are kept only when short and plain (else `other`). No value here is ever
//! a secret.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use super::record::Record;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub decision: &'static str,
    pub credential: Arc<str>,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabel {
    pub credential: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: &'static str,
    pub credential: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub credential: Arc<str>,
    pub model: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub scope: &'static str,
    pub name: String,
    pub limit: &'static str,
}

/// A shared-state operation (`[cluster]`): admit, spend, revoked...
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

pub struct Metrics {
    /// Tells this registry's series apart in a shard's handles (`Handles`): tests run
    /// several proxies in one process.
    id: u64,
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub upstream_latency: Family<CredentialLabel, Histogram>,
    pub bytes: Family<BytesLabels, Counter>,
    pub connections: Gauge,
    /// Idle HTTP/1.1 connections hyper let go of until the client sends again.
    pub parked: Gauge,
    pub tunnels: Family<KindLabel, Gauge>,
    pub handshakes: Family<ResultLabel, Counter>,
    pub leaf_cache: Family<ResultLabel, Counter>,
    pub reloads: Family<ResultLabel, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub limited: Family<LimitLabels, Counter>,
    /// `[cluster]`: Redis reachable (1) or not (0), its failures, and the requests an
    /// open store served under per-replica limits.
    pub shared: crate::cluster::store::StoreMetrics,
    pub shared_fallback: Counter,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~33 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("latchkey");
        static IDS: AtomicU64 = AtomicU64::new(0);
        let m = Metrics {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            requests: Family::default(),
            upstream_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            bytes: Family::default(),
            connections: Gauge::default(),
            parked: Gauge::default(),
            tunnels: Family::default(),
            handshakes: Family::default(),
            leaf_cache: Family::default(),
            reloads: Family::default(),
            tokens: Family::default(),
            limited: Family::default(),
            shared: Default::default(),
            shared_fallback: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests by decision (injected|passed|tunnelled|blocked), credential and status class",
            m.requests.clone(),
        );
        registry.register(
            "upstream_response_seconds",
            "Time from sending a request upstream to its response head",
            m.upstream_latency.clone(),
        );
        registry.register("bytes", "Body bytes by direction (up|down) and credential", m.bytes.clone());
        registry.register(
            "client_connections",
            "Client connections open on the proxy port",
            m.connections.clone(),
        );
        registry.register(
            "parked_connections",
            "Idle keep-alive HTTP/1.1 connections in intercepted tunnels, parked without their HTTP buffers",
            m.parked.clone(),
        );
        registry.register("tunnels", "CONNECT tunnels open, by kind (intercepted|blind)", m.tunnels.clone());
        registry.register("tls_handshakes", "TLS handshakes with clients, by result", m.handshakes.clone());
        registry.register(
            "leaf_cache",
            "Leaf certificate lookups, by result (hit|miss)",
            m.leaf_cache.clone(),
        );
        registry.register("reloads", "Configuration reloads, by result (ok|failed)", m.reloads.clone());
        registry.register(
            "llm_tokens",
            "LLM tokens reported by upstream responses, by credential, model and kind (input|output)",
            m.tokens.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused with 429, by scope (credential|agent), name and limit",
            m.limited.clone(),
        );
        registry.register("shared_state_up", "[cluster] Redis answers (1) or not (0)", m.shared.up.clone());
        registry.register(
            "shared_state_errors",
            "[cluster] Redis operations that failed or were not tried while it was down, by op",
            m.shared.errors.clone(),
        );
        registry.register(
            "shared_state_fallback",
            "Requests admitted under per-replica limits while Redis was down (on_store_error = \"open\")",
            m.shared_fallback.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Count one finished exchange from its audit record.
    pub fn request(&self, record: &Record, upstream: Option<Duration>) {
        // Names are shared, not copied: counting a request allocates nothing.
        static NONE: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("none"));
        let credential = record.credential.as_ref().unwrap_or(&NONE);
        let status = status_class(record.status);
        HANDLES.with_borrow_mut(|all| {
            let h = Handles::of(all, self, credential);
            if let Some(d) = upstream {
                let labels = || CredentialLabel { credential: credential.clone() };
                let latency =
                    h.latency.get_or_insert_with(|| self.upstream_latency.get_or_create(&labels()).clone());
                latency.observe(d.as_secs_f64());
            }
            for (direction, n, counter) in
                [("up", record.bytes_up, &mut h.up), ("down", record.bytes_down, &mut h.down)]
            {
                if n > 0 {
                    let labels = || BytesLabels { direction, credential: credential.clone() };
                    counter.get_or_insert_with(|| self.bytes.get_or_create(&labels()).clone()).inc_by(n);
                }
            }
            h.requests(self, record.decision, status).inc();
        });
        if let Some(usage) = &record.usage {
            let model = model_label(usage.model.as_deref().unwrap_or(""));
            for (kind, n) in [("input", usage.input_tokens), ("output", usage.output_tokens)] {
                if let Some(n) = n {
                    let labels = TokenLabels { credential: credential.clone(), model: model.clone(), kind };
                    self.tokens.get_or_create(&labels).inc_by(n);
                }
            }
        }
    }
}

thread_local! {
    /// This thread's handles on the series requests are counted in.
    static HANDLES: std::cell::RefCell<Vec<Handles>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One credential's series in one registry, as a shard holds them: found by comparing
/// pointers and fixed words, where a family's `get_or_create` hashes the labels under a
/// lock every shard takes (three times a request, 1.4k instructions). Series are
/// created on first use, as before, so `/metrics` shows only what was counted.
struct Handles {
    metrics: u64,
    credential: Arc<str>,
    latency: Option<Histogram>,
    up: Option<Counter>,
    down: Option<Counter>,
    /// By decision and status class.
    requests: Vec<(&'static str, &'static str, Counter)>,
}

impl Handles {
    /// A reload makes new credential names: at most this many handles are kept, the
    /// stale ones dropped with the rest when there would be more.
    const MOST: usize = 64;

    fn new(metrics: u64, credential: Arc<str>) -> Handles {
        Handles { metrics, credential, latency: None, up: None, down: None, requests: Vec::new() }
    }

    fn of<'a>(all: &'a mut Vec<Handles>, metrics: &Metrics, credential: &Arc<str>) -> &'a mut Handles {
        let found =
            all.iter().position(|h| h.metrics == metrics.id && Arc::ptr_eq(&h.credential, credential));
        let at = found.unwrap_or_else(|| {
            if all.len() >= Self::MOST {
                all.clear();
            }
            all.push(Handles::new(metrics.id, credential.clone()));
            all.len() - 1
        });
        &mut all[at]
    }

    fn requests(&mut self, metrics: &Metrics, decision: &'static str, status: &'static str) -> &Counter {
        let at = match self.requests.iter().position(|(d, s, _)| *d == decision && *s == status) {
            Some(at) => at,
            None => {
                let labels = RequestLabels { decision, credential: self.credential.clone(), status };
                self.requests.push((decision, status, metrics.requests.get_or_create(&labels).clone()));
                self.requests.len() - 1
            }
        };
        &self.requests[at].2
    }
}

fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        _ => "none",
    }
}

/// A model name as a label: kept when short and plain, else `other` (an upstream could
/// otherwise mint unbounded label values).
pub fn model_label(model: &str) -> String {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"-._:/@".contains(&b);
    if model.is_empty() {
        "unknown".into()
    } else if model.len() <= 64 && model.bytes().all(plain) {
        model.to_string()
    } else {
        "other".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(credential: &Arc<str>, decision: &'static str, status: u16, down: u64) -> Record {
        let mut r = Record::new([127, 0, 0, 1].into(), "GET".into(), "https", "a.example".into(), 443);
        (r.credential, r.decision, r.status, r.bytes_down) =
            (Some(credential.clone()), decision, Some(status), down);
        r
    }

    /// Requests counted through a shard's handles land in the registry they were counted
    /// for: two registries in one thread (tests run several proxies), a series made on
    /// first use only, each decision and status class apart, a reloaded credential (a
    /// new shared name) in the same series, and more names than the handles keep.
    #[test]
    fn requests_are_counted_in_their_own_registry() {
        let (a, b) = (Metrics::new(), Metrics::new());
        let key: Arc<str> = "anthropic".into();
        let up = Some(Duration::from_millis(3));
        a.request(&finished(&key, "injected", 200, 10), up);
        a.request(&finished(&key, "injected", 200, 5), up);
        a.request(&finished(&key, "blocked", 403, 0), None);
        b.request(&finished(&key, "injected", 503, 7), up);
        b.request(&finished(&key, "injected", 200, 0), None);
        a.request(&finished(&"anthropic".into(), "injected", 200, 1), None);
        for n in 0..2 * Handles::MOST {
            b.request(&finished(&format!("c{n}").into(), "passed", 200, 0), None);
        }
        HANDLES.with_borrow(|all| assert!(all.len() <= Handles::MOST, "{} handles kept", all.len()));
        let (a, b) = (a.encode(), b.encode());
        let series = |text: &str, name: &str| {
            text.lines().find(|l| l.starts_with(name)).map(|l| l.rsplit(' ').next().unwrap().to_string())
        };
        let requests = |decision: &str, status: &str| {
            format!(
                r#"latchkey_requests_total{{decision="{decision}",credential="anthropic",status="{status}"}}"#
            )
        };
        let down = r#"latchkey_bytes_total{direction="down",credential="anthropic"}"#.to_string();
        let latency = r#"latchkey_upstream_response_seconds_count{credential="anthropic"}"#.to_string();
        for (text, name, want) in [
            (&a, requests("injected", "2xx"), "3"),
            (&a, requests("blocked", "4xx"), "1"),
            (&a, down.clone(), "16"),
            (&a, latency.clone(), "2"),
            (&b, requests("injected", "5xx"), "1"),
            (&b, requests("injected", "2xx"), "1"),
            (&b, down, "7"),
            (&b, latency, "1"),
        ] {
            assert_eq!(series(text, &name).as_deref(), Some(want), "{name}\n{text}");
        }
        assert!(!a.contains(r#"direction="up""#), "no bytes went up: no series\n{a}");
        let passed =
            b.lines().filter(|l| l.starts_with(r#"latchkey_requests_total{decision="passed""#)).count();
        assert_eq!(passed, 2 * Handles::MOST);
    }

    #[test]
    fn model_labels_are_bounded() {
        assert_eq!(model_label("claude-sonnet-4-5-20250929"), "claude-sonnet-4-5-20250929");
        assert_eq!(model_label("gpt-4o"), "gpt-4o");
        assert_eq!(model_label(&"x".repeat(65)), "other");
        assert_eq!(model_label("a\"b"), "other");
        assert_eq!(model_label(""), "unknown");
    }
}
