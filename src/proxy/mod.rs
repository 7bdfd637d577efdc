//! The proxy: listeners, CONNECT, interception and forwarding — the runtime around the
//! decision.
//!
//! accept (`Proxy::serve`, `slots`, `framing`) → identify destination (`handler`: the
//! CONNECT authority or absolute URI, never a Host header; `destined`: a connection that
//! arrived without CONNECT; `transparent`: one nftables redirected) → decide (`Config::decide`) → tunnel blind or intercept
//! (`tunnel`) → each request in phases (`exchange`) → log.

pub(crate) mod agent_auth;
mod answered;
mod body;
mod builders;
mod capped;
pub(crate) mod client;
pub mod corporate;
mod destined;
mod drain;
mod exchange;
mod fanout;
pub(crate) mod framing;
mod generation;
pub(crate) mod h1;
mod h2_client;
mod h2_server;
mod h2_streams;
pub(crate) mod h2guard;
mod handler;
mod held;
pub(crate) mod hop;
mod linger;
mod own_socket;
mod park;
mod pool;
mod respond;
mod route;
mod send_deadline;
pub mod shards;
mod slots;
mod token_client;
mod trailers;
mod transparent;
mod tunnel;
mod upgrade;
pub mod upstream;
mod wsframes;
mod wsscreen;

use builders::server_builder;
pub use destined::original_destination;
pub use drain::{ExchangeGuard, Exchanges};
pub use generation::Generation;
use send_deadline::SendDeadline;
pub use slots::{HeldSlot, Slot};

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::crypto::CryptoProvider;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::ca::CertAuthority;
use crate::config::Config;
use crate::telemetry::audit::Audit;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Why a proxy could not start, or a config could not be put in force.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    UpstreamTls(#[from] upstream::TlsSetupError),
    #[error("credential {name}: {source}")]
    CredentialTls { name: String, source: upstream::TlsSetupError },
    #[error("hmac_key_file {0}")]
    HmacKey(#[from] crate::telemetry::audit::KeyFileError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::store::StoreError),
    #[error("cannot open log_file {path}: {source}")]
    LogFile { path: String, source: std::io::Error },
    #[error("{0}")]
    Spans(#[from] crate::telemetry::otlp::EndpointError),
    #[error("[telemetry] otlp_endpoint: this build has no OTLP exporter (cargo feature otlp)")]
    NoSpanExporter,
    #[error("{0}")]
    TlsHop(#[from] hop::HopError),
    #[error("{0} changed: that needs a restart; still running the previous config")]
    RestartNeeded(&'static str),
}

pub struct Proxy {
    current: RwLock<Arc<Generation>>,
    pub ca: Arc<CertAuthority>,
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    provider: Arc<CryptoProvider>,
    own_sockets: Vec<SocketAddr>,
    connections: Arc<Semaphore>,
    per_client: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    pub exchanges: Arc<Exchanges>,
    /// Upstream connections opened for requests, all generations together.
    budget: Arc<fanout::Budget>,
    /// Bumped by every reload, so open blind tunnels check themselves against it.
    reloads: tokio::sync::watch::Sender<u64>,
    /// Config and CA loaded and the listener serving (`/readyz`).
    ready: std::sync::atomic::AtomicBool,
    /// `[proxy] tls`: the TLS side of the proxy port.
    hop: Option<hop::TlsHop>,
    /// Token root key, revocation list and verified-token cache (`crate::token`).
    pub tokens: Arc<crate::token::state::TokenState>,
    /// Connections held for a person's answer, and the answers that stand (SPEC 10).
    pub approvals: Arc<crate::approvals::Approvals>,
    /// The admin token, once the admin listener has read or created it (it signs the
    /// approvals webhook).
    pub admin_token: std::sync::OnceLock<Arc<[u8]>>,
    /// Where accepted connections are served (set by the binary); unset, on the
    /// runtime that accepted them.
    pub shards: std::sync::OnceLock<shards::Shards>,
}

impl Proxy {
    pub fn new(
        config: Config,
        ca: Arc<CertAuthority>,
        provider: Arc<CryptoProvider>,
        own_sockets: Vec<SocketAddr>,
    ) -> Result<Arc<Self>, ProxyError> {
        let audit = if config.proxy.log_requests {
            let key = match &config.proxy.hmac_key_file {
                Some(path) => Some(crate::telemetry::audit::read_hmac_key(path)?),
                None => None,
            };
            Audit::open(&config.proxy.log_file, key, config.proxy.on_log_error).map_err(|source| {
                ProxyError::LogFile { path: config.proxy.log_file.display().to_string(), source }
            })?
        } else {
            Audit::off()
        };
        let spans = match &config.telemetry.otlp_endpoint {
            #[cfg(feature = "otlp")]
            Some(endpoint) => Some(crate::telemetry::otlp::Exporter::start(
                endpoint,
                config.telemetry.service_name.clone(),
            )?),
            #[cfg(not(feature = "otlp"))]
            Some(_) => {
                return Err(ProxyError::NoSpanExporter);
            }
            None => None,
        };
        let connections = Arc::new(Semaphore::new(config.proxy.limits.max_connections));
        slots::check_fd_budget(&config.proxy.limits);
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
        let mut telemetry = crate::telemetry::Telemetry::new(audit, spans);
        if let Some(settings) = &generation.config.cluster {
            telemetry.shared = Some(crate::cluster::join(settings, &telemetry.metrics, &tokens)?);
        }
        let shared_approvals = telemetry
            .shared
            .as_ref()
            .map(|s| crate::cluster::approvals::SharedApprovals::new(s.store().clone()));
        let approvals =
            crate::approvals::Approvals::new(generation.config.approvals_path(), shared_approvals);
        Ok(Arc::new(Proxy {
            current: RwLock::new(Arc::new(generation)),
            ca,
            telemetry: Arc::new(telemetry),
            provider,
            own_sockets,
            connections,
            per_client,
            exchanges,
            budget,
            reloads: tokio::sync::watch::Sender::new(0),
            ready: Default::default(),
            hop,
            tokens,
            approvals,
            admin_token: Default::default(),
            shards: Default::default(),
        }))
    }

    /// Serving: `/readyz` answers 200 from now on.
    pub fn set_ready(&self) {
        self.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Relaxed)
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
    pub fn reload(&self, mut config: Config) -> Result<(), ProxyError> {
        let old = self.generation();
        let was = &old.config;
        if let Some(what) = crate::config::restart::restart_needed(was, &config) {
            return Err(ProxyError::RestartNeeded(what));
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
            let (stream, peer) = accept(&listener, &mut backoff, "accept").await;
            let Some(slot) = self.admit(peer) else { continue };
            let proxy = self.clone();
            self.spawn_serving(stream, move |stream, seat| async move {
                let slot = slot.seated(seat);
                let Some(stream) = proxy.client_stream(stream, peer).await else { return };
                proxy.serve_client(stream, peer, Arc::new(std::sync::Mutex::new(Some(slot)))).await;
            });
        }
    }

    /// Run `accept_loop` over `listener` on the first shard, or (no shards) on this
    /// runtime. Aborting the handle closes the listener.
    pub fn spawn_accept<F, Fut>(
        &self,
        listener: TcpListener,
        accept_loop: F,
    ) -> std::io::Result<tokio::task::JoinHandle<std::io::Result<()>>>
    where
        F: FnOnce(TcpListener) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
    {
        match self.shards.get() {
            Some(shards) => shards.accept_loop(listener, accept_loop),
            None => Ok(tokio::spawn(accept_loop(listener))),
        }
    }

    /// Serve an accepted connection on a shard, or (no shards) on this runtime.
    pub(crate) fn spawn_serving<F, Fut>(&self, stream: tokio::net::TcpStream, serve: F)
    where
        F: FnOnce(tokio::net::TcpStream, shards::Seat) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        match self.shards.get() {
            Some(shards) => shards.serve(stream, serve),
            None => drop(tokio::spawn(serve(stream, shards::Seat::none()))),
        }
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
        // Every write to the client is timed from here down: plain-HTTP answers, and the
        // tunnels a CONNECT opens (intercepted or blind) carry this socket on.
        let stream = SendDeadline::new(stream, limits.idle_timeout);
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

/// The next connection on `listener`, for every accept loop (proxy port, transparent
/// listener). EMFILE and friends: back off, longer each time, instead of spinning (and
/// logging) while descriptors are short; `what` names the listener in the warning.
async fn accept(
    listener: &TcpListener,
    backoff: &mut Duration,
    what: &str,
) -> (tokio::net::TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(x) => {
                *backoff = ACCEPT_BACKOFF_MIN;
                return x;
            }
            Err(e) => {
                if *backoff == ACCEPT_BACKOFF_MIN {
                    tracing::warn!("{what} failed: {e}; backing off");
                }
                tokio::time::sleep(*backoff).await;
                *backoff = (*backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}
