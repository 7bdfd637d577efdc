//! The live feed (`GET /api/events` on the admin listener): each finished record as one
//! JSON text, broadcast to whoever is watching. Nothing is serialised while nobody
//! watches; a watcher that falls behind the ring loses its place (and is disconnected
//! by the admin listener) rather than slowing the proxy or holding memory.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::Record;

/// Records kept for watchers that are behind: beyond this, a watcher is dropped.
pub const RING: usize = 1024;

pub struct Live {
    tx: broadcast::Sender<Arc<str>>,
}

impl Default for Live {
    fn default() -> Self {
        Live { tx: broadcast::Sender::new(RING) }
    }
}

impl Live {
    pub fn publish(&self, record: &Record) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        if let Ok(text) = serde_json::to_string(record) {
            let _ = self.tx.send(text.into());
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.tx.subscribe()
    }

    pub fn watchers(&self) -> usize {
        self.tx.receiver_count()
    }
}
