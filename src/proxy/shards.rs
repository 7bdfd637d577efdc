//! Where accepted connections are served: one single-threaded tokio runtime per core,
//! each connection staying on the shard it was handed to (nginx's workers, pingora's
//! "no steal" runtime), instead of tokio's work-stealing pool.
//!
//! Why: a proxy's request is a chain of short wake-ups (client readable, upstream
//! writable, upstream readable, client writable). On the work-stealing pool each of
//! them can land on another thread, and idle workers spin looking for work and are
//! woken by futex. Measured on the bench machine (HTTP/1.1 keep-alive, 32 connections,
//! latchkey's CPU per request from /proc): 22–24 µs (10–12 user) on the pool against
//! 18.7 µs (8.4–9.8 user) on two shards, 42–44k against 54k req/s in the same runs
//! (docs/performance.md, "Eleventh session").
//!
//! Each accepted connection goes to the first shard unless another has at least two
//! fewer connections at that moment (then to the one with fewest). The proxy port's
//! and transparent listeners' accept loops run on the first shard, so a lightly loaded
//! proxy serves everything on one thread with no hand-off; a connection sent to another shard is taken off the accepting
//! runtime's reactor and registered on the shard's. Whatever a connection spawns (an
//! upstream connection's task, a body drain) runs on its shard too, and the upstream
//! pool keeps each shard's connections apart (`pool::Key`). A connection counts on its
//! shard for as long as its `Seat` lives: the serving closure is handed it and keeps it
//! with the connection's slot, which a CONNECT's tunnel task takes over.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

pub struct Shards {
    shards: Vec<Arc<Shard>>,
}

struct Shard {
    /// What `current()` reads on this shard's thread.
    id: usize,
    handle: Handle,
    /// Connections this shard is serving now.
    live: AtomicUsize,
}

impl Shards {
    /// `n` shards (at least one), each a thread running its own runtime for as long
    /// as the process lives.
    pub fn start(n: usize) -> io::Result<Shards> {
        let mut shards = Vec::with_capacity(n.max(1));
        let first = STARTED.fetch_add(n.max(1), Ordering::Relaxed);
        for i in first..first + n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            std::thread::Builder::new().name(format!("latchkey-shard-{i}")).spawn(move || {
                SHARD.set(i + 1);
                runtime.block_on(heartbeat())
            })?;
            shards.push(Arc::new(Shard { id: i + 1, handle, live: AtomicUsize::new(0) }));
        }
        Ok(Shards { shards })
    }

    /// One shard per core the process may use (`available_parallelism` follows
    /// affinity masks and cgroup quotas).
    pub fn per_core() -> io::Result<Shards> {
        Self::start(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// Run an accept loop on the first shard: a connection `pick` keeps there is
    /// served with no hand-off between threads.
    /// The listener is registered on the shard; aborting the handle closes it.
    pub fn accept_loop<F, Fut>(
        &self,
        listener: TcpListener,
        serve: F,
    ) -> io::Result<JoinHandle<io::Result<()>>>
    where
        F: FnOnce(TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = io::Result<()>> + Send + 'static,
    {
        let listener = listener.into_std()?;
        Ok(self.shards[0].handle.spawn(async move { serve(TcpListener::from_std(listener)?).await }))
    }

    /// Serve `stream` with `serve` on the shard `pick` chooses. `serve` is handed the
    /// connection's `Seat` on that shard, to keep for as long as the connection lives
    /// (a CONNECT's tunnel outlives the task that answered it).
    pub fn serve<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream, Seat) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let shard = self.pick().clone();
        shard.live.fetch_add(1, Ordering::Relaxed);
        let seat = Seat(Some(shard.clone()));
        if shard.id == current() {
            tokio::spawn(serve(stream, seat));
            return;
        }
        // Taken off this runtime's reactor here, registered on the shard's there.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => return tracing::debug!("handing a connection to a shard: {e}"),
        };
        shard.handle.spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream, seat).await,
                Err(e) => tracing::debug!("registering a connection on its shard: {e}"),
            }
        });
    }

    /// The first shard (where the accept loops run) unless another has at least two
    /// connections fewer. A lightly loaded proxy keeps its work on one thread, and a
    /// client's connection that has not quite ended yet does not send its next one
    /// elsewhere (away from the upstream connections its shard pooled).
    fn pick(&self) -> &Arc<Shard> {
        let live = |s: &Arc<Shard>| s.live.load(Ordering::Relaxed);
        let first = &self.shards[0];
        let least = self.shards.iter().min_by_key(|s| live(s)).expect("at least one shard");
        if live(first) <= live(least) + 1 { first } else { least }
    }

    /// Connections each shard is serving now.
    pub fn live(&self) -> Vec<usize> {
        self.shards.iter().map(|s| s.live.load(Ordering::Relaxed)).collect()
    }
}

thread_local! {
    /// 1 + this thread's shard index; 0 off the shards.
    static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Shards started in this process (their ids are 1 to this).
static STARTED: AtomicUsize = AtomicUsize::new(0);

/// What a shard's runtime runs besides its connections: a timer every second, so that
/// the runtime's next planned wake-up is never further off than that. tokio wakes a
/// runtime through its eventfd (a syscall, then one more `epoll_wait`) whenever a timer
/// is set to fire before the wake-up it planned; a new connection's first timers (the
/// CONNECT head's, the handshake's) did that on a shard whose other timers were far
/// off: 0.83 eventfd writes per new connection (`strace -c`, `oha --disable-keepalive`).
async fn heartbeat() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
    }
}

/// The highest shard id in this process: `current()` is between 0 and this.
pub fn count() -> usize {
    STARTED.load(Ordering::Relaxed)
}

/// Which shard this code runs on: 1 + its index, or 0 off the shards (the main
/// runtime, tests).
pub fn current() -> usize {
    SHARD.get()
}

/// Counts a connection against its shard until the task serving it ends.
/// One connection counted on its shard (`Shards::pick` reads the counts) until dropped;
/// `Seat::none()` off the shards.
pub struct Seat(Option<Arc<Shard>>);

impl Seat {
    pub fn none() -> Seat {
        Seat(None)
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Some(shard) = &self.0 {
            shard.live.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_stay_on_the_first_shard_until_another_has_two_fewer() {
        let shards = Shards::start(2).unwrap();
        let main = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        main.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
            let mut clients = Vec::new();
            for _ in 0..4 {
                clients.push(TcpStream::connect(addr).await.unwrap());
                let (stream, _) = listener.accept().await.unwrap();
                let done = done_tx.clone();
                // Served by a task of its own, as a CONNECT's tunnel is: the seat goes
                // with it, and the connection counts until that task ends.
                shards.serve(stream, move |mut stream, seat| async move {
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let _seat = seat;
                        let name = std::thread::current().name().unwrap_or("").to_string();
                        let mut byte = [0u8; 1];
                        // Held open until the client writes: the shard stays busy.
                        let _ = stream.read(&mut byte).await;
                        let _ = stream.write_all(name.as_bytes()).await;
                        let _ = done.send(());
                    });
                });
            }
            // The first shard takes connections until it has two more than the other:
            // [1, 0], [2, 0], [2, 1], [3, 1].
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            assert_eq!(shards.live(), vec![3, 1]);
            let mut names = Vec::new();
            for mut c in clients {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                c.write_all(b"x").await.unwrap();
                let mut name = String::new();
                c.read_to_string(&mut name).await.unwrap();
                names.push(name);
            }
            for _ in 0..4 {
                done_rx.recv().await.unwrap();
            }
            // Served on the shards' own threads: the first three on one, the third
            // client's on the other.
            assert!(names.iter().all(|n| n.starts_with("latchkey-shard-")), "{names:?}");
            assert!(names[0] == names[1] && names[1] == names[3] && names[2] != names[0], "{names:?}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert_eq!(shards.live(), vec![0, 0]);
        });
    }
}
