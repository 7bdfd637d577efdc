//! Requests in flight, so a shutdown can wait for them to finish.

use std::sync::Arc;
use std::time::Duration;

const FLUSH: Duration = Duration::from_millis(250);

/// Requests in flight (until their response body ends), so shutdown can wait for them.
#[derive(Default)]
pub struct Exchanges {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
    /// Set when the drain begins: new requests are refused from then on.
    closing: std::sync::atomic::AtomicBool,
}

/// One request in flight; dropping it ends the exchange.
pub struct ExchangeGuard(Arc<Exchanges>);

impl Exchanges {
    pub fn start(self: &Arc<Self>) -> ExchangeGuard {
        self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ExchangeGuard(self.clone())
    }

    /// Whether the drain has begun: a request arriving now is refused
    /// (`RefusalKind::ShuttingDown`), so that none is answered after the log's last flush.
    pub fn closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Take no new request; wait until none is in flight, or `grace` has passed. True
    /// when drained.
    pub async fn drained(&self, grace: Duration) -> bool {
        self.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let notified = self.idle.notified();
            if self.count.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                // An exchange ends when its last frame is read; give the connection a
                // moment to write it out before the process goes. One admitted just
                // before the drain began may have started meanwhile: waited for too.
                tokio::time::sleep(FLUSH.min(deadline - tokio::time::Instant::now())).await;
                if self.count.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                    return true;
                }
                continue;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A request admitted just as the drain began (it passed the `closing` check first)
    /// is waited for, even when it starts during the last flush pause: the process must
    /// not exit between its answer and its log line.
    #[tokio::test(start_paused = true)]
    async fn an_exchange_begun_during_the_flush_pause_is_waited_for() {
        let exchanges = Arc::new(Exchanges::default());
        let draining = tokio::spawn({
            let exchanges = exchanges.clone();
            async move { exchanges.drained(Duration::from_secs(10)).await }
        });
        tokio::task::yield_now().await;
        assert!(exchanges.closing(), "new requests are refused from the drain's start");
        let late = exchanges.start();
        tokio::time::sleep(FLUSH * 2).await;
        assert!(!draining.is_finished(), "exited with a request in flight");
        drop(late);
        assert!(draining.await.unwrap());
    }
}
