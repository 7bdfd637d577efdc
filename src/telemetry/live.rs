//! The live feed (`GET /api/events` on the admin listener): each finished record as one
//! Server-Sent Event (`event: request`, its JSON as data), broadcast to whoever is
//! watching. Nothing is serialised while nobody watches. While someone does, a record
//! is written once, straight into the batch every watcher will get: records that finish
//! within [`BATCH`] of each other go out as one chunk, the same bytes for every watcher
//! (no copy per watcher, no allocation per record). A watcher that falls behind the ring
//! loses its place (and is disconnected by the admin listener) rather than slowing the
//! proxy or holding memory.

use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, broadcast};

use super::Record;

/// Batches kept for watchers that are behind: beyond this (~0.3 s of records), a
/// watcher is dropped. A batch is dropped once every watcher has read it.
pub const RING: usize = 16;

/// After the first record of a quiet spell, wait this long and send everything that came
/// meanwhile as one batch: far below the second SPEC 10 allows, and under load a
/// watcher costs a few wake-ups and writes a second, not one per request.
pub const BATCH: Duration = Duration::from_millis(20);

/// Records written but not yet sent, at most: past this (a runtime too busy to send a
/// batch for a long time) records are left out of the feed rather than held.
const MAX_PENDING: usize = 8 << 20;

pub struct Live(Arc<Shared>);

struct Shared {
    tx: broadcast::Sender<Bytes>,
    /// The batch being written: events, one after another.
    pending: Mutex<Vec<u8>>,
    /// A batch was started: the flusher sends it [`BATCH`] later.
    started: Notify,
    flusher: Once,
}

impl Default for Live {
    fn default() -> Self {
        Live(Arc::new(Shared {
            tx: broadcast::Sender::new(RING),
            pending: Mutex::default(),
            started: Notify::new(),
            flusher: Once::new(),
        }))
    }
}

impl Live {
    pub fn publish(&self, record: &Record) {
        if self.0.tx.receiver_count() == 0 {
            return;
        }
        let mut pending = self.0.pending.lock().unwrap_or_else(|p| p.into_inner());
        let first = pending.is_empty();
        if pending.len() > MAX_PENDING {
            return;
        }
        pending.extend_from_slice(b"event: request\ndata: ");
        record.write_json(&mut pending);
        pending.extend_from_slice(b"\n\n");
        drop(pending);
        if first {
            // A permit is kept if the flusher is not waiting yet: no batch is missed.
            self.0.started.notify_one();
        }
    }

    /// Batches of `request` events, from the next batch sent (which may hold records
    /// finished just before this call). Called on the runtime (the admin
    /// listener), which the flusher is started on with the first watcher.
    pub fn subscribe(&self) -> broadcast::Receiver<Bytes> {
        let rx = self.0.tx.subscribe();
        self.0.flusher.call_once(|| {
            tokio::spawn(flush(self.0.clone()));
        });
        rx
    }

    pub fn watchers(&self) -> usize {
        self.0.tx.receiver_count()
    }
}

/// Send each batch [`BATCH`] after its first record.
async fn flush(shared: Arc<Shared>) {
    loop {
        shared.started.notified().await;
        tokio::time::sleep(BATCH).await;
        let batch = {
            let mut pending = shared.pending.lock().unwrap_or_else(|p| p.into_inner());
            let room = pending.len();
            std::mem::replace(&mut *pending, Vec::with_capacity(room))
        };
        if !batch.is_empty() {
            let _ = shared.tx.send(Bytes::from(batch));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(port: u16) -> Record {
        Record::new("127.0.0.1".parse().unwrap(), "GET".into(), "https", "a.example".into(), port)
    }

    fn event(record: &Record) -> String {
        let mut json = Vec::new();
        record.write_json(&mut json);
        format!("event: request\ndata: {}\n\n", String::from_utf8(json).unwrap())
    }

    /// The next batch; a test fails, not hangs, when none is sent.
    async fn next(rx: &mut broadcast::Receiver<Bytes>) -> Bytes {
        tokio::time::timeout(BATCH * 10, rx.recv()).await.expect("no batch sent").unwrap()
    }

    /// Records that finish close together arrive as one batch, each once and in order,
    /// [`BATCH`] after the first; nothing is written while nobody watches.
    #[tokio::test(start_paused = true)]
    async fn records_arrive_batched_once_each_in_order() {
        let records: Vec<Record> = (1..=5).map(record).collect();
        let live = Live::default();
        live.publish(&records[0]);
        assert!(live.0.pending.lock().unwrap().is_empty(), "written with no watcher");
        let mut rx = live.subscribe();
        let started = tokio::time::Instant::now();
        for r in &records[1..4] {
            live.publish(r);
            tokio::time::sleep(BATCH / 10).await;
        }
        let batch = next(&mut rx).await;
        assert_eq!(started.elapsed(), BATCH, "sent a batch's wait after its first record");
        assert_eq!(String::from_utf8_lossy(&batch), records[1..4].iter().map(event).collect::<String>());
        // The next record starts the next batch.
        live.publish(&records[4]);
        assert_eq!(String::from_utf8_lossy(&next(&mut rx).await), event(&records[4]));
        assert!(rx.try_recv().is_err(), "each record once");
    }
}
