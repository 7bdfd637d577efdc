//! State shared by replicas (SPEC 12): `[cluster] redis = "redis://..."`. Rate limits,
//! token budgets, approvals and token revocations live in Redis, so N replicas behind
//! one Service enforce one limit, and a request held on one replica is answered on any.
//!
//! - `store`: the one connection (redis-rs `ConnectionManager`: multiplexed, so
//!   concurrent requests share it and are pipelined; it reconnects by itself), a time
//!   limit on every operation, and the up/down state with its metric and log lines.
//! - `limits`: admission under `requests_per_minute` and `tokens_per_day` by a Lua
//!   script (atomic: replicas never over-admit), with permits taken in small batches
//!   for high limits; LLM tokens spent are added when a response ends.
//! - `approvals`: pending approvals (one per destination across replicas, expiring at
//!   its deadline) and the answers given (`run`, `always`), by Lua scripts; answers
//!   given elsewhere reach a replica's held requests by polling.
//! - `revoked`: token revocation ids, written by `latchkey token revoke`, polled by
//!   every replica into its token state.
//!
//! Nothing here decides: the decision names the budgets (`policy`), the runtime asks
//! this module whether they admit one more request.

pub mod approvals;
pub mod limits;
pub mod revoked;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use crate::telemetry::metrics::Metrics;
use crate::token::state::TokenState;

/// Connect a starting proxy to the shared state: the store (lazily: Redis may come
/// later), the shared limits, and the revocation set kept in `tokens`.
pub fn join(
    settings: &ClusterSettings,
    metrics: &Metrics,
    tokens: &Arc<TokenState>,
) -> Result<Arc<limits::SharedLimits>, store::StoreError> {
    let store = Arc::new(store::Store::open(settings, metrics.shared.clone())?);
    tracing::info!(
        "shared state in Redis at {} (on_store_error = {:?})",
        store.server(),
        settings.on_store_error
    );
    revoked::watch(store.clone(), tokens);
    Ok(Arc::new(limits::SharedLimits::new(store)))
}

/// What to do with a request that needs shared state while Redis is unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStoreError {
    /// 503 `shared state unavailable` (the default: N replicas never over-admit).
    Closed,
    /// Served under this replica's own limits until Redis answers again.
    Open,
}

/// `[cluster]`, compiled.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// The Redis URL (may hold a password: never logged; see [`ClusterSettings::server`]).
    url: String,
    pub on_store_error: OnStoreError,
    /// Each Redis operation's limit; beyond it Redis counts as unreachable.
    pub timeout: Duration,
    pub key_prefix: String,
}

impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSettings")
            .field("server", &self.server())
            .field("on_store_error", &self.on_store_error)
            .field("timeout", &self.timeout)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// A bad `[cluster]` key.
#[derive(Debug)]
pub struct BadKey {
    pub key: &'static str,
    pub message: String,
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);

impl ClusterSettings {
    /// Check `[cluster]`'s values. `redis = "${VAR}"` reads the URL from the
    /// environment (it may carry a password).
    pub fn parse(
        redis: &str,
        on_store_error: Option<&str>,
        timeout_ms: Option<u64>,
        key_prefix: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ClusterSettings, BadKey> {
        let bad = |key, message: String| BadKey { key, message };
        let url = match redis.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
            Some(var) => env(var).ok_or_else(|| bad("redis", format!("${{{var}}} is not set")))?,
            None => redis.to_string(),
        };
        check_url(&url).map_err(|m| bad("redis", m))?;
        let on_store_error = match on_store_error.unwrap_or("closed") {
            "closed" => OnStoreError::Closed,
            "open" => OnStoreError::Open,
            other => return Err(bad("on_store_error", format!("{other:?} is not \"closed\" or \"open\""))),
        };
        let timeout = match timeout_ms {
            None => DEFAULT_TIMEOUT,
            Some(0) => return Err(bad("timeout_ms", "must be at least 1".into())),
            Some(ms) => Duration::from_millis(ms),
        };
        let key_prefix = key_prefix.unwrap_or("latchkey").to_string();
        if key_prefix.is_empty()
            || key_prefix.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(bad("key_prefix", format!("{key_prefix:?}: use a short word without spaces")));
        }
        Ok(ClusterSettings { url, on_store_error, timeout, key_prefix })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server as it may be logged: host and port (or socket path), never a password.
    pub fn server(&self) -> String {
        use redis::IntoConnectionInfo;
        match self.url.as_str().into_connection_info().map(|i| i.addr().clone()) {
            Ok(redis::ConnectionAddr::Tcp(host, port)) => format!("{host}:{port}"),
            Ok(redis::ConnectionAddr::Unix(path)) => path.display().to_string(),
            Ok(other) => other.to_string(),
            Err(_) => "(invalid URL)".into(),
        }
    }
}

fn check_url(url: &str) -> Result<(), String> {
    use redis::IntoConnectionInfo;
    if url.starts_with("rediss://") {
        return Err("rediss:// (TLS to Redis) is not supported by this build; use redis:// on a private network or a TLS sidecar".into());
    }
    url.into_connection_info().map(|_| ()).map_err(|e| format!("not a Redis URL (redis://HOST:6379/0): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<ClusterSettings, BadKey> {
        ClusterSettings::parse(url, None, None, None, &|v| (v == "R").then(|| "redis://:pw@h:7/1".into()))
    }

    #[test]
    fn urls_and_secrets() {
        let s = parse("redis://127.0.0.1:6390/0").unwrap();
        assert_eq!(
            (s.server().as_str(), s.on_store_error, s.timeout),
            ("127.0.0.1:6390", OnStoreError::Closed, DEFAULT_TIMEOUT)
        );
        let s = parse("${R}").unwrap();
        assert_eq!(s.url(), "redis://:pw@h:7/1");
        assert!(!format!("{s:?}").contains("pw"), "the password is never shown");
        assert_eq!(parse("${NOPE}").unwrap_err().key, "redis");
        assert!(parse("http://x").is_err());
        assert!(parse("rediss://x").unwrap_err().message.contains("TLS"));
        let e = ClusterSettings::parse("redis://h", Some("maybe"), None, None, &|_| None).unwrap_err();
        assert_eq!(e.key, "on_store_error");
    }
}
