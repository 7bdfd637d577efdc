//! Upstream connections are a budget (invariant 9): one HTTP/2 client connection can
//! carry hundreds of streams, and to an HTTP/1.1-only upstream each stream in flight
//! needs its own upstream connection — a file descriptor. So every upstream connection
//! latchkey opens for requests (pooled, or for a WebSocket upgrade) holds a permit from
//! two budgets, for as long as it stays open:
//!
//! - the client connection's (`[proxy.limits] max_upstream_per_connection`), found
//!   through a task-local the request runs in ([`scope`]);
//! - the process's (`max_upstream_connections`). One eighth of it is kept for client
//!   connections that hold no upstream connection yet, so a client fanning out cannot
//!   take the last ones from everybody else.
//!
//! A request that finds its budget spent waits (for a pooled connection to come free,
//! or a permit) up to `connect_timeout`, then gets 503. Blind tunnels are not counted:
//! each is one upstream connection for one client connection, bounded by the
//! connection limits.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::upstream::UpstreamError;

tokio::task_local! {
    static CONNECTION: ConnBudget;
}

/// One client connection's budget of upstream connections.
#[derive(Clone)]
pub struct ConnBudget {
    sem: Arc<Semaphore>,
    size: usize,
    /// Permits `Budget::room` waited for, kept for the dial that follows it.
    reserved: Arc<std::sync::Mutex<Vec<Permit>>>,
}

impl ConnBudget {
    pub fn new(size: usize) -> ConnBudget {
        let size = size.max(1);
        ConnBudget { sem: Arc::new(Semaphore::new(size)), size, reserved: Arc::default() }
    }

    fn reserved(&self) -> std::sync::MutexGuard<'_, Vec<Permit>> {
        self.reserved.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Upstream connections this client connection holds open.
    fn held(&self) -> usize {
        self.size - self.sem.available_permits()
    }
}

/// Run `f` (one request) on `conn`'s budget.
pub fn scope<F: Future>(conn: ConnBudget, f: F) -> impl Future<Output = F::Output> {
    CONNECTION.scope(conn, f)
}

/// The process-wide budget.
pub struct Budget {
    general: Arc<Semaphore>,
    /// Only for client connections holding no upstream connection yet.
    reserve: Arc<Semaphore>,
}

/// Held by an upstream connection while it is open.
pub struct Permit {
    _total: OwnedSemaphorePermit,
    _connection: Option<OwnedSemaphorePermit>,
}

impl Budget {
    pub fn new(total: usize) -> Arc<Budget> {
        let total = total.max(2);
        let reserve = (total / 8).clamp(1, 256);
        Arc::new(Budget {
            general: Arc::new(Semaphore::new(total - reserve)),
            reserve: Arc::new(Semaphore::new(reserve)),
        })
    }

    /// A permit for one more upstream connection to `host`, waiting up to `wait`.
    pub async fn acquire(&self, host: &str, wait: Duration) -> Result<Permit, UpstreamError> {
        // Read before the first await: the task-local is the requesting connection's.
        let conn = CONNECTION.try_with(ConnBudget::clone).ok();
        if let Some(permit) = conn.as_ref().and_then(|c| c.reserved().pop()) {
            return Ok(permit);
        }
        let busy = |what: &'static str| UpstreamError::Busy { host: host.to_string(), what };
        let connection = match &conn {
            Some(c) => Some(
                tokio::time::timeout(wait, c.sem.clone().acquire_owned())
                    .await
                    .map_err(|_| busy("max_upstream_per_connection"))?
                    .map_err(|_| busy("max_upstream_per_connection"))?,
            ),
            None => None,
        };
        let total = match self.try_total(conn.as_ref().is_some_and(|c| c.held() <= 1)) {
            Some(p) => p,
            None => tokio::time::timeout(wait, self.general.clone().acquire_owned())
                .await
                .map_err(|_| busy("max_upstream_connections"))?
                .map_err(|_| busy("max_upstream_connections"))?,
        };
        Ok(Permit { _total: total, _connection: connection })
    }

    /// A process-wide permit without waiting: a general one, else (for a client
    /// connection's `first` upstream connection) one of the reserve.
    fn try_total(&self, first: bool) -> Option<OwnedSemaphorePermit> {
        let reserve = || first.then(|| self.reserve.clone().try_acquire_owned().ok()).flatten();
        self.general.clone().try_acquire_owned().ok().or_else(reserve)
    }

    /// Take a permit now if there is one, kept for this connection's next `acquire`
    /// (so the dial that follows never waits outside the pool's queue).
    pub fn try_reserve(&self) -> bool {
        let Ok(conn) = CONNECTION.try_with(ConnBudget::clone) else {
            return self.general.available_permits() > 0;
        };
        let Ok(connection) = conn.sem.clone().try_acquire_owned() else { return false };
        let Some(total) = self.try_total(conn.held() <= 1) else { return false };
        conn.reserved().push(Permit { _total: total, _connection: Some(connection) });
        true
    }

    /// Wait up to `wait` for a permit and keep it for this connection's next `acquire`:
    /// the pool waits on this and on a connection coming free at once, then dials. (A
    /// permit taken and let go here would look free to every other request for a moment,
    /// and the one that took it would then wait outside the pool's queue.)
    pub async fn room(&self, host: &str, wait: Duration) -> Result<(), UpstreamError> {
        let permit = self.acquire(host, wait).await?;
        // Without a client connection (no scope) there is nowhere to keep it.
        let _ = CONNECTION.try_with(|c| c.reserved().push(permit));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn a_connection_stops_at_its_own_budget_and_others_go_on() {
        let budget = Budget::new(100);
        let a = ConnBudget::new(2);
        let held: Vec<Permit> = scope(a.clone(), async {
            vec![budget.acquire("h", WAIT).await.unwrap(), budget.acquire("h", WAIT).await.unwrap()]
        })
        .await;
        let third = scope(a.clone(), budget.acquire("h", WAIT)).await;
        assert!(matches!(third, Err(UpstreamError::Busy { what: "max_upstream_per_connection", .. })));
        assert!(scope(ConnBudget::new(2), budget.acquire("h", WAIT)).await.is_ok(), "another connection");
        drop(held);
        assert!(scope(a, budget.acquire("h", WAIT)).await.is_ok(), "freed permits come back");
    }

    #[tokio::test]
    async fn the_reserve_is_for_a_connection_s_first_upstream() {
        let budget = Budget::new(16); // 14 general, 2 reserved
        let greedy = ConnBudget::new(64);
        let mut held = Vec::new();
        while let Ok(p) = scope(greedy.clone(), budget.acquire("h", WAIT)).await {
            held.push(p);
        }
        assert_eq!(held.len(), 14, "the greedy connection never gets the reserve");
        let newcomer = ConnBudget::new(64);
        let first = scope(newcomer.clone(), budget.acquire("h", WAIT)).await;
        assert!(first.is_ok(), "a connection's first upstream comes from the reserve");
        let second = scope(newcomer, budget.acquire("h", WAIT)).await;
        assert!(matches!(second, Err(UpstreamError::Busy { what: "max_upstream_connections", .. })));
    }
}
