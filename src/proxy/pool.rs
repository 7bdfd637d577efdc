//! latchkey's own upstream connection pool: HTTP/1.1 connections for the own client
//! (`client`), HTTP/2 ones for the own h2 leg (`h2_client`).
//!
//! It replaces hyper-util's legacy `Client`, which per request built a `String` pool key,
//! raced a boxed checkout against a lazy connect, and for HTTP/1.1 spawned a task that
//! waited for the connection to become idle again before returning it (issue 20,
//! docs/performance.md). Here a request takes an idle connection under one short lock,
//! and its response body puts the connection back when it has been read to its end —
//! no task, no key text. What stays the same: the pool key is the request URI's scheme
//! and authority, which is always latchkey's normalised destination (no connection is
//! shared across hosts); an h2 connection is shared by every concurrent request to its
//! destination; a request that could not even be written on a reused connection (the
//! upstream closed it while idle) is sent again on another; idle connections close after
//! `IDLE_TIMEOUT`, at most `MAX_IDLE_PER_HOST` are kept per destination.
//!
//! An HTTP/1.1 connection is driven by latchkey's own client, in the request's task: a
//! request without a body, with one of known length, or chunked (a body of unknown
//! length), in absolute form to the corporate proxy (every request reaches the pool as
//! HTTP/1.1: `exchange::upstream_request`). Until the thirteenth session hyper's client
//! took the corporate proxy's and a `Content-Length` the body did not match (now
//! refused: the head must say what the body is), and nothing bounded an upload there
//! that the upstream answered and stopped reading.
//!
//! A request that finds no idle connection dials a new one. At a cap of upstream
//! connections (`fanout`) it queues instead, for a connection another response frees or
//! room for a new one, whichever comes first, up to `connect_timeout`: requests take
//! turns on the connections there are instead of being refused (SPEC 8: 10,000 client
//! connections over a bounded number of upstream ones).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, header};
use tokio::sync::{oneshot, watch};

use super::Body;
use super::client;
use super::h2_client;
use super::upstream::{Dialer, UpstreamError};
use crate::policy::Destination;

const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const MAX_IDLE_PER_HOST: usize = 64;

/// Why a request could not be sent upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    #[error("{0}")]
    Own(#[from] client::Error),
    #[error("{0}")]
    H2(#[source] super::BoxError),
    #[error("the request URI names no destination")]
    NoDestination,
    #[error("the request's Content-Length ({0}) is not its body's length ({1})")]
    Mismatch(String, u64),
}

/// An idle HTTP/1.1 connection.
type Idle = client::Conn;

/// An HTTP/1.1 connection handed from a finished response to a waiting request, with
/// whether it goes to the corporate proxy.
type Handed = (Idle, bool);

/// A request waiting for a connection to come free, and since when.
struct Waiter {
    since: Instant,
    tx: oneshot::Sender<Handed>,
}

/// Connections to one scheme + authority.
#[derive(Default)]
struct Host {
    idle: Vec<(Idle, Instant)>,
    /// Requests that found no idle connection, oldest first; a connection coming free
    /// goes to the longest waiting (on any shard) rather than to `idle`.
    waiters: VecDeque<Waiter>,
    /// How long `waiters` may grow before those gone are cleared out: twice what was
    /// left the last time, so that 5,000 requests waiting are not looked through again
    /// for each one that joins them.
    purge_at: usize,
    /// The destination's h2 connection, shared.
    h2: Option<h2_client::Conn>,
    /// An h2 connection has been made here (the destination speaks h2).
    spoke_h2: bool,
    /// An h2 connection being dialled, to a destination known to speak h2: requests
    /// arriving meanwhile wait for it instead of each dialling their own.
    h2_dialing: Option<watch::Receiver<bool>>,
    /// Plain HTTP through the corporate proxy: every connection here goes to it (the
    /// pool lives as long as the config that says so).
    proxied: bool,
}

/// What a connection is pooled under: TLS or not, the destination's authority as
/// latchkey wrote it, and the shard asking (`shards::current`: a connection is used
/// on the runtime whose reactor it is registered with, no wake-up crossing threads).
/// Compared and hashed as its bytes (`Authority`'s own `Hash` feeds one lowercased
/// byte at a time: ~1k instructions a request over two lookups); an authority spelt
/// in another case would only be pooled apart.
#[derive(Clone)]
struct Key(bool, Authority, usize);

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.0 == other.0 && self.2 == other.2 && self.1.as_str() == other.1.as_str()
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u8(self.0 as u8);
        state.write_usize(self.2);
        state.write(self.1.as_str().as_bytes());
    }
}

/// Every destination's connections and waiters. Hashed with foldhash, not SipHash: the
/// map is looked up twice a request (checkout, put back) and its keys are destinations
/// the policy let through, a handful per process.
type Hosts = HashMap<Key, Host, foldhash::fast::RandomState>;

struct Inner {
    dialer: Arc<Dialer>,
    /// Offer HTTP/1.1 only by ALPN (the pool for HTTP/1.1 clients).
    h1_only: bool,
    hosts: Mutex<Hosts>,
    /// Requests waiting in every `Host::waiters` (changed under `hosts`): when none
    /// is, a connection coming free skips looking for one on the other shards.
    queued: AtomicUsize,
}

/// One pool: per config generation, per dialer, per client protocol.
#[derive(Clone)]
pub struct Pool(Arc<Inner>);

/// What a request is sent on.
enum Conn {
    H2(h2_client::Conn),
    /// An HTTP/1.1 connection; `true` when it goes to the corporate proxy (`[upstream]
    /// proxy`), which takes requests in absolute form.
    Own(client::Conn, bool),
}

impl Pool {
    pub fn new(dialer: Arc<Dialer>, h1_only: bool) -> Pool {
        let inner = Arc::new(Inner { dialer, h1_only, hosts: Mutex::default(), queued: AtomicUsize::new(0) });
        reap_idle(Arc::downgrade(&inner));
        Pool(inner)
    }

    /// Send `req` (an absolute URI) upstream; its response body returns the connection.
    /// Boxed: callers' futures must be `Send`, and the compiler cannot prove it through
    /// hyper's generic body bounds (a higher-ranked `From` for the error type) unboxed.
    /// An async block, not an `async fn`: the block holds `req` once, where an `async
    /// fn`'s future would keep it as passed and again as moved into its body.
    pub fn request(
        &self,
        mut req: Request<Body>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, SendError>> + Send + '_>>
    {
        Box::pin(async move {
            let tls = req.uri().scheme() == Some(&Scheme::HTTPS);
            let authority = req.uri().authority().cloned().ok_or(SendError::NoDestination)?;
            let key = Key(tls, authority, super::shards::current());
            let framing = framing(&req)?;
            let mut refusals = 0;
            loop {
                let (conn, reused) = match self.checkout(&key).await {
                    Some(conn) => (conn, true),
                    None => {
                        if let Some(mut dialing) = self.h2_dialing(&key) {
                            // Ready or failed (the sender dropped): look again.
                            let _ = dialing.wait_for(|ready| *ready).await;
                            continue;
                        }
                        match self.dial(&key).await? {
                            Some(got) => got,
                            None => continue,
                        }
                    }
                };
                match conn {
                    Conn::Own(conn, proxied) => {
                        match self.send_own(conn, proxied, &key, &mut req, framing).await {
                            Ok(resp) => return Ok(resp),
                            // Nothing came back on a connection idle before: the upstream closed
                            // it as the request went out. Sent again only when that is harmless
                            // (and there is no body, which is gone once read).
                            Err(f)
                                if f.unanswered
                                    && reused
                                    && framing == Framing::Length(0)
                                    && req.method().is_idempotent() =>
                            {
                                continue;
                            }
                            Err(f) => return Err(f.error.into()),
                        }
                    }
                    // Boxed: inline, an h2 stream's state would size every HTTP/1.1 send too,
                    // past what malloc serves from its per-thread cache.
                    Conn::H2(h2) => match Box::pin(h2.send(req, self.0.dialer.timeout)).await {
                        Ok(resp) => return Ok(resp),
                        // Not sent: the connection takes no new stream (closed while idle).
                        Err(h2_client::Failed::Unsent(again)) if reused => req = *again,
                        // Refused unprocessed: again, on another connection, twice at most.
                        Err(h2_client::Failed::Refused(again)) if refusals < 2 => {
                            refusals += 1;
                            req = *again;
                        }
                        Err(h2_client::Failed::Refused(_)) => {
                            return Err(SendError::H2("the upstream refused the request's stream".into()));
                        }
                        Err(h2_client::Failed::Unsent(_)) => {
                            return Err(SendError::H2("the upstream h2 connection closed".into()));
                        }
                        Err(h2_client::Failed::Error(e)) => return Err(SendError::H2(e)),
                    },
                }
            }
        })
    }

    /// Send a request on the own client, in this task: no body (`Length(0)`), or a body
    /// framed as `framing` says, which is taken out of `req`.
    ///
    /// The head is written before the future is made: the future holds the connection
    /// and the upload, not the request as well.
    fn send_own(
        &self,
        mut conn: client::Conn,
        proxied: bool,
        key: &Key,
        req: &mut Request<Body>,
        framing: Framing,
    ) -> impl std::future::Future<Output = Result<Response<Body>, client::Failed>> + Send + use<> {
        let headers = req.headers_mut();
        let body = match framing {
            Framing::Length(0) => None,
            Framing::Length(length) => {
                headers.entry(header::CONTENT_LENGTH).or_insert_with(|| HeaderValue::from(length));
                Some(std::mem::take(req.body_mut()))
            }
            Framing::Chunked => {
                headers.remove(header::CONTENT_LENGTH);
                headers.entry(header::TRANSFER_ENCODING).or_insert(HeaderValue::from_static("chunked"));
                Some(std::mem::take(req.body_mut()))
            }
        };
        let absolute;
        let target = match proxied {
            true => {
                absolute = req.uri().to_string();
                &absolute
            }
            false => req.uri().path_and_query().map_or("/", |pq| pq.as_str()),
        };
        // Room for a small body as well: it joins the head in the same write (`Upload`).
        let body_room = match framing {
            Framing::Length(length) => length.min(16 * 1024) as usize,
            Framing::Chunked => 0,
        };
        let mut head = Vec::with_capacity(256 + body_room);
        let host = missing_host(req);
        client::codec::encode_head(req.method(), target, host, req.headers(), &mut head);
        let mut upload = match framing {
            Framing::Length(length) => client::Upload::new(head, body, length),
            Framing::Chunked => client::Upload::chunked(
                head,
                body.unwrap_or_default(),
                client::declared_trailers(req.headers()),
            ),
        };
        let head_request = req.method() == http::Method::HEAD;
        let home = OwnHome { pool: Arc::downgrade(&self.0), key: key.clone() };
        let timeout = self.0.dialer.timeout;
        async move {
            let head = conn.exchange(&mut upload, head_request).await?;
            Ok(client::response(conn, head, upload, home, timeout))
        }
    }

    /// The destination's h2 connection, or its most recent idle HTTP/1.1 one.
    async fn checkout(&self, key: &Key) -> Option<Conn> {
        loop {
            let candidate = {
                let mut hosts = self.0.hosts.lock().unwrap_or_else(|p| p.into_inner());
                let host = hosts.get_mut(key)?;
                if let Some(h2) = &host.h2 {
                    if !h2.is_closed() {
                        return Some(Conn::H2(h2.clone()));
                    }
                    host.h2 = None;
                }
                Some((host.idle.pop()?, host.proxied))
            };
            let ((idle, since), proxied) = candidate?;
            if since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            if let Some(conn) = fit(idle, proxied) {
                return Some(conn);
            }
        }
    }

    /// At the cap of upstream connections: an idle connection another shard pooled for
    /// the same destination. Its wake-ups then cross threads, which beats waiting for
    /// room while it sits idle.
    async fn checkout_elsewhere(&self, key: &Key) -> Option<Conn> {
        for shard in shards_from(key.2).skip(1) {
            if let Some(conn) = self.checkout(&Key(key.0, key.1.clone(), shard)).await {
                return Some(conn);
            }
        }
        None
    }

    /// The h2 connection being dialled for `key`, if one is.
    fn h2_dialing(&self, key: &Key) -> Option<watch::Receiver<bool>> {
        let hosts = self.0.hosts.lock().unwrap_or_else(|p| p.into_inner());
        hosts.get(key)?.h2_dialing.clone()
    }

    /// Mark an h2 dial for `key` under way when the destination is known to speak h2
    /// (on this shard or another: each shard pools its own, and a burst on a shard with
    /// none yet would otherwise open one connection per request). `None`: not known,
    /// or someone else is dialling.
    fn start_h2_dial(&self, key: &Key) -> Option<H2Dial> {
        let mut hosts = self.0.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let known = (0..=super::shards::count())
            .any(|s| hosts.get(&Key(key.0, key.1.clone(), s)).is_some_and(|h| h.spoke_h2));
        let host = hosts.entry(key.clone()).or_default();
        if !known || host.h2_dialing.is_some() {
            return None;
        }
        let (tx, rx) = watch::channel(false);
        host.h2_dialing = Some(rx);
        Some(H2Dial { pool: Arc::downgrade(&self.0), key: key.clone(), tx })
    }

    /// `connect_or_wait` boxed by a plain fn: dialing (TCP, TLS, HTTP/2 handshakes) is
    /// rare next to reuse, and its state would otherwise size every request's future.
    fn dial<'a>(&'a self, key: &'a Key) -> std::pin::Pin<Box<impl Future<Output = Dialed> + Send + 'a>> {
        Box::pin(self.connect_or_wait(key))
    }

    /// A new connection; at the cap of upstream connections, the first of one another
    /// request's response frees (`true`: used before) or a new one once there is room.
    /// `None`: the connection handed over was not fit to use (ask again).
    async fn connect_or_wait(&self, key: &Key) -> Dialed {
        let budget = &self.0.dialer.budget;
        if budget.try_reserve() {
            return Ok(Some((self.connecting(key).await?, false)));
        }
        if let Some(conn) = self.checkout_elsewhere(key).await {
            return Ok(Some((conn, true)));
        }
        let freed = match self.queue(key) {
            Turn::Now(idle, proxied) => return Ok(fit(idle, proxied).map(|conn| (conn, true))),
            Turn::Wait(freed) => freed,
        };
        // Room for one is room for whoever asks first: a request that loses that race
        // waits for its permit still in the queue, not behind it.
        let dial = async {
            budget.room(key.1.as_str(), self.0.dialer.connect_timeout).await?;
            self.connecting(key).await
        };
        tokio::select! {
            biased;
            Ok((idle, proxied)) = freed => Ok(fit(idle, proxied).map(|conn| (conn, true))),
            conn = dial => Ok(Some((conn?, false))),
        }
    }

    /// Wait in `key`'s queue for a connection coming free, unless one came free on any
    /// shard since the request looked (under the lock that `put_back` takes, so none
    /// goes idle unseen while this request waits).
    fn queue(&self, key: &Key) -> Turn {
        let mut hosts = self.0.hosts.lock().unwrap_or_else(|p| p.into_inner());
        for shard in shards_from(key.2) {
            if let Some(host) = hosts.get_mut(&Key(key.0, key.1.clone(), shard))
                && let Some(idle) = take_idle(host)
            {
                return Turn::Now(idle, host.proxied);
            }
        }
        let (tx, rx) = oneshot::channel();
        let host = hosts.entry(key.clone()).or_default();
        // Requests served by their own connection leave their place behind (an h2
        // destination's are never called): clear those out before they pile up.
        if host.waiters.len() >= host.purge_at.max(16) {
            self.0.queued.fetch_sub(host.forget_closed(), Ordering::Relaxed);
            host.purge_at = 2 * host.waiters.len();
        }
        host.waiters.push_back(Waiter { since: Instant::now(), tx });
        self.0.queued.fetch_add(1, Ordering::Relaxed);
        Turn::Wait(rx)
    }

    /// `connect` boxed by a plain fn: a request waiting for room among the upstream
    /// connections (10,000 clients, 1,024 connections) then holds a pointer to it, not
    /// the room for a TLS handshake it may never make.
    fn connecting<'a>(
        &'a self,
        key: &'a Key,
    ) -> std::pin::Pin<Box<impl Future<Output = Result<Conn, SendError>> + Send + 'a>> {
        Box::pin(self.connect(key))
    }

    /// A new connection: h2 if the upstream chose it, else HTTP/1.1.
    async fn connect(&self, key: &Key) -> Result<Conn, SendError> {
        let Key(tls, authority, _) = key;
        let dest = Destination::parse_authority(authority.as_str(), Some(if *tls { 443 } else { 80 }))
            .map_err(|e| UpstreamError::Resolve { host: authority.to_string(), why: e.to_string() })?;
        let dialer = &self.0.dialer;
        let dialing = self.start_h2_dial(key);
        // Plain HTTP through the corporate proxy: a connection to the proxy itself.
        let proxied = match tls {
            false => dialer.connect_plain_proxied(&dest).await.transpose()?,
            true => None,
        };
        let io = match (proxied, self.0.h1_only) {
            (Some(io), _) => io,
            (None, true) => dialer.connect_prefer_h1(dest, *tls).await?,
            (None, false) => dialer.connect(dest, *tls).await?,
        };
        if io.is_h2() {
            let tx = h2_client::handshake(io).await.map_err(|e| SendError::H2(e.into()))?;
            let mut hosts = self.0.hosts.lock().unwrap_or_else(|p| p.into_inner());
            let host = hosts.entry(key.clone()).or_default();
            host.h2 = Some(tx.clone());
            host.spoke_h2 = true;
            drop(hosts);
            if let Some(d) = dialing {
                let _ = d.tx.send(true);
            }
            return Ok(Conn::H2(tx));
        }
        let proxied = io.is_proxied();
        if proxied {
            let mut hosts = self.0.hosts.lock().unwrap_or_else(|p| p.into_inner());
            hosts.entry(key.clone()).or_default().proxied = true;
        }
        Ok(Conn::Own(client::Conn::new(io), proxied))
    }

    /// A connection free for a request: to the request that has waited longest for one
    /// to this destination, on whichever shard, else idle. Each shard queues its own
    /// requests, but the cap of upstream connections is the process's, and the shards
    /// need not hold equal shares of it: served shard by shard, the requests of a shard
    /// that dialled fewer connections waited out `connect_timeout` while the other's
    /// were served (503s for ~5% of requests in one run of 10,000 clients over 1,024
    /// connections).
    fn put_back(&self, key: Key, mut idle: Idle) {
        let mut hosts = self.0.hosts.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(shard) = self.longest_waiting(&mut hosts, &key) {
            let host = hosts.get_mut(&Key(key.0, key.1.clone(), shard)).expect("it has a request waiting");
            let waiter = host.waiters.pop_front().expect("it has a request waiting");
            self.0.queued.fetch_sub(1, Ordering::Relaxed);
            match waiter.tx.send((idle, host.proxied)) {
                Ok(()) => return,
                // Gone since it was looked at (served by a connection of its own).
                Err((back, _)) => idle = back,
            }
        }
        keep_idle(hosts.entry(key).or_default(), idle);
    }

    /// The shard whose first request for `key`'s destination has waited longest (ties
    /// to `key`'s own, whose connections wake no other thread); `None` when none waits.
    fn longest_waiting(&self, hosts: &mut Hosts, key: &Key) -> Option<usize> {
        if self.0.queued.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut longest: Option<(usize, Instant)> = None;
        for shard in shards_from(key.2) {
            let Some(host) = hosts.get_mut(&Key(key.0, key.1.clone(), shard)) else { continue };
            while host.waiters.front().is_some_and(|w| w.tx.is_closed()) {
                host.waiters.pop_front();
                self.0.queued.fetch_sub(1, Ordering::Relaxed);
            }
            if let Some(first) = host.waiters.front()
                && longest.is_none_or(|(_, since)| first.since < since)
            {
                longest = Some((shard, first.since));
            }
        }
        longest.map(|(shard, _)| shard)
    }
}

impl Host {
    /// Let go of the requests queued here that stopped waiting; how many there were.
    fn forget_closed(&mut self) -> usize {
        let before = self.waiters.len();
        self.waiters.retain(|w| !w.tx.is_closed());
        before - self.waiters.len()
    }
}

fn keep_idle(host: &mut Host, idle: Idle) {
    if host.idle.len() < MAX_IDLE_PER_HOST {
        host.idle.push((idle, Instant::now()));
    }
}

/// A request at the cap of upstream connections: a connection to use now, or its place
/// in the queue.
enum Turn {
    Now(Idle, bool),
    Wait(oneshot::Receiver<Handed>),
}

/// The most recent idle connection of `host` not past `IDLE_TIMEOUT` (the older ones
/// are then past it too).
fn take_idle(host: &mut Host) -> Option<Idle> {
    let (idle, since) = host.idle.pop()?;
    if since.elapsed() > IDLE_TIMEOUT {
        host.idle.clear();
        return None;
    }
    Some(idle)
}

/// Shard `first`, then every other shard (`shards::count`; 0 is off the shards).
fn shards_from(first: usize) -> impl Iterator<Item = usize> {
    std::iter::once(first).chain((0..=super::shards::count()).filter(move |&s| s != first))
}

/// An h2 dial others wait for; ended (ready, failed or cancelled) when dropped.
struct H2Dial {
    pool: Weak<Inner>,
    key: Key,
    tx: watch::Sender<bool>,
}

impl Drop for H2Dial {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            let mut hosts = pool.hosts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(host) = hosts.get_mut(&self.key) {
                host.h2_dialing = None;
            }
        }
        // `tx` goes with it: every waiter wakes.
    }
}

/// An idle connection, if it can take a request now.
fn fit(mut idle: Idle, proxied: bool) -> Option<Conn> {
    idle.is_fit().then_some(Conn::Own(idle, proxied))
}

/// How the own client frames a request's body.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    Length(u64),
    Chunked,
}

/// How the own client frames a request's body: none (`Length(0)`), one of known length,
/// or chunked (a request the client chunked — latchkey's HTTP/1.1 guard lets in no
/// transfer coding but a last `chunked`; HTTP/2 has none — or a body of unknown length
/// without a `Content-Length`). A bodiless method's body of unknown length is not sent,
/// as hyper (a `GET` is not chunked). The head must say what the body is: a length the
/// body does not fill would have the upstream read the next client's request as the
/// rest of this one, so a `Content-Length` that says other than the body's known length
/// is refused, and a body of unknown length is held to the one its head names.
fn framing(req: &Request<Body>) -> Result<Framing, SendError> {
    use hyper::body::Body as _;
    // One pass over the head for both names rather than two hashed lookups.
    let (mut coded, mut declared) = (false, None);
    for (name, value) in req.headers() {
        if *name == header::TRANSFER_ENCODING {
            coded = true;
        } else if *name == header::CONTENT_LENGTH {
            declared = declared.or(Some(value));
        }
    }
    if coded {
        return Ok(Framing::Chunked);
    }
    let length = match (req.body().is_end_stream(), req.body().size_hint().exact()) {
        (true, _) => 0,
        (false, Some(n)) => n,
        (false, None) => {
            let bodiless = matches!(*req.method(), http::Method::GET | http::Method::HEAD);
            return match declared {
                Some(v) => v
                    .to_str()
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .map(Framing::Length)
                    .ok_or_else(|| SendError::Mismatch(String::from_utf8_lossy(v.as_bytes()).into(), 0)),
                None if bodiless => Ok(Framing::Length(0)),
                None => Ok(Framing::Chunked),
            };
        }
    };
    match declared {
        Some(v) if v.as_bytes() != itoa::Buffer::new().format(length).as_bytes() => {
            Err(SendError::Mismatch(String::from_utf8_lossy(v.as_bytes()).into(), length))
        }
        _ => Ok(Framing::Length(length)),
    }
}

/// Idle connections past `IDLE_TIMEOUT` are closed (their sender dropped); the reaper
/// ends with its pool.
fn reap_idle(pool: Weak<Inner>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    runtime.spawn(async move {
        loop {
            tokio::time::sleep(IDLE_TIMEOUT / 3).await;
            let Some(pool) = pool.upgrade() else { return };
            let mut hosts = pool.hosts.lock().unwrap_or_else(|p| p.into_inner());
            hosts.retain(|_, host| {
                // Closed by the upstream: let go of its socket and permits now.
                host.idle.retain_mut(|(idle, since)| idle.is_fit() && since.elapsed() <= IDLE_TIMEOUT);
                host.h2 = host.h2.take().filter(|h2| !h2.is_closed());
                pool.queued.fetch_sub(host.forget_closed(), Ordering::Relaxed);
                !host.idle.is_empty() || host.h2.is_some() || !host.waiters.is_empty()
            });
        }
    });
}

/// The Host HTTP/1.1 needs, unless the request has one: the URI's authority, without a
/// default port. Written by the encoder, not put in the header map (no copy, no hashing).
fn missing_host(req: &Request<Body>) -> Option<&str> {
    if req.headers().contains_key(header::HOST) {
        return None;
    }
    let uri = req.uri();
    let default = matches!(
        (uri.port_u16(), uri.scheme() == Some(&Scheme::HTTPS)),
        (Some(443), true) | (Some(80), false) | (None, _)
    );
    Some(match (default, uri.authority()) {
        (true, _) => uri.host().unwrap_or(""),
        (false, Some(a)) => a.as_str(),
        (false, None) => "",
    })
}

/// `/path?query`: what an HTTP/1.1 request line carries to an origin server.
/// A connection dialed or handed over (`true`: used before); `None`: the one handed
/// over was not fit to use.
type Dialed = Result<Option<(Conn, bool)>, SendError>;

/// Where the own client's connection goes back to once its response has been read.
struct OwnHome {
    pool: Weak<Inner>,
    key: Key,
}

impl client::Home for OwnHome {
    fn take_back(self, conn: client::Conn) {
        if let Some(pool) = self.pool.upgrade() {
            Pool(pool).put_back(self.key, conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Frame;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    fn request(body: &'static [u8], length: Option<&'static str>) -> Request<Body> {
        let body = Full::new(Bytes::from_static(body)).map_err(|e| match e {}).boxed();
        let mut req = Request::new(body);
        if let Some(n) = length {
            req.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static(n));
        }
        req
    }

    /// A body of unknown length (as an HTTP/2 client's without `content-length`).
    fn streamed(method: http::Method) -> Request<Body> {
        struct Streamed;
        impl hyper::body::Body for Streamed {
            type Data = Bytes;
            type Error = crate::proxy::BoxError;
            fn poll_frame(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
                Poll::Pending
            }
        }
        let mut req = Request::new(Streamed.boxed());
        *req.method_mut() = method;
        req
    }

    #[test]
    fn a_request_is_framed_as_its_head_says_and_a_head_that_says_otherwise_is_refused() {
        use Framing::*;
        let framed = |req: &Request<Body>| framing(req).ok();
        assert_eq!(framed(&request(b"", None)), Some(Length(0)));
        assert_eq!(framed(&request(b"", Some("0"))), Some(Length(0)));
        assert_eq!(framed(&request(b"abc", None)), Some(Length(3)));
        assert_eq!(framed(&request(b"abc", Some("3"))), Some(Length(3)));
        // A head promising more (or other) than the body holds is not sent.
        assert_eq!(framed(&request(b"", Some("5"))), None);
        assert_eq!(framed(&request(b"abc", Some("4"))), None);
        assert_eq!(framed(&request(b"abc", Some("3, 3"))), None);
        // The client's chunking is kept; a body of unknown length is chunked, but not
        // a GET's (hyper's rule: it is not sent).
        let mut chunked = request(b"abc", None);
        chunked.headers_mut().insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert_eq!(framed(&chunked), Some(Chunked));
        assert_eq!(framed(&streamed(http::Method::POST)), Some(Chunked));
        assert_eq!(framed(&streamed(http::Method::GET)), Some(Length(0)));
        // A body of unknown length is held to the length its head names.
        let mut announced = streamed(http::Method::POST);
        announced.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert_eq!(framed(&announced), Some(Length(3)));
        announced.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("x"));
        assert_eq!(framed(&announced), None);
    }
}
