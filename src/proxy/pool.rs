//! latchkey's own upstream connection pool: HTTP/1.1 connections for the own client
//! or hyper's low-level `client::conn`, HTTP/2 ones for the own h2 leg (`h2_client`).
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
//! An HTTP/1.1 connection is driven by one of two clients. A request without a body, with
//! one of known length, or chunked (a body of unknown length) goes by latchkey's own
//! (`client`), in the request's task; what is left (HTTP/1.0, a `Content-Length` the
//! body does not match) by hyper's, and every request to the corporate proxy. Idle
//! connections of both kinds wait in one list, each request taking one of its kind if
//! there is one: an own connection taken for hyper is hyper's from then on (hyper
//! cannot give one back).
//!
//! A request that finds no idle connection dials a new one. At a cap of upstream
//! connections (`fanout`) it queues instead, for a connection another response frees or
//! room for a new one, whichever comes first, up to `connect_timeout`: requests take
//! turns on the connections there are instead of being refused (SPEC 8: 10,000 client
//! connections over a bounded number of upstream ones).

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri, header};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use tokio::sync::{oneshot, watch};

use super::Body;
use super::client;
use super::h2_client;
use super::upstream::{Dialer, UpstreamError, UpstreamIo};
use crate::policy::Destination;

const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const MAX_IDLE_PER_HOST: usize = 64;
const READY_WAIT: Duration = Duration::from_millis(100);

/// Why a request could not be sent upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Own(#[from] client::Error),
    #[error("{0}")]
    H2(#[source] super::BoxError),
    #[error("the request URI names no destination")]
    NoDestination,
}

/// An idle HTTP/1.1 connection: hyper's, or the own client's (`client`).
enum Idle {
    Hyper(http1::SendRequest<Body>),
    Own(client::Conn),
}

/// An HTTP/1.1 connection handed from a finished response to a waiting request, with
/// whether it goes to the corporate proxy.
type Handed = (Idle, bool);

/// Connections to one scheme + authority.
#[derive(Default)]
struct Host {
    idle: Vec<(Idle, Instant)>,
    /// Requests that found no idle connection, oldest first; a connection coming free
    /// goes to the first still waiting rather than to `idle`.
    waiters: VecDeque<oneshot::Sender<Handed>>,
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

struct Inner {
    dialer: Arc<Dialer>,
    /// Offer HTTP/1.1 only by ALPN (the pool for HTTP/1.1 clients).
    h1_only: bool,
    hosts: Mutex<HashMap<Key, Host>>,
    /// Requests waiting in every `Host::waiters` (changed under `hosts`): when none
    /// is, a connection coming free skips looking for one on the other shards.
    queued: AtomicUsize,
}

/// One pool: per config generation, per dialer, per client protocol.
#[derive(Clone)]
pub struct Pool(Arc<Inner>);

/// What a request is sent on.
enum Conn {
    /// An HTTP/1.1 connection; `true` when it goes to the corporate proxy (`[upstream]
    /// proxy`), which takes requests in absolute form.
    H1(http1::SendRequest<Body>, bool),
    H2(h2_client::Conn),
    /// An HTTP/1.1 connection the own client drives (never to the corporate proxy).
    Own(client::Conn),
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
    pub fn request(
        &self,
        req: Request<Body>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, SendError>> + Send + '_>>
    {
        Box::pin(self.request_inner(req))
    }

    async fn request_inner(&self, mut req: Request<Body>) -> Result<Response<Body>, SendError> {
        let tls = req.uri().scheme() == Some(&Scheme::HTTPS);
        let authority = req.uri().authority().cloned().ok_or(SendError::NoDestination)?;
        let key = Key(tls, authority, super::shards::current());
        let uri = req.uri().clone();
        let framing = for_own_client(&req);
        let own = framing.is_some();
        loop {
            let (conn, reused) = match self.checkout(&key, own).await {
                Some(conn) => (conn, true),
                None => {
                    if let Some(mut dialing) = self.h2_dialing(&key) {
                        // Ready or failed (the sender dropped): look again.
                        let _ = dialing.wait_for(|ready| *ready).await;
                        continue;
                    }
                    match self.dial(&key, own).await? {
                        Some(got) => got,
                        None => continue,
                    }
                }
            };
            let conn = match (conn, framing) {
                (Conn::Own(conn), Some(framing)) => {
                    match self.send_own(conn, &key, &mut req, framing).await {
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
                (Conn::Own(conn), None) => match conn.into_io() {
                    Some(io) => Conn::H1(handshake_h1(io).await?, false),
                    None => continue,
                },
                (conn, _) => conn,
            };
            match self.send(conn, &key, req).await {
                Ok(resp) => return Ok(resp),
                // Not written: the upstream closed an idle connection under us.
                Err(NotSent::Again(mut again, _)) if reused => {
                    *again.uri_mut() = uri.clone();
                    req = *again;
                }
                Err(NotSent::Again(_, e) | NotSent::Failed(e)) => return Err(e),
            }
        }
    }

    /// Send a request on the own client, in this task: no body (`Length(0)`), or a body
    /// framed as `framing` says, which is taken out of `req`.
    async fn send_own(
        &self,
        mut conn: client::Conn,
        key: &Key,
        req: &mut Request<Body>,
        framing: Framing,
    ) -> Result<Response<Body>, client::Failed> {
        set_host(req);
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
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let mut head = Vec::with_capacity(256);
        client::codec::encode_head(req.method(), target, req.headers(), &mut head);
        let mut upload = match framing {
            Framing::Length(length) => client::Upload::new(head, body, length),
            Framing::Chunked => client::Upload::chunked(
                head,
                body.unwrap_or_default(),
                client::declared_trailers(req.headers()),
            ),
        };
        let head = conn.exchange(&mut upload, req.method() == http::Method::HEAD).await?;
        let home = OwnHome { pool: Arc::downgrade(&self.0), key: key.clone() };
        Ok(client::response(conn, head, upload, home, self.0.dialer.timeout))
    }

    async fn send(&self, conn: Conn, key: &Key, mut req: Request<Body>) -> Result<Response<Body>, NotSent> {
        match conn {
            Conn::H2(h2) => h2.send(req, self.0.dialer.timeout).await.map_err(|failed| match failed {
                h2_client::Failed::Unsent(req) => {
                    NotSent::Again(req, SendError::H2("the upstream h2 connection closed".into()))
                }
                h2_client::Failed::Error(e) => NotSent::Failed(SendError::H2(e)),
            }),
            Conn::Own(_) => unreachable!("sent by send_own"),
            Conn::H1(mut tx, proxied) => {
                set_host(&mut req);
                if !proxied {
                    origin_form(req.uri_mut());
                }
                let resp = tx.try_send_request(req).await.map_err(NotSent::from)?;
                let back = Some(Back { pool: Arc::downgrade(&self.0), key: key.clone(), tx });
                Ok(resp.map(|body| {
                    let mut body = Returning { body, back };
                    body.maybe_return();
                    boxed(body)
                }))
            }
        }
    }

    /// An idle HTTP/1.1 connection, or the destination's h2 connection; the most recent
    /// of the kind the request goes by (`own`), else the most recent.
    async fn checkout(&self, key: &Key, own: bool) -> Option<Conn> {
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
                let kind = host.idle.iter().rposition(|(idle, _)| matches!(idle, Idle::Own(_)) == own);
                let at = kind.or(host.idle.len().checked_sub(1))?;
                Some((host.idle.remove(at), host.proxied))
            };
            let ((idle, since), proxied) = candidate?;
            if since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            if let Some(conn) = fit(idle, proxied).await {
                return Some(conn);
            }
        }
    }

    /// At the cap of upstream connections: an idle connection another shard pooled for
    /// the same destination. Its wake-ups then cross threads, which beats waiting for
    /// room while it sits idle.
    async fn checkout_elsewhere(&self, key: &Key, own: bool) -> Option<Conn> {
        for shard in shards_from(key.2).skip(1) {
            if let Some(conn) = self.checkout(&Key(key.0, key.1.clone(), shard), own).await {
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
    fn dial<'a>(
        &'a self,
        key: &'a Key,
        own: bool,
    ) -> std::pin::Pin<Box<impl Future<Output = Dialed> + Send + 'a>> {
        Box::pin(self.connect_or_wait(key, own))
    }

    /// A new connection; at the cap of upstream connections, the first of one another
    /// request's response frees (`true`: used before) or a new one once there is room.
    /// `None`: the connection handed over was not fit to use (ask again).
    async fn connect_or_wait(&self, key: &Key, own: bool) -> Dialed {
        let budget = &self.0.dialer.budget;
        if budget.try_reserve() {
            return Ok(Some((self.connecting(key, own).await?, false)));
        }
        if let Some(conn) = self.checkout_elsewhere(key, own).await {
            return Ok(Some((conn, true)));
        }
        let freed = match self.queue(key) {
            Turn::Now(idle, proxied) => return Ok(fit(idle, proxied).await.map(|conn| (conn, true))),
            Turn::Wait(freed) => freed,
        };
        // Room for one is room for whoever asks first: a request that loses that race
        // waits for its permit still in the queue, not behind it.
        let dial = async {
            budget.room(key.1.as_str(), self.0.dialer.connect_timeout).await?;
            self.connecting(key, own).await
        };
        tokio::select! {
            biased;
            Ok((idle, proxied)) = freed => Ok(fit(idle, proxied).await.map(|conn| (conn, true))),
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
        let waiters = &mut hosts.entry(key.clone()).or_default().waiters;
        // Requests served by their own connection leave their place behind (an h2
        // destination's are never called): clear those out before they pile up.
        if waiters.len() >= 16 {
            let before = waiters.len();
            waiters.retain(|w| !w.is_closed());
            self.0.queued.fetch_sub(before - waiters.len(), Ordering::Relaxed);
        }
        waiters.push_back(tx);
        self.0.queued.fetch_add(1, Ordering::Relaxed);
        Turn::Wait(rx)
    }

    /// `connect` boxed by a plain fn: a request waiting for room among the upstream
    /// connections (10,000 clients, 1,024 connections) then holds a pointer to it, not
    /// the room for a TLS handshake it may never make.
    fn connecting<'a>(
        &'a self,
        key: &'a Key,
        own: bool,
    ) -> std::pin::Pin<Box<impl Future<Output = Result<Conn, SendError>> + Send + 'a>> {
        Box::pin(self.connect(key, own))
    }

    /// A new connection: h2 if the upstream chose it, else HTTP/1.1 for the own client
    /// (`own`) or for hyper.
    async fn connect(&self, key: &Key, own: bool) -> Result<Conn, SendError> {
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
        if own && !proxied {
            return Ok(Conn::Own(client::Conn::new(io)));
        }
        let tx = handshake_h1(io).await?;
        if proxied {
            let mut hosts = self.0.hosts.lock().unwrap_or_else(|p| p.into_inner());
            hosts.entry(key.clone()).or_default().proxied = true;
        }
        Ok(Conn::H1(tx, proxied))
    }

    /// A connection free for a request: to the first request still waiting for one
    /// on this shard, else on another (each shard queues its own, but the cap of
    /// upstream connections is the process's: a request queued on one shard would
    /// otherwise wait out `connect_timeout` while the other's connections go idle),
    /// else idle.
    fn put_back(&self, key: Key, idle: Idle) {
        let mut hosts = self.0.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let host = hosts.entry(key.clone()).or_default();
        let Err(mut idle) = self.hand_over(host, idle) else { return };
        if self.0.queued.load(Ordering::Relaxed) == 0 {
            return keep_idle(host, idle);
        }
        for shard in shards_from(key.2).skip(1) {
            if let Some(other) = hosts.get_mut(&Key(key.0, key.1.clone(), shard))
                && !other.waiters.is_empty()
            {
                let Err(back) = self.hand_over(other, idle) else { return };
                idle = back;
            }
        }
        keep_idle(hosts.entry(key).or_default(), idle);
    }

    /// `idle` to the first of `host`'s waiters still waiting; back if none is.
    fn hand_over(&self, host: &mut Host, mut idle: Idle) -> Result<(), Idle> {
        while let Some(waiter) = host.waiters.pop_front() {
            self.0.queued.fetch_sub(1, Ordering::Relaxed);
            match waiter.send((idle, host.proxied)) {
                Ok(()) => return Ok(()),
                Err((back, _)) => idle = back,
            }
        }
        Err(idle)
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

/// `tx` once ready for a request. A connection is put back when its last response was
/// read, and its task marks it ready a moment later; one still busy past that (a request
/// body still going up after an early response) is closed rather than waited for.
async fn ready(mut tx: http1::SendRequest<Body>) -> Option<http1::SendRequest<Body>> {
    if tx.is_closed() {
        return None;
    }
    let ready = tx.is_ready() || matches!(tokio::time::timeout(READY_WAIT, tx.ready()).await, Ok(Ok(())));
    ready.then_some(tx)
}

/// An idle connection, if it can take a request now.
async fn fit(idle: Idle, proxied: bool) -> Option<Conn> {
    match idle {
        Idle::Hyper(tx) => ready(tx).await.map(|tx| Conn::H1(tx, proxied)),
        Idle::Own(mut conn) => conn.is_fit().then_some(Conn::Own(conn)),
    }
}

/// How the own client frames a request's body.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    Length(u64),
    Chunked,
}

/// What the own client takes, and how it frames the body: a request in HTTP/1.1 or
/// HTTP/2 (written as HTTP/1.1) without a body, with one of known length whose
/// `Content-Length`, if it has one, says the same, or chunked: a request the client
/// chunked (latchkey's HTTP/1.1 guard lets in no transfer coding but a last `chunked`;
/// HTTP/2 has none) or a body of unknown length without a `Content-Length`. A bodiless
/// method's body of unknown length is not sent, as hyper (a `GET` is not chunked). What
/// is left (HTTP/1.0, a `Content-Length` the body does not match) stays with hyper.
fn for_own_client(req: &Request<Body>) -> Option<Framing> {
    use hyper::body::Body as _;
    if !matches!(req.version(), http::Version::HTTP_11 | http::Version::HTTP_2) {
        return None;
    }
    if req.headers().contains_key(header::TRANSFER_ENCODING) {
        return Some(Framing::Chunked);
    }
    // The head must say what the body is: a length the body does not fill would have
    // the upstream read the next client's request as the rest of this one.
    let length = match (req.body().is_end_stream(), req.body().size_hint().exact()) {
        (true, _) => 0,
        (false, Some(n)) if n > 0 => n,
        (false, Some(_)) => return None,
        (false, None) => {
            let bodiless = matches!(*req.method(), http::Method::GET | http::Method::HEAD);
            return match req.headers().contains_key(header::CONTENT_LENGTH) {
                true => None,
                false if bodiless => Some(Framing::Length(0)),
                false => Some(Framing::Chunked),
            };
        }
    };
    match req.headers().get(header::CONTENT_LENGTH) {
        None => Some(Framing::Length(length)),
        Some(v) => {
            (v.as_bytes() == itoa::Buffer::new().format(length).as_bytes()).then_some(Framing::Length(length))
        }
    }
}

/// hyper's HTTP/1.1 client on `io`, its connection driven by a task of its own.
async fn handshake_h1(io: UpstreamIo) -> Result<http1::SendRequest<Body>, hyper::Error> {
    let (tx, conn) = http1::Builder::new().handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("upstream connection: {e}");
        }
    });
    Ok(tx)
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
                host.idle.retain_mut(|(idle, since)| {
                    let open = match idle {
                        Idle::Hyper(tx) => !tx.is_closed(),
                        // Closed by the upstream: let go of its socket and permits now.
                        Idle::Own(conn) => conn.is_fit(),
                    };
                    open && since.elapsed() <= IDLE_TIMEOUT
                });
                host.h2 = host.h2.take().filter(|h2| !h2.is_closed());
                host.waiters.retain(|w| !w.is_closed());
                !host.idle.is_empty() || host.h2.is_some() || !host.waiters.is_empty()
            });
        }
    });
}

/// HTTP/1.1 needs a Host header: the URI's authority, without a default port.
fn set_host(req: &mut Request<Body>) {
    if req.headers().contains_key(header::HOST) {
        return;
    }
    let uri = req.uri();
    let default = matches!(
        (uri.port_u16(), uri.scheme() == Some(&Scheme::HTTPS)),
        (Some(443), true) | (Some(80), false) | (None, _)
    );
    let text = match (default, uri.authority()) {
        (true, _) => uri.host().unwrap_or(""),
        (false, Some(a)) => a.as_str(),
        (false, None) => "",
    };
    if let Ok(v) = HeaderValue::from_str(text) {
        req.headers_mut().insert(header::HOST, v);
    }
}

/// `/path?query`: what an HTTP/1.1 request line carries to an origin server.
fn origin_form(uri: &mut Uri) {
    *uri = match uri.path_and_query() {
        Some(pq) if pq.as_str() != "/" => {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(pq.clone());
            Uri::from_parts(parts).unwrap_or_default()
        }
        _ => Uri::default(),
    };
}

fn boxed(b: Returning) -> Body {
    use http_body_util::BodyExt;
    b.boxed()
}

/// A connection dialed or handed over (`true`: used before); `None`: the one handed
/// over was not fit to use.
type Dialed = Result<Option<(Conn, bool)>, SendError>;

/// A request not sent: to send again on another connection when the one it was
/// given had been idle (the error if not), or failed.
enum NotSent {
    Again(Box<Request<Body>>, SendError),
    Failed(SendError),
}

impl From<hyper::client::conn::TrySendError<Request<Body>>> for NotSent {
    fn from(mut e: hyper::client::conn::TrySendError<Request<Body>>) -> NotSent {
        match e.take_message() {
            Some(req) => NotSent::Again(Box::new(req), e.into_error().into()),
            None => NotSent::Failed(e.into_error().into()),
        }
    }
}

/// Where an HTTP/1.1 connection goes back to once its response has been read.
struct Back {
    pool: Weak<Inner>,
    key: Key,
    tx: http1::SendRequest<Body>,
}

/// Where the own client's connection goes back to once its response has been read.
struct OwnHome {
    pool: Weak<Inner>,
    key: Key,
}

impl client::Home for OwnHome {
    fn take_back(self, conn: client::Conn) {
        if let Some(pool) = self.pool.upgrade() {
            Pool(pool).put_back(self.key, Idle::Own(conn));
        }
    }
}

/// A response body that returns its HTTP/1.1 connection to the pool when it ends. A body
/// dropped before its end leaves the connection to close (hyper closes it: the rest of
/// the response was never read).
struct Returning {
    body: Incoming,
    back: Option<Back>,
}

impl Returning {
    /// Put the connection back as soon as the body says it has ended (a Content-Length
    /// body that reached its length, before anyone polls past its last frame).
    fn maybe_return(&mut self) {
        use hyper::body::Body as _;
        if self.body.is_end_stream() {
            self.give_back();
        }
    }

    /// The body was read to its end. A chunked body never reports `is_end_stream`
    /// (hyper only knows it ended when the last chunk arrives), so its end is this.
    fn give_back(&mut self) {
        if let Some(Back { pool, key, tx }) = self.back.take()
            && let Some(pool) = pool.upgrade()
        {
            Pool(pool).put_back(key, Idle::Hyper(tx));
        }
    }
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) => self.maybe_return(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            Poll::Pending => {}
        }
        polled.map(|f| f.map(|r| r.map_err(|e| Box::new(e) as super::BoxError)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

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
    fn the_own_client_takes_a_request_only_when_its_head_says_what_its_body_is() {
        use Framing::*;
        assert_eq!(for_own_client(&request(b"", None)), Some(Length(0)));
        assert_eq!(for_own_client(&request(b"", Some("0"))), Some(Length(0)));
        assert_eq!(for_own_client(&request(b"abc", None)), Some(Length(3)));
        assert_eq!(for_own_client(&request(b"abc", Some("3"))), Some(Length(3)));
        // A head promising more (or other) than the body holds stays with hyper.
        assert_eq!(for_own_client(&request(b"", Some("5"))), None);
        assert_eq!(for_own_client(&request(b"abc", Some("4"))), None);
        // The client's chunking is kept; a body of unknown length is chunked, but not
        // a GET's (hyper's rule: it is not sent).
        let mut chunked = request(b"abc", None);
        chunked.headers_mut().insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert_eq!(for_own_client(&chunked), Some(Chunked));
        assert_eq!(for_own_client(&streamed(http::Method::POST)), Some(Chunked));
        assert_eq!(for_own_client(&streamed(http::Method::GET)), Some(Length(0)));
        let mut announced = streamed(http::Method::POST);
        announced.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert_eq!(for_own_client(&announced), None);
        let mut old = request(b"", None);
        *old.version_mut() = http::Version::HTTP_10;
        assert_eq!(for_own_client(&old), None);
    }
}
