//! The proxy: listeners, CONNECT, interception and forwarding.
//!
//! accept → identify destination (CONNECT authority or absolute URI, never a Host
//! header) → decide → intercept or tunnel → inject → forward → log.

mod body;
mod capped;
mod destined;
mod fanout;
mod forward;
pub(crate) mod framing;
mod handler;
pub(crate) mod hop;
pub(crate) mod identity;
pub mod ops;
mod respond;
mod tokens;
mod trailers;
mod tunnel;
mod upgrade;
pub mod upstream;
pub use destined::original_destination;
mod wsframes;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::crypto::CryptoProvider;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::audit::Audit;
use crate::ca::CertAuthority;
use crate::config::Config;
use upstream::{Connector, Dialer};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Everything derived from one loaded config. Swapped whole, never edited: a
/// connection keeps the generation it started with.
pub struct Generation {
    pub config: Arc<Config>,
    /// For requests without a credential, and credentials without TLS material.
    pub dialer: Arc<Dialer>,
    /// Offers h2 and HTTP/1.1 by ALPN: for HTTP/2 clients, and latchkey's own calls.
    pub client: Client<Connector, Body>,
    client_h1: Client<Connector, Body>,
    /// Credentials with a client certificate or their own roots get their own dialer
    /// and pools: such a connection serves only requests that selected that credential.
    by_credential: std::collections::HashMap<usize, (Arc<Dialer>, Pools)>,
}

/// The two pools of one dialer. The upstream leg speaks what the client spoke: an
/// HTTP/1.1 client's parallel connections stay parallel connections upstream (one h2
/// connection would funnel them all through one task: 1 MiB downloads ran at 0.36x of
/// direct that way, 0.55x on HTTP/1.1), and an h2 client (gRPC) gets h2.
struct Pools {
    h2: Client<Connector, Body>,
    h1: Client<Connector, Body>,
}

impl Pools {
    fn new(dialer: &Arc<Dialer>) -> Pools {
        Pools { h2: pooled(dialer.clone(), false), h1: pooled(dialer.clone(), true) }
    }

    fn for_version(&self, version: http::Version) -> &Client<Connector, Body> {
        if version == http::Version::HTTP_2 { &self.h2 } else { &self.h1 }
    }
}

impl Generation {
    pub fn new(
        config: Arc<Config>,
        provider: Arc<CryptoProvider>,
        own_sockets: Vec<SocketAddr>,
        budget: Arc<fanout::Budget>,
    ) -> Result<Self, String> {
        let ca_file = config.upstream.ca_file.as_deref();
        let dialer = |tls: rustls::ClientConfig| {
            Arc::new(Dialer {
                resolve: config.upstream.resolve.clone(),
                allow_private: config.proxy.allow_private.clone(),
                own_sockets: own_sockets.clone(),
                connect_timeout: config.proxy.connect_timeout,
                budget: budget.clone(),
                tls_h1: tokio_rustls::TlsConnector::from(Arc::new(h1_only(&tls))),
                tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
                alpn: Default::default(),
            })
        };
        let default = dialer(upstream::client_tls(provider.clone(), ca_file, None)?);
        let mut by_credential = std::collections::HashMap::new();
        for (i, cred) in config.credentials.iter().enumerate() {
            if let Some(material) = &cred.tls {
                let tls = upstream::client_tls(provider.clone(), ca_file, Some(material))
                    .map_err(|e| format!("credential {}: {e}", cred.name))?;
                let d = dialer(tls);
                let pools = Pools::new(&d);
                by_credential.insert(i, (d, pools));
            }
        }
        let Pools { h2, h1 } = Pools::new(&default);
        Ok(Generation { client: h2, client_h1: h1, dialer: default, by_credential, config })
    }

    /// The dialer and pool for a request of `version` that selected `credential` (or none).
    pub fn upstream(
        &self,
        credential: Option<usize>,
        version: http::Version,
    ) -> (&Arc<Dialer>, &Client<Connector, Body>) {
        match credential.and_then(|i| self.by_credential.get(&i)) {
            Some((d, pools)) => (d, pools.for_version(version)),
            None if version == http::Version::HTTP_2 => (&self.dialer, &self.client),
            None => (&self.dialer, &self.client_h1),
        }
    }
}

fn pooled(dialer: Arc<Dialer>, h1_only: bool) -> Client<Connector, Body> {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(64)
        .build(Connector { dialer, h1_only })
}

fn h1_only(tls: &rustls::ClientConfig) -> rustls::ClientConfig {
    let mut cfg = tls.clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg
}

pub struct Proxy {
    current: RwLock<Arc<Generation>>,
    pub ca: Arc<CertAuthority>,
    pub ops: Arc<ops::Ops>,
    provider: Arc<CryptoProvider>,
    own_sockets: Vec<SocketAddr>,
    connections: Arc<Semaphore>,
    per_client: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    pub exchanges: Arc<Exchanges>,
    /// Upstream connections opened for requests, all generations together.
    budget: Arc<fanout::Budget>,
    /// Bumped by every reload, so open blind tunnels check themselves against it.
    reloads: tokio::sync::watch::Sender<u64>,
    /// `[proxy] tls`: the TLS side of the proxy port.
    hop: Option<hop::TlsHop>,
    /// Token root key, revocation list and verified-token cache (`crate::token`).
    pub tokens: Arc<crate::token::state::TokenState>,
}

/// A client connection's place under the global and per-client limits, and in the
/// connection gauge. It lives as long as the connection — including the tunnel a CONNECT
/// turns it into, which takes it over — so tunnels count against the limits too.
pub struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _per_client: PerClient,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

/// The slot of a connection still being served as HTTP; a CONNECT takes it.
pub type HeldSlot = Arc<std::sync::Mutex<Option<Slot>>>;

impl Slot {
    fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        per_client: PerClient,
        gauge: &prometheus_client::metrics::gauge::Gauge,
    ) -> Slot {
        gauge.inc();
        Slot { _permit: permit, _per_client: per_client, gauge: gauge.clone() }
    }

    pub fn take(held: &HeldSlot) -> Option<Slot> {
        held.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// One open connection counted against its client's address; dropping it uncounts it.
struct PerClient {
    map: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl PerClient {
    fn enter(
        map: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
        limit: usize,
    ) -> Option<PerClient> {
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(PerClient { map: map.clone(), ip })
    }
}

impl Drop for PerClient {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

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

impl Proxy {
    pub fn new(
        config: Config,
        ca: Arc<CertAuthority>,
        provider: Arc<CryptoProvider>,
        own_sockets: Vec<SocketAddr>,
    ) -> Result<Arc<Self>, String> {
        let audit = if config.proxy.log_requests {
            let key = match &config.proxy.hmac_key_file {
                Some(path) => {
                    Some(crate::audit::read_hmac_key(path).map_err(|e| format!("hmac_key_file {e}"))?)
                }
                None => None,
            };
            Audit::open(&config.proxy.log_file, key)
                .map_err(|e| format!("cannot open log_file {}: {e}", config.proxy.log_file.display()))?
        } else {
            Audit::off()
        };
        let spans = match &config.telemetry.otlp_endpoint {
            #[cfg(feature = "otlp")]
            Some(endpoint) => {
                Some(crate::otlp::Exporter::start(endpoint, config.telemetry.service_name.clone())?)
            }
            #[cfg(not(feature = "otlp"))]
            Some(_) => {
                return Err(
                    "[telemetry] otlp_endpoint: this build has no OTLP exporter (cargo feature otlp)".into(),
                );
            }
            None => None,
        };
        let connections = Arc::new(Semaphore::new(config.proxy.limits.max_connections));
        check_fd_budget(&config.proxy.limits);
        let budget = fanout::Budget::new(config.proxy.limits.max_upstream_connections);
        let hop = match config.proxy.tls {
            true => Some(hop::TlsHop::new(
                ca.clone(),
                hop::own_names(config.proxy.listen.ip(), &config.proxy.tls_names),
            )?),
            false => None,
        };
        let generation =
            Generation::new(Arc::new(config), provider.clone(), own_sockets.clone(), budget.clone())?;
        let exchanges = Arc::new(Exchanges::default());
        let per_client = Default::default();
        let tokens = Arc::new(crate::token::state::TokenState::new(&generation.config.proxy.ca_dir));
        tokens.watch();
        Ok(Arc::new(Proxy {
            current: RwLock::new(Arc::new(generation)),
            ca,
            ops: Arc::new(ops::Ops::new(audit, spans)),
            provider,
            own_sockets,
            connections,
            per_client,
            exchanges,
            budget,
            reloads: tokio::sync::watch::Sender::new(0),
            hop,
            tokens,
        }))
    }

    pub fn generation(&self) -> Arc<Generation> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Put a newly loaded config in force: built whole, then swapped in one step. Each
    /// request is decided by the generation in force when it arrives, on every open
    /// connection (invariant 10); a request in flight finishes with the one it started
    /// with, and an open blind tunnel is cut if the new config refuses its CONNECT. A
    /// config that changes what only a restart can change is refused, and the running
    /// one stays (fail closed).
    pub fn reload(&self, mut config: Config) -> Result<(), String> {
        let old = self.generation();
        let was = &old.config;
        if let Some(what) = restart_needed(was, &config) {
            return Err(format!("{what} changed: that needs a restart; still running the previous config"));
        }
        config.proxy.listen = was.proxy.listen;
        for cred in &mut config.credentials {
            // Values rotated out by this reload stay masked (invariant 5).
            if let Some(prev) = was.credentials.iter().find(|c| c.name == cred.name) {
                cred.redactor = prev.redactor.clone();
            }
        }
        let generation = Generation::new(
            Arc::new(config),
            self.provider.clone(),
            self.own_sockets.clone(),
            self.budget.clone(),
        )?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(generation);
        self.reloads.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Wakes when a reload has put a new generation in force.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// Accept clients until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    x
                }
                Err(e) => {
                    // EMFILE and friends: back off, longer each time, instead of
                    // spinning (and logging) while descriptors are short.
                    if backoff == ACCEPT_BACKOFF_MIN {
                        tracing::warn!("accept failed: {e}; backing off");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            let Some(slot) = self.admit(peer) else { continue };
            let proxy = self.clone();
            tokio::spawn(async move {
                let Some(stream) = proxy.client_stream(stream, peer).await else { return };
                proxy.serve_client(stream, peer, Arc::new(std::sync::Mutex::new(Some(slot)))).await;
            });
        }
    }

    /// A place for a new client connection under the global and per-client limits, or
    /// `None` (logged) when it must be refused.
    fn admit(&self, peer: SocketAddr) -> Option<Slot> {
        let Ok(permit) = self.connections.clone().try_acquire_owned() else {
            tracing::warn!("connection limit reached; refusing {peer}");
            return None;
        };
        let limit = self.generation().config.proxy.limits.max_connections_per_client;
        let Some(per_client) = PerClient::enter(&self.per_client, peer.ip(), limit) else {
            tracing::warn!("{} has {limit} connections open; refusing another", peer.ip());
            return None;
        };
        Some(Slot::new(permit, per_client, &self.ops.metrics.connections))
    }

    async fn serve_client(self: Arc<Self>, stream: hop::ClientStream, peer: SocketAddr, slot: HeldSlot) {
        let generation = self.generation();
        let limits = generation.config.proxy.limits.clone();
        if let Some(refusal) = handler::client_refusal(&generation.config, peer) {
            // Read the request before refusing, so the client sees the 403 rather than
            // a reset; nothing else is done for it.
            let proxy = self.clone();
            let service = service_fn(move |req| {
                let resp = handler::refuse_request(&proxy, &generation, peer, None, &req, refusal.clone());
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let mut builder = server_builder(&limits);
            builder.keep_alive(false).header_read_timeout(limits.header_read_timeout);
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
            return;
        }
        let _ = stream.set_nodelay(true);
        let cert = stream.client_cert();
        let stream = framing::Guarded::new(stream, &limits);
        let conn = handler::Connection {
            proxy: self,
            peer,
            cert,
            slot,
            gate: stream.gate(),
            budget: fanout::ConnBudget::new(limits.max_upstream_per_connection),
        };
        let conn = Arc::new(conn);
        let service = service_fn(move |req| handler::serve(conn.clone(), req));
        let conn = server_builder(&limits).serve_connection(TokioIo::new(stream), service).with_upgrades();
        if let Err(e) = conn.await {
            tracing::debug!("client {peer}: {e}");
        }
    }
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Raise the open-file limit to its hard maximum (as servers do), and warn when the
/// connection limits could still run it out: then the accept loop backs off while
/// descriptors are short, but nobody new gets in meanwhile.
fn check_fd_budget(limits: &crate::config::Limits) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    // Each client connection may hold one more descriptor for its tunnel's upstream.
    let needed = 2 * limits.max_connections as u64 + limits.max_upstream_connections as u64 + 64;
    if lim.rlim_cur < needed {
        tracing::warn!(
            "open-file limit {} is below what [proxy.limits] allow ({needed}: 2 x max_connections + max_upstream_connections + 64); lower them or raise the limit (ulimit -n, LimitNOFILE=)",
            lim.rlim_cur
        );
    }
}

/// What a reload cannot change in a running process.
fn restart_needed(old: &Config, new: &Config) -> Option<&'static str> {
    let (a, b) = (old.proxy.listen, new.proxy.listen);
    if a.ip() != b.ip() || (a.port() != b.port() && b.port() != 0) {
        return Some("[proxy] port or bind");
    }
    if old.proxy.ca_dir != new.proxy.ca_dir {
        return Some("[proxy] ca_dir");
    }
    if old.proxy.tls != new.proxy.tls || old.proxy.tls_names != new.proxy.tls_names {
        return Some("[proxy] tls or tls_names");
    }
    if old.admin != new.admin {
        return Some("[admin] listen");
    }
    if old.proxy.log_requests != new.proxy.log_requests
        || old.proxy.log_file != new.proxy.log_file
        || old.proxy.hmac_key_file != new.proxy.hmac_key_file
    {
        return Some("[proxy.logging]");
    }
    if old.telemetry.otlp_endpoint != new.telemetry.otlp_endpoint
        || old.telemetry.service_name != new.telemetry.service_name
    {
        return Some("[telemetry]");
    }
    if old.proxy.limits.max_connections != new.proxy.limits.max_connections {
        return Some("[proxy.limits] max_connections");
    }
    if old.proxy.limits.max_upstream_connections != new.proxy.limits.max_upstream_connections {
        return Some("[proxy.limits] max_upstream_connections");
    }
    None
}

/// HTTP/2 server settings for intercepted tunnels that negotiated `h2`.
fn h2_builder(limits: &crate::config::Limits) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .enable_connect_protocol()
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// HTTP/1.1 server settings shared by the proxy port and intercepted tunnels.
fn server_builder(limits: &crate::config::Limits) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        // The idle wait between keep-alive requests; the head itself is timed by
        // `framing::Guarded` with `header_read_timeout`.
        .header_read_timeout(limits.idle_timeout)
        .max_header_size(limits.max_header_bytes)
        .keep_alive(true);
    // hyper's default is 100 on the stack; any explicit value costs a heap allocation.
    if limits.max_headers != 100 {
        b.max_headers(limits.max_headers);
    }
    b
}
