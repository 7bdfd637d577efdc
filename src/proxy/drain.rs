//! Requests in flight, so a shutdown can wait for them to finish.

use std::sync::Arc;
use std::time::Duration;

const FLUSH: Duration = Duration::from_millis(250);

/// Requests in flight (until their response body ends), so shutdown can wait for them.
#[derive(Default)]
pub struct Exchanges {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One request in flight; dropping it ends the exchange.
pub struct ExchangeGuard(Arc<Exchanges>);

impl Exchanges {
    pub fn start(self: &Arc<Self>) -> ExchangeGuard {
        self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ExchangeGuard(self.clone())
    }

    /// Wait until no request is in flight, or `grace` has passed. True when drained.
    pub async fn drained(&self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let notified = self.idle.notified();
            if self.count.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                // An exchange ends when its last frame is read; give the connection a
                // moment to write it out before the process goes.
                tokio::time::sleep(FLUSH.min(deadline - tokio::time::Instant::now())).await;
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }
}

impl Drop for ExchangeGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
