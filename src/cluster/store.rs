//! The connection to Redis and whether it is up.
//!
//! One redis-rs `ConnectionManager`: a single multiplexed connection, so concurrent
//! requests' commands are pipelined on it, and it reconnects by itself after Redis
//! comes back. Every operation has a time limit (`[cluster] timeout_ms`). After a
//! failure the store is *down*: operations fail at once without touching the network,
//! except one probe every [`RETRY`], whose success puts it back *up* — so shared
//! enforcement resumes without a restart, and an outage costs requests nothing but
//! the answer. Each transition writes one log line and sets the
//! `latchkey_shared_state_up` gauge; each failure counts in
//! `latchkey_shared_state_errors_total{op}`.

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{ClusterSettings, OnStoreError};
use crate::telemetry::metrics::OpLabel;

/// While down, how often one operation may try Redis again.
pub const RETRY: Duration = Duration::from_millis(500);

/// Redis did not answer (or answered with an error): the state it holds is unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable;

/// Handles on the metrics the store keeps (registered by `telemetry::metrics`).
#[derive(Clone, Default)]
pub struct StoreMetrics {
    pub up: Gauge,
    pub errors: Family<OpLabel, Counter>,
}

pub struct Store {
    manager: ConnectionManager,
    settings: ClusterSettings,
    server: String,
    up: AtomicBool,
    /// While down: the earliest moment the next probe may go out.
    retry_at: Mutex<Instant>,
    metrics: StoreMetrics,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("server", &self.server).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("[cluster] redis: {0}")]
pub struct StoreError(String);

impl Store {
    /// A store for `settings`, connecting lazily: Redis need not be up when latchkey
    /// starts (requests needing it are handled as in an outage until it is). Must run
    /// inside the tokio runtime.
    pub fn open(settings: &ClusterSettings, metrics: StoreMetrics) -> Result<Store, StoreError> {
        let client = redis::Client::open(settings.url()).map_err(|e| StoreError(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(RETRY);
        let manager =
            ConnectionManager::new_lazy_with_config(client, config).map_err(|e| StoreError(e.to_string()))?;
        // Up until shown otherwise: the first operation connects.
        metrics.up.set(1);
        Ok(Store {
            manager,
            server: settings.server(),
            settings: settings.clone(),
            up: AtomicBool::new(true),
            retry_at: Mutex::new(Instant::now()),
            metrics,
        })
    }

    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// `host:port` of the Redis server, for messages.
    pub fn server(&self) -> &str {
        &self.server
    }

    pub fn fails_open(&self) -> bool {
        self.settings.on_store_error == OnStoreError::Open
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// A key under `[cluster] key_prefix`: `PREFIX:a:b:c`.
    pub fn key(&self, parts: &[&str]) -> String {
        let mut k = self.settings.key_prefix.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    /// Run one operation (`op` names it in the metric) on the shared connection,
    /// within the time limit; while down, only the probe runs.
    pub async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.may_try() {
            self.metrics.errors.get_or_create(&OpLabel { op }).inc();
            return Err(Unavailable);
        }
        match tokio::time::timeout(self.settings.timeout, f(self.manager.clone())).await {
            Ok(Ok(v)) => {
                self.mark_up();
                Ok(v)
            }
            Ok(Err(e)) => Err(self.mark_down(op, &e.to_string())),
            Err(_) => Err(self.mark_down(op, &format!("no answer within {:?}", self.settings.timeout))),
        }
    }

    fn may_try(&self) -> bool {
        if self.is_up() {
            return true;
        }
        let mut at = self.retry_at.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now < *at {
            return false;
        }
        *at = now + RETRY;
        true
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            self.metrics.up.set(1);
            tracing::warn!(
                "shared state: Redis at {} answers again; shared limits are enforced again",
                self.server
            );
        }
    }

    fn mark_down(&self, op: &'static str, why: &str) -> Unavailable {
        self.metrics.errors.get_or_create(&OpLabel { op }).inc();
        *self.retry_at.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now() + RETRY;
        if self.up.swap(false, Ordering::Relaxed) {
            self.metrics.up.set(0);
            let then = match self.settings.on_store_error {
                OnStoreError::Closed => {
                    "requests that need it (shared limits, approvals) get 503 (on_store_error = \"closed\")"
                }
                OnStoreError::Open => {
                    "each replica enforces limits and asks for approvals on its own (on_store_error = \"open\")"
                }
            };
            tracing::error!("shared state unavailable: Redis at {} ({op}): {why}; {then}", self.server);
        }
        Unavailable
    }
}
