//! Inside a CONNECT tunnel. One latchkey intercepts: TLS with a leaf for the tunnel's
//! host (refusing a ClientHello that names another host), or plain HTTP when the tunnel
//! does not start with TLS. A blind one (nothing to inject or filter) is spliced —
//! unless its first bytes are an HTTP request line, which makes it plain HTTP to that
//! destination like any other (invariant 1). Either way the destination stays the
//! tunnel's, while each request is decided by the configuration in force when it
//! arrives (invariant 10).

use std::future::{Future, ready};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::Either;
use http::header::HeaderValue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;

use super::capped::Capped;
use super::exchange;
use super::fanout::{self, ConnBudget};
use super::framing::{self, Gate};
use super::h1;
use super::handler;
use super::linger::ClientBody;
use super::park;
use super::respond::{self, Protocol};
use super::route::Route;
use super::{Body, Generation, Proxy};
use crate::policy::{Decision, Destination, Host, Question, Refusal, RefusalKind, Verdict};
use crate::telemetry::metrics::{KindLabel, ResultLabel};
use crate::telemetry::record::{self, Path};

const TLS_HANDSHAKE: u8 = 0x16;

/// The first read of an intercepted tunnel: rustls' own read size.
const FIRST_READ: usize = 4096;

/// How long a blind tunnel waits for the client's first bytes before letting the
/// upstream speak first (SMTP, SSH and database banners).
const PEEK: Duration = Duration::from_millis(300);

/// Who opened a tunnel: kept to admit each request again under a newer config.
#[derive(Clone)]
pub struct Opener {
    pub peer: SocketAddr,
    pub identity: Identity,
}

/// How a tunnel's client said who it is.
#[derive(Clone)]
pub enum Identity {
    /// What the CONNECT presented: its `Proxy-Authorization` (marked sensitive; never
    /// logged) and the client certificate of a `[proxy] tls` port.
    ProxyAuth { header: Option<HeaderValue>, cert: Option<super::agent_auth::ClientCert> },
    /// A connection that arrived without CONNECT (the jail) carries the agent it was
    /// started for, by name.
    Named(Option<String>),
}

/// A connection's served part, boxed: what it took to get there is freed by then.
type Serving = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

pub async fn intercept<S>(
    proxy: Arc<Proxy>,
    generation: Arc<Generation>,
    opener: Opener,
    agent: Option<usize>,
    dest: Destination,
    person: Verdict,
    client: S,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _open = TunnelGauge::open(&proxy, "intercepted");
    // Two boxes, one after the other: the first read and the TLS handshake take several
    // KiB of state, which an `async fn` would keep in the connection's task for life
    // (the largest state any of its awaits needs); served, a connection holds a pointer.
    let opening = Box::pin(open_intercepted(proxy, generation, opener, agent, dest, person, client));
    let opened = opening.await;
    if let Some(serving) = opened {
        serving.await;
    }
}

/// The first byte read, the TLS handshake done: what serves the connection from here.
async fn open_intercepted<S>(
    proxy: Arc<Proxy>,
    generation: Arc<Generation>,
    opener: Opener,
    agent: Option<usize>,
    dest: Destination,
    person: Verdict,
    client: S,
) -> Option<Serving>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = generation.config.proxy.limits.clone();
    // `client` is under `SendDeadline` already: the proxy port and `serve_admitted` put
    // every client socket there.
    let mut io = Capped::new(client, limits.max_tunnel_bytes);
    let first = match tokio::time::timeout(limits.header_read_timeout, first_bytes(&mut io)).await {
        Ok(Ok(first)) if !first.is_empty() => first,
        _ => return None,
    };
    let tls = first[0] == TLS_HANDSHAKE;
    let io = Prefixed::new(first, io);
    let peer = opener.peer;
    if !tls {
        let route = Route::new(&generation.config, dest, false, true, None, peer, agent).answered(person);
        return Some(Box::pin(serve_h1(Conn::new(proxy, &generation, opener, route), io)));
    }
    // Boxed: rustls' connection twice over while the handshake builds it.
    let handshaking = Box::pin(handshake(&proxy, &dest, &limits, peer, io));
    let (tls, misdirected) = handshaking.await?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let route = Route::new(&generation.config, dest, true, true, misdirected, peer, agent).answered(person);
    let conn = Conn::new(proxy, &generation, opener, route);
    if h2 { Some(Box::pin(serve_h2(conn, tls))) } else { Some(Box::pin(serve_h1(conn, tls))) }
}

/// As much as has come, not one byte: a whole ClientHello is usually there, and the
/// handshake reads it from the copy without another syscall. The buffer is on the stack
/// of each poll, not in the waiting future: a tunnel opened and left silent holds no
/// 4 KiB while it waits (nor is the buffer zeroed: it is read into uninitialised).
async fn first_bytes<S: AsyncRead + Unpin>(io: &mut S) -> io::Result<Vec<u8>> {
    std::future::poll_fn(|cx| {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); FIRST_READ];
        let mut read = ReadBuf::uninit(&mut buf);
        std::task::ready!(Pin::new(&mut *io).poll_read(cx, &mut read))?;
        Poll::Ready(Ok(read.filled().to_vec()))
    })
    .await
}

/// The client's TLS handshake, with a leaf certificate for `dest`; the stream and, when
/// the client's SNI names another host, why its requests are misdirected.
async fn handshake<S>(
    proxy: &Proxy,
    dest: &Destination,
    limits: &crate::config::Limits,
    peer: SocketAddr,
    io: S,
) -> Option<(tokio_rustls::server::TlsStream<S>, Option<String>)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let accept = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let start = tokio::time::timeout(limits.header_read_timeout, accept).await.ok()?.ok()?;
    let misdirected = start.client_hello().server_name().and_then(|sni| match Host::parse(sni) {
        Ok(h) if h == dest.host => None,
        _ => Some(format!("TLS SNI {sni:?} does not name the tunnel's host {}", dest.host)),
    });
    let (config, hit) = proxy.ca.server_config_counted(&dest.host);
    let metrics = &proxy.telemetry.metrics;
    metrics.leaf_cache.get_or_create(&ResultLabel { result: if hit { "hit" } else { "miss" } }).inc();
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cannot mint a certificate for {}: {e}", dest.host);
            return None;
        }
    };
    let handshake = tokio::time::timeout(limits.header_read_timeout, start.into_stream(config)).await;
    let result = if matches!(handshake, Ok(Ok(_))) { "ok" } else { "failed" };
    metrics.handshakes.get_or_create(&ResultLabel { result }).inc();
    match handshake {
        Ok(Ok(s)) => Some((s, misdirected)),
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake with {peer} for {dest} failed: {e}");
            None
        }
        Err(_) => None,
    }
}

/// What the requests of one intercepted connection share.
struct Conn {
    proxy: Arc<Proxy>,
    opener: Opener,
    /// The tunnel's route, as admitted under the generation it names.
    route: Mutex<(Weak<Generation>, Arc<Route>)>,
    budget: ConnBudget,
    /// HTTP/1.1 only: where the framing guard learns whether an upgrade happened.
    gate: Option<Arc<Gate>>,
}

impl Conn {
    fn new(proxy: Arc<Proxy>, generation: &Arc<Generation>, opener: Opener, route: Route) -> Conn {
        let budget = ConnBudget::new(generation.config.proxy.limits.max_upstream_per_connection);
        let route = Mutex::new((Arc::downgrade(generation), Arc::new(route)));
        Conn { proxy, opener, route, budget, gate: None }
    }

    /// The route for a request under `generation`: the tunnel's destination, TLS and
    /// SNI verdict stay; the agent is admitted again, and the credentials naming the host
    /// found again, when the config changed since.
    fn route(&self, generation: &Arc<Generation>) -> Result<Arc<Route>, (Refusal, Arc<Route>)> {
        let mut cached = self.route.lock().unwrap_or_else(|p| p.into_inner());
        if Weak::ptr_eq(&cached.0, &Arc::downgrade(generation)) {
            return Ok(cached.1.clone());
        }
        let old = cached.1.clone();
        let agent = handler::admit(&generation.config, &self.opener).map_err(|r| (r, old.clone()))?;
        *cached = (Arc::downgrade(generation), Arc::new(old.under(&generation.config, agent)));
        Ok(cached.1.clone())
    }

    /// One request: decided by the generation in force now, on this connection's
    /// budget of upstream connections.
    ///
    /// Not an `async fn`: what is decided before the exchange is done before the future
    /// is made, which then holds the exchange's box and little else (an `async fn`'s
    /// future kept the request twice while the exchange ran).
    fn answer(self: Arc<Self>, req: Request<ClientBody>) -> impl Future<Output = Response<Body>> + Send {
        let generation = self.proxy.generation();
        let switching = (self.gate.is_some() && framing::may_switch(&req)).then(|| req.method().clone());
        let peer = self.opener.peer;
        let answered = match (self.route(&generation), framing::refused(req.headers())) {
            (Err((r, route)), _) => {
                let rec = request_record(&route, &req);
                Either::Left(ready(handler::log_refusal(&self.proxy, rec, &r, Protocol::of(req.headers()))))
            }
            (Ok(route), Some((why, line))) => {
                Either::Left(ready(handler::refuse_head(&self.proxy, peer, Some(&route), why, &line)))
            }
            (Ok(route), None) => {
                let handled = exchange::handle(self.proxy.clone(), generation, route, req);
                Either::Right(fanout::scope(self.budget.clone(), handled).map(|Ok(resp)| resp))
            }
        };
        answered.map(move |resp| {
            if let (Some(method), Some(gate)) = (switching, &self.gate) {
                gate.answer(framing::switched(&method, &resp));
            }
            resp
        })
    }
}

/// The record of a request refused on an open tunnel.
fn request_record<B>(route: &Route, req: &Request<B>) -> crate::telemetry::Record {
    let scheme = if route.tls { "https" } else { "http" };
    let method = record::method(req.method());
    let mut rec = crate::telemetry::Record::new(
        route.peer.ip(),
        method,
        scheme,
        route.host_text.clone(),
        route.dest.port,
    );
    let target =
        req.uri().path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    rec.path = Some(Path::Target(target));
    rec
}

fn limits(conn: &Conn) -> crate::config::Limits {
    conn.proxy.generation().config.proxy.limits.clone()
}

/// Not an `async fn`, as `serve_h1` is not: its arguments would stay in the future.
fn serve_h2<S>(conn: Conn, stream: S) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = limits(&conn);
    // SETTINGS and PING floods, which h2 would answer without end.
    let stream = super::h2guard::H2Guard::new(stream, conn.opener.peer);
    let conn = Arc::new(conn);
    let service = move |req| conn.clone().answer(req);
    super::h2_server::serve(stream, &limits, service)
}

/// HTTP/1.1 behind the framing guard, which learns from the service whether an upgrade
/// happened. latchkey's own server (`h1`) serves the requests it takes; from a request
/// it does not, hyper serves the connection until it rests (`park`), and gives it back.
///
/// Not an `async fn`: its arguments would stay in the future beside the guarded stream
/// made of them, for the connection's life (~1.3 KiB each, idle ones included).
fn serve_h1<S>(mut conn: Conn, stream: S) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = limits(&conn);
    // Boxed: the futures that serve it in turn then each hold a pointer, not a copy's room.
    let mut stream = Box::new(framing::Guarded::new(stream, &limits));
    conn.gate = Some(stream.gate());
    let rest = stream.rest();
    let conn = Arc::new(conn);
    let settings = h1::Settings {
        idle_timeout: limits.idle_timeout,
        max_headers: limits.max_headers,
        max_header_bytes: limits.max_header_bytes,
    };
    async move {
        let mut between_requests = false;
        loop {
            let own = conn.clone();
            let service = move |req| own.clone().answer(req);
            let parked = &conn.proxy.telemetry.metrics.parked;
            // Boxed, and in a statement of its own: a future built in the awaiting
            // statement keeps room in this one's state too.
            let own = Box::pin(h1::serve(stream, between_requests, &settings, parked, service));
            let served = own.await;
            stream = match served {
                h1::Served::Closed => return,
                h1::Served::Hyper(stream) => stream,
            };
            let hyper = Box::pin(serve_hyper(&conn, stream, &rest, &limits));
            match hyper.await {
                Some(back) => stream = back,
                None => return,
            }
            between_requests = true;
        }
    }
}

/// hyper serves the connection until it ends (`None`) or rests for `PARK_AFTER`: then it
/// lets go of it and its buffers, and the stream comes back.
async fn serve_hyper<S>(
    conn: &Arc<Conn>,
    stream: Box<framing::Guarded<S>>,
    rest: &Arc<park::Rest>,
    limits: &crate::config::Limits,
) -> Option<Box<framing::Guarded<S>>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (served_conn, busy) = (conn.clone(), rest.clone());
    let service = service_fn(move |req: Request<Incoming>| {
        let busy = busy.busy();
        let conn = served_conn.clone();
        async move {
            let resp = conn.answer(req.map(Into::into)).await;
            Ok::<_, std::convert::Infallible>(resp.map(|body| park::BusyBody::new(body, busy)))
        }
    });
    let builder = super::builders::server_builder(limits);
    // Boxed: a connection back with the own server holds no room for hyper's state.
    let mut served = Box::new(builder.serve_connection(TokioIo::new(stream), service).with_upgrades());
    loop {
        let seen = rest.activity();
        tokio::select! {
            biased;
            done = &mut *served => {
                if let Err(e) = done {
                    tracing::debug!("tunnel: {e}");
                }
                return None;
            }
            () = tokio::time::sleep(park::PARK_AFTER) => {}
        }
        if rest.activity() == seen && rest.at_rest() {
            break;
        }
    }
    let parts = served.into_parts()?;
    let mut stream = parts.io.into_inner();
    // What hyper read and did not use; its buffer (and the rest of `parts`) is freed here.
    stream.unread(&parts.read_buf);
    Some(stream)
}

/// A tunnel to a known destination, decided and made ready before a byte of it is
/// read: what a CONNECT and a connection the jail redirected share.
pub enum Tunnel {
    /// Spliced (nothing applies to its host): the upstream is connected already.
    Blind(Blind, TcpStream),
    /// Opened: each request inside is decided on its own.
    Intercept {
        proxy: Arc<Proxy>,
        generation: Arc<Generation>,
        opener: Opener,
        agent: Option<usize>,
        dest: Destination,
        /// What a person answered about it (`on_unlisted = "ask"`): its requests carry it.
        person: Verdict,
    },
}

impl Tunnel {
    /// Decide with no request head; a blind tunnel's upstream is connected, an
    /// intercepted one's addresses checked against the SSRF rule before any TLS (the
    /// connector checks again on connect).
    pub async fn open(
        proxy: &Arc<Proxy>,
        generation: &Arc<Generation>,
        opener: Opener,
        agent: Option<usize>,
        dest: &Destination,
        started: Instant,
    ) -> Result<Tunnel, Refusal> {
        let (proxy, generation, dest) = (proxy.clone(), generation.clone(), dest.clone());
        let q = Question::now(agent, &dest, None);
        let mut decision = generation.config.decide(&q, &proxy.tokens);
        let mut person = Verdict::Unasked;
        if decision == Decision::Ask {
            // Held before any byte goes upstream (or any TLS is spoken) until a person answers.
            let asking = super::held::asking(&generation.config, &dest, agent, "CONNECT", None, None);
            person = proxy.held(&generation.config, asking).await?;
            decision = generation.config.decide(&q.answered(person), &proxy.tokens);
        }
        match decision {
            Decision::Block(r) => Err(r),
            Decision::Tunnel => {
                proxy.telemetry.log_ready()?;
                let upstream =
                    generation.dialer.connect_tcp(&dest).await.map_err(|e| respond::upstream_refusal(&e))?;
                Ok(Tunnel::Blind(Blind { proxy, generation, opener, agent, dest, started, person }, upstream))
            }
            Decision::Intercept => {
                generation.dialer.addresses(&dest).await.map_err(|e| respond::upstream_refusal(&e))?;
                Ok(Tunnel::Intercept { proxy, generation, opener, agent, dest, person })
            }
            // A question without a request head is answered with a tunnel or a refusal,
            // and one that carries a person's answer is not asked about again.
            Decision::Pass { .. } | Decision::Inject { .. } | Decision::Vend { .. } | Decision::Ask => {
                Err(Refusal::new(RefusalKind::Internal, "a tunnel was decided as a request"))
            }
        }
    }

    /// Serve the client's side.
    pub async fn serve<C>(self, client: C)
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match self {
            // Boxed: a blind tunnel's sniffing buffers stay out of intercepted tunnels' tasks.
            Tunnel::Blind(blind, upstream) => {
                let run = Box::pin(blind.run(client, upstream));
                run.await
            }
            Tunnel::Intercept { proxy, generation, opener, agent, dest, person } => {
                intercept(proxy, generation, opener, agent, dest, person, client).await
            }
        }
    }
}

/// A CONNECT latchkey splices rather than intercepts (no credential, no filter).
pub struct Blind {
    pub proxy: Arc<Proxy>,
    pub generation: Arc<Generation>,
    pub opener: Opener,
    pub agent: Option<usize>,
    pub dest: Destination,
    pub started: Instant,
    /// What a person answered about it (`on_unlisted = "ask"`).
    pub person: Verdict,
}

/// What a blind tunnel's first bytes turned out to be.
enum Sniffed {
    /// An HTTP request line: served as plain HTTP to the destination.
    Http(Vec<u8>),
    /// Anything else (TLS, SSH, a database protocol...): spliced, these bytes first.
    Other(Vec<u8>),
    /// An HTTP request line after the upstream had spoken: no HTTP server does that.
    LateHttp(Vec<u8>),
    /// The tunnel ended before its client sent anything that says.
    Ended(Option<String>),
}

impl Blind {
    pub async fn run<C>(self, client: C, upstream: TcpStream)
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let gauge = TunnelGauge::open(&self.proxy, "blind");
        let limits = self.generation.config.proxy.limits.clone();
        let deadline = tokio::time::Instant::now() + limits.tunnel_timeout;
        let mut reloads = self.proxy.reloads();
        let mut client = Capped::new(client, limits.max_tunnel_bytes);
        // The client's side is under `SendDeadline` from its accept; the upstream's here:
        // either side that takes nothing of what waits for it for `idle_timeout` ends it.
        let upstream = super::SendDeadline::upstream(upstream, limits.idle_timeout);
        let mut upstream = Capped::new(upstream, None);
        let sniffed = tokio::select! {
            s = tokio::time::timeout_at(deadline, sniff(&mut client, &mut upstream, &limits)) => {
                s.unwrap_or_else(|_| Sniffed::Ended(Some(timed_out(&limits))))
            }
            r = refused_by_reload(&self.proxy, &self.opener, &self.dest, &mut reloads) => {
                Sniffed::Ended(Some(format!("cut by a reload: {}", r.message)))
            }
        };
        let mut first = match sniffed {
            Sniffed::Other(first) => first,
            Sniffed::Http(first) => {
                drop(gauge);
                return self.serve_http(client, first).await;
            }
            Sniffed::LateHttp(first) => return self.refuse_late_http(client, first, &upstream).await,
            Sniffed::Ended(why) => return self.log(why, &client, &upstream),
        };
        if first.first() == Some(&TLS_HANDSHAKE) {
            // Invariant 1 holds in a blind tunnel too: a ClientHello naming another host
            // (domain fronting past a blocklist) is refused before a byte goes up.
            let sni = match super::destined::read_client_hello(&mut client, &mut first, &limits).await {
                Ok(hello) => hello.sni,
                Err(super::destined::Stalled) => {
                    return self.log(Some("the ClientHello never completed".into()), &client, &upstream);
                }
            };
            let config = &self.generation.config;
            let tokens = &self.proxy.tokens;
            if let Some(r) =
                super::destined::sni_refusal(config, tokens, self.agent, &self.dest, sni.as_deref())
            {
                let _ = client.write_all(&super::destined::TLS_ACCESS_DENIED).await;
                let rec =
                    handler::tunnel_record(config, self.opener.peer, self.agent, &self.dest, self.started);
                handler::log_refusal(&self.proxy, rec, &r, Protocol::Http);
                return;
            }
        }
        let relay = async {
            upstream.write_all(&first).await?;
            tokio::io::copy_bidirectional(&mut client, &mut upstream).await.map(|_| ())
        };
        let why = tokio::select! {
            r = tokio::time::timeout_at(deadline, relay) => match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("ended by an error: {e}")),
                Err(_) => Some(timed_out(&limits)),
            },
            r = refused_by_reload(&self.proxy, &self.opener, &self.dest, &mut reloads) => {
                Some(format!("cut by a reload: {}", r.message))
            }
        };
        self.log(why, &client, &upstream);
    }

    /// The tunnel's one `tunnelled` line, with the bytes it carried however it ended.
    fn log<C, U>(&self, why: Option<String>, client: &Capped<C>, upstream: &Capped<U>) {
        let config = &self.generation.config;
        let mut rec = handler::tunnel_record(config, self.opener.peer, self.agent, &self.dest, self.started);
        rec.status = Some(200);
        rec.decision = if config.policy.warned(&self.dest) { "warned" } else { "tunnelled" };
        rec.reason = why.map(Into::into);
        rec.bytes_up = upstream.moved().1;
        rec.bytes_down = client.moved().1;
        self.proxy.telemetry.finish(&rec, None, None);
    }

    /// Plain HTTP in a blind tunnel: the same rules as any plain HTTP to this
    /// destination (CONNECT inside refused, credentials only with `allow_http`...).
    async fn serve_http<C>(self, client: Capped<C>, first: Vec<u8>)
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let _open = TunnelGauge::open(&self.proxy, "intercepted");
        let route =
            Route::new(&self.generation.config, self.dest, false, true, None, self.opener.peer, self.agent)
                .answered(self.person);
        let conn = Conn::new(self.proxy.clone(), &self.generation, self.opener, route);
        let serving = Box::pin(serve_h1(conn, Prefixed::new(first, client)));
        serving.await;
    }

    async fn refuse_late_http<C, U>(self, mut client: Capped<C>, first: Vec<u8>, upstream: &Capped<U>)
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let r = Refusal::bad_request(format!(
            "plain HTTP sent into a tunnel to {} after the server spoke first; that is no HTTP server, and latchkey does not relay HTTP blind",
            self.dest
        ));
        let limits = &self.generation.config.proxy.limits;
        respond::on_stream(Prefixed::new(first, &mut client), r.clone(), limits).await;
        let config = &self.generation.config;
        let mut rec = handler::tunnel_record(config, self.opener.peer, self.agent, &self.dest, self.started);
        rec.bytes_down = client.moved().1;
        rec.bytes_up = upstream.moved().1;
        handler::log_refusal(&self.proxy, rec, &r, Protocol::Http);
    }
}

fn timed_out(limits: &crate::config::Limits) -> String {
    format!("tunnel_timeout ({}s) reached", limits.tunnel_timeout.as_secs())
}

/// Read the client's first bytes until they say whether they are an HTTP request line.
/// The upstream may speak first: after `PEEK` of client silence, what it sends is
/// relayed to the client meanwhile.
async fn sniff<C, U>(client: &mut C, upstream: &mut U, limits: &crate::config::Limits) -> Sniffed
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + Unpin,
{
    let mut first = Vec::new();
    let mut spoke = false;
    let peek = tokio::time::sleep(PEEK);
    tokio::pin!(peek);
    let mut peeked = false;
    // A line that starts like a request must end within the head timeout.
    let mut head_by: Option<tokio::time::Instant> = None;
    let (mut up, mut down) = ([0u8; 4096], [0u8; 8192]);
    loop {
        let head_late = async {
            match head_by {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = client.read(&mut up) => match r {
                Ok(0) => return Sniffed::Ended(None),
                Err(e) => return Sniffed::Ended(Some(format!("ended by an error: {e}"))),
                Ok(n) => {
                    first.extend_from_slice(&up[..n]);
                    head_by.get_or_insert(tokio::time::Instant::now() + limits.header_read_timeout);
                    match looks_like_http(&first, limits.max_header_bytes) {
                        Some(true) if spoke => return Sniffed::LateHttp(first),
                        Some(true) => return Sniffed::Http(first),
                        Some(false) => return Sniffed::Other(first),
                        None => {}
                    }
                }
            },
            r = upstream.read(&mut down), if peeked => match r {
                // The upstream closed or failed: splicing passes that on.
                Ok(0) | Err(_) => return Sniffed::Other(first),
                Ok(n) => {
                    if let Err(e) = client.write_all(&down[..n]).await {
                        return Sniffed::Ended(Some(format!("ended by an error: {e}")));
                    }
                    spoke = true;
                }
            },
            _ = &mut peek, if !peeked => peeked = true,
            _ = head_late => return if spoke { Sniffed::Other(first) } else { Sniffed::Http(first) },
        }
    }
}

/// Whether bytes are the start of an HTTP/1 request line (`METHOD SP target SP
/// HTTP/`): `None` while they could still become one. TLS, SSH banners, binary
/// protocols and HTTP/2's `PRI * HTTP/2.0` preface (h2c: relayed as is, like any other
/// protocol) are not.
fn looks_like_http(b: &[u8], max_head: usize) -> Option<bool> {
    const MAX_METHOD: usize = 32;
    let tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    let method = b.iter().take_while(|&&c| tchar(c)).count();
    match b.get(method) {
        None if method <= MAX_METHOD => return None,
        Some(b' ') if method > 0 && method <= MAX_METHOD => {}
        _ => return Some(false),
    }
    let rest = &b[method + 1..];
    let target = rest.iter().take_while(|&&c| !matches!(c, b' ' | b'\r' | b'\n')).count();
    match rest.get(target) {
        None if b.len() > max_head => return Some(true), // the guard refuses it (431)
        None => return None,
        Some(b' ') if target > 0 => {}
        _ => return Some(false),
    }
    if &b[..method] == b"PRI" && &rest[..target] == b"*" {
        return Some(false);
    }
    let version = &rest[target + 1..];
    let n = version.len().min(5);
    if version[..n] != b"HTTP/"[..n] {
        return Some(false);
    }
    (n == 5).then_some(true)
}

/// Wait for a reload under which this tunnel's CONNECT would be refused (its client,
/// agent or destination no longer allowed): its refusal.
async fn refused_by_reload(
    proxy: &Proxy,
    opener: &Opener,
    dest: &Destination,
    reloads: &mut tokio::sync::watch::Receiver<u64>,
) -> Refusal {
    loop {
        if reloads.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        let config = &proxy.generation().config;
        let refusal = match handler::admit(config, opener) {
            Err(r) => Some(r),
            Ok(agent) => match config.decide(&Question::now(agent, dest, None), &proxy.tokens) {
                Decision::Block(r) => Some(r),
                _ => None,
            },
        };
        if let Some(r) = refusal {
            return r;
        }
    }
}

/// Counts a tunnel in `latchkey_tunnels{kind}` while it is alive.
pub struct TunnelGauge(prometheus_client::metrics::gauge::Gauge);

impl TunnelGauge {
    pub fn open(proxy: &Proxy, kind: &'static str) -> TunnelGauge {
        let g = proxy.telemetry.metrics.tunnels.get_or_create(&KindLabel { kind }).clone();
        g.inc();
        TunnelGauge(g)
    }
}

impl Drop for TunnelGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A stream with the bytes latchkey peeked at put back in front.
pub(super) struct Prefixed<T> {
    first: Vec<u8>,
    at: usize,
    inner: T,
}

impl<T> Prefixed<T> {
    pub(super) fn new(first: Vec<u8>, inner: T) -> Self {
        Prefixed { first, at: 0, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.first.len() {
            let n = buf.remaining().min(this.first.len() - this.at);
            buf.put_slice(&this.first[this.at..this.at + n]);
            this.at += n;
            if this.at == this.first.len() {
                this.first = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    // Forwarded so that rustls' records (a handshake flight, a download's 16 KiB
    // records) leave in one `writev`, not one syscall and one segment each.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::looks_like_http;

    /// An intercepted tunnel's TLS writes through `Prefixed<Capped<_>>`: each layer
    /// passes vectored writes on, or every record of a flight costs a syscall.
    #[tokio::test]
    async fn the_intercepted_stream_keeps_vectored_writes() {
        use tokio::io::AsyncWrite;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let io = super::Prefixed::new(vec![0x16], super::Capped::new(tcp, None));
        assert!(io.is_write_vectored());
    }

    #[test]
    fn only_an_http_request_line_is_http() {
        for (bytes, want) in [
            (&b"GET / HTTP/1.1\r\n"[..], Some(true)),
            (b"CONNECT api.openai.com:443 HTTP/1.1\r\n", Some(true)),
            (b"GET / HTTP/", Some(true)),
            (b"GET / HT", None),
            (b"GET", None),
            (b"", None),
            (b"\x16\x03\x01\x02\x00", Some(false)),
            (b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n", Some(false)),
            (b"EHLO client.example\r\n", Some(false)),
            (b"*1\r\n$4\r\nPING\r\n", Some(false)),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Some(false)),
            (b"GET /\r\n", Some(false)),
            (b"GET  / HTTP/1.1", Some(false)),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Some(false)),
        ] {
            assert_eq!(looks_like_http(bytes, 1024), want, "{}", String::from_utf8_lossy(bytes));
        }
        let long = [b"GET /".as_slice(), &[b'a'; 2000]].concat();
        assert_eq!(looks_like_http(&long, 1024), Some(true), "past the head limit: refused as HTTP");
    }
}
