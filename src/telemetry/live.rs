//! The live feed (`GET /api/events` on the admin listener): each finished record as one
//! Server-Sent Event (`event: request`, its JSON as data), broadcast to whoever is
//! watching. Nothing is serialised while nobody watches, and a record is serialised
//! once, straight into the event, however many watch; a watcher that falls behind the
//! ring loses its place (and is disconnected by the admin listener) rather than slowing
//! the proxy or holding memory.

use bytes::Bytes;
use tokio::sync::broadcast;

use super::Record;

/// Records kept for watchers that are behind: beyond this, a watcher is dropped.
pub const RING: usize = 1024;

/// A record's event is about this long; sized once, it is not grown as it is written.
const EVENT_CAPACITY: usize = 640;

pub struct Live {
    tx: broadcast::Sender<Bytes>,
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
        let mut event = Vec::with_capacity(EVENT_CAPACITY);
        event.extend_from_slice(b"event: request\ndata: ");
        record.write_json(&mut event);
        event.extend_from_slice(b"\n\n");
        let _ = self.tx.send(Bytes::from(event));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Bytes> {
        self.tx.subscribe()
    }

    pub fn watchers(&self) -> usize {
        self.tx.receiver_count()
    }
}
