//! Connections whose destination is already known: a CONNECT (the authority), and a
//! TCP stream the kernel redirected to latchkey with its original destination (the
//! jail of `exec --jail`, transparent mode). Both join the normal flow at "identify
//! destination" and share what follows: the decision, the blind tunnel, interception
//! and the log line.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::{Generation, Proxy, respond};
use crate::audit::{Record, now_ts};
use crate::config::{Config, Limits};
use crate::policy::{ConnectDecision, Destination, Host, Refusal};

const TLS_HANDSHAKE: u8 = 0x16;
/// The most ClientHello bytes read to find the SNI of a blind tunnel.
const MAX_CLIENT_HELLO: usize = 32 * 1024;

/// The decision for a tunnel to `dest`: the agent's own allowlist, then the policy.
pub(super) fn decide(config: &Config, agent: Option<usize>, dest: &Destination) -> ConnectDecision {
    match super::identity::destination_refusal(config, agent, dest) {
        Some(r) => ConnectDecision::Block(r),
        None => config.policy.decide_connect(dest),
    }
}

/// The `blocked` log line (and the operational one) for a refused tunnel.
pub(super) fn log_refused(
    proxy: &Proxy,
    peer: SocketAddr,
    dest: &Destination,
    agent: Option<String>,
    r: &Refusal,
    started: Instant,
) {
    let mut rec = tunnel_record(peer, dest, r.status, "blocked", Some(r.message.clone()), started);
    rec.agent = agent;
    proxy.ops.finish(&rec, None, None);
    tracing::info!(target: "latchkey::request", %dest, status = r.status, kind = r.kind, "tunnel refused");
}

/// Carry bytes both ways between the client and the upstream of a blind tunnel, under
/// the tunnel limits, then write its one `tunnelled` line.
#[allow(clippy::too_many_arguments)]
pub(super) async fn blind<C>(
    proxy: &Proxy,
    limits: &Limits,
    peer: SocketAddr,
    dest: Destination,
    agent: Option<String>,
    client: C,
    mut upstream: TcpStream,
    started: Instant,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let _gauge = super::tunnel::TunnelGauge::open(proxy, "blind");
    let mut client = super::capped::Capped::new(client, limits.max_tunnel_bytes);
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    let (up, down) = match tokio::time::timeout(limits.tunnel_timeout, copy).await {
        Ok(Ok(n)) => n,
        _ => (0, 0),
    };
    let mut rec = tunnel_record(peer, &dest, 200, "tunnelled", None, started);
    rec.agent = agent;
    rec.bytes_up = up;
    rec.bytes_down = down;
    proxy.ops.finish(&rec, None, None);
}

pub(super) fn tunnel_record(
    peer: SocketAddr,
    dest: &Destination,
    status: u16,
    decision: &'static str,
    reason: Option<String>,
    started: Instant,
) -> Record {
    Record {
        ts: now_ts(),
        client: peer.ip().to_string(),
        agent: None,
        method: "CONNECT".into(),
        scheme: "https",
        host: dest.host.to_string(),
        port: dest.port,
        path: None,
        status: Some(status),
        decision,
        reason,
        credential: None,
        bytes_up: 0,
        bytes_down: 0,
        duration_ms: started.elapsed().as_millis() as u64,
        usage: None,
    }
}

impl Proxy {
    /// Serve a TCP connection whose destination is already known (the kernel's original
    /// destination, mapped back to a name where latchkey handed out the address): exactly
    /// as `CONNECT dest` would be — same limits, policy, filters, SSRF rule, interception
    /// (the ClientHello must name `dest`), injection, redaction and log lines. `agent`
    /// is the `[agents]` identity the connection carries by construction (it cannot
    /// present Proxy-Authorization); when agents are configured and it names none, the
    /// connection is refused.
    pub async fn serve_destined(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        dest: Destination,
        agent: Option<&str>,
    ) {
        let Some(slot) = self.admit(peer) else { return };
        let _slot = slot;
        let started = Instant::now();
        let generation = self.generation();
        let _ = stream.set_nodelay(true);
        let agent = match identify(&generation.config, agent) {
            Ok(a) => a,
            Err(r) => return self.refuse_stream(&generation, stream, peer, &dest, None, r, started).await,
        };
        let agent_name = super::identity::agent_name(&generation.config, agent);
        if let Some(r) = client_refusal(&generation, peer) {
            return self.refuse_stream(&generation, stream, peer, &dest, agent_name, r, started).await;
        }
        match decide(&generation.config, agent, &dest) {
            ConnectDecision::Block(r) => {
                self.refuse_stream(&generation, stream, peer, &dest, agent_name, r, started).await
            }
            ConnectDecision::Tunnel => {
                let upstream = match generation.dialer.connect_tcp(&dest).await {
                    Ok(s) => s,
                    Err(e) => {
                        let r = respond::upstream_refusal(&e);
                        return self
                            .refuse_stream(&generation, stream, peer, &dest, agent_name, r, started)
                            .await;
                    }
                };
                self.tunnel_destined(generation, stream, upstream, peer, dest, agent, started).await
            }
            ConnectDecision::Intercept => {
                // Refuse SSRF targets before any TLS; the connector checks again on connect.
                if let Err(e) = generation.dialer.addresses(&dest).await {
                    let r = respond::upstream_refusal(&e);
                    return self
                        .refuse_stream(&generation, stream, peer, &dest, agent_name, r, started)
                        .await;
                }
                super::tunnel::intercept(self.clone(), generation, peer, agent, dest, stream).await
            }
        }
    }

    /// A destination the policy tunnels blind. What the client says first decides how:
    /// plain HTTP is served as plain HTTP to `dest` (its Host checked, like a CONNECT
    /// tunnel that does not start with TLS); TLS must name `dest` (or, for an IP
    /// destination, a host the policy would not block) in its ClientHello, or it is
    /// refused before a byte goes upstream; anything else — and a protocol where the
    /// server speaks first — is carried as is.
    #[allow(clippy::too_many_arguments)]
    async fn tunnel_destined(
        self: Arc<Self>,
        generation: Arc<Generation>,
        mut stream: TcpStream,
        upstream: TcpStream,
        peer: SocketAddr,
        dest: Destination,
        agent: Option<usize>,
        started: Instant,
    ) {
        let limits = generation.config.proxy.limits.clone();
        let agent_name = super::identity::agent_name(&generation.config, agent);
        let mut first = vec![0u8; 4096];
        let n = tokio::select! {
            r = stream.read(&mut first) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = upstream.readable() => 0,
        };
        first.truncate(n);
        // A request line may arrive a few bytes at a time: read on until it is clear
        // whether this is HTTP (so a slow writer cannot get a blind plain-HTTP tunnel).
        while n > 0 && http_undecided(&first) {
            let mut more = [0u8; 1024];
            match tokio::time::timeout(limits.header_read_timeout, stream.read(&mut more)).await {
                Ok(Ok(m)) if m > 0 => first.extend_from_slice(&more[..m]),
                _ => return,
            }
        }
        if n > 0 && looks_like_http(&first) {
            let io = Replay::new(first, stream);
            return super::tunnel::intercept(self.clone(), generation, peer, agent, dest, io).await;
        }
        if first.first() == Some(&TLS_HANDSHAKE) {
            let sni = match read_client_hello(&mut stream, &mut first, &limits).await {
                Ok(sni) => sni,
                Err(()) => return,
            };
            if let Some(r) = sni_refusal(&generation.config, agent, &dest, sni.as_deref()) {
                log_refused(&self, peer, &dest, agent_name, &r, started);
                let _ = stream.write_all(&TLS_ACCESS_DENIED).await;
                return;
            }
        }
        let client = Replay::new(first, stream);
        blind(&self, &limits, peer, dest, agent_name, client, upstream, started).await;
    }

    /// Refuse a connection that has no CONNECT to answer: a TLS client gets an
    /// `access_denied` alert, a plain-HTTP client latchkey's own refusal (SPEC 6), and
    /// the refusal is logged as `blocked` like a refused CONNECT.
    #[allow(clippy::too_many_arguments)]
    async fn refuse_stream(
        &self,
        generation: &Generation,
        mut stream: TcpStream,
        peer: SocketAddr,
        dest: &Destination,
        agent: Option<String>,
        r: Refusal,
        started: Instant,
    ) {
        log_refused(self, peer, dest, agent, &r, started);
        let limits = &generation.config.proxy.limits;
        let mut first = [0u8; 1];
        match tokio::time::timeout(limits.header_read_timeout, stream.read(&mut first)).await {
            Ok(Ok(1)) => {}
            _ => return,
        }
        if first[0] == TLS_HANDSHAKE {
            let _ = stream.write_all(&TLS_ACCESS_DENIED).await;
            return;
        }
        let io = Replay::new(first.to_vec(), stream);
        let service = service_fn(move |_req| {
            let resp = respond::refusal(&r);
            async move { Ok::<_, std::convert::Infallible>(resp) }
        });
        let mut builder = super::server_builder(limits);
        builder.keep_alive(false);
        let _ = builder.serve_connection(TokioIo::new(io), service).await;
    }
}

/// A fatal TLS alert record, `access_denied` (RFC 8446 6.2), sent in the clear.
const TLS_ACCESS_DENIED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49];

/// The agent a destined connection belongs to. Without `[agents]` nobody needs to be
/// named; with them, a connection must carry a configured agent.
fn identify(config: &Config, agent: Option<&str>) -> Result<Option<usize>, Refusal> {
    if config.agents.is_empty() {
        return Ok(None);
    }
    let found = agent.and_then(|name| config.agents.iter().position(|a| a.name == name));
    found.map(Some).ok_or_else(|| {
        Refusal::new(
            407,
            "proxy-auth",
            "this connection carries no agent identity; with [agents] configured, start the jail with `latchkey exec --jail --agent NAME`",
        )
    })
}

/// `allowed_clients`, as the proxy port applies it.
fn client_refusal(generation: &Generation, peer: SocketAddr) -> Option<Refusal> {
    let clients = &generation.config.proxy.allowed_clients;
    let ip = crate::policy::host::canonical_ip(peer.ip());
    (!clients.is_empty() && !clients.iter().any(|n| n.contains(&ip)))
        .then(|| Refusal::new(403, "client-not-allowed", format!("client {ip} is not in allowed_clients")))
}

/// Whether a blind tunnel's ClientHello may go on. For a named destination the SNI must
/// name it (a name the client chose is the destination, never a front for another);
/// for an IP destination an SNI may name any host the policy would let through.
fn sni_refusal(
    config: &Config,
    agent: Option<usize>,
    dest: &Destination,
    sni: Option<&str>,
) -> Option<Refusal> {
    let sni = sni?;
    let named = match Host::parse(sni) {
        Ok(h) => h,
        Err(_) => return Some(respond::misdirected(format!("TLS SNI {sni:?} is not a host name"))),
    };
    match &dest.host {
        Host::Domain(_) if named != dest.host => {
            Some(respond::misdirected(format!("TLS SNI {sni:?} does not name the destination {}", dest.host)))
        }
        Host::Domain(_) => None,
        Host::Ip(_) => match decide(config, agent, &Destination { host: named, port: dest.port }) {
            ConnectDecision::Block(r) => Some(r),
            _ => None,
        },
    }
}

/// Read until the ClientHello is complete (or proves malformed) and return its SNI.
/// The bytes read stay in `buf` for the upstream. `Err` when the client goes away or
/// is too slow.
async fn read_client_hello(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    limits: &Limits,
) -> Result<Option<String>, ()> {
    let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
    loop {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd: &[u8] = buf;
        while !rd.is_empty() {
            match acceptor.read_tls(&mut rd) {
                Ok(n) if n > 0 => {}
                _ => return Ok(None),
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return Ok(accepted.client_hello().server_name().map(str::to_string)),
            Ok(None) if buf.len() < MAX_CLIENT_HELLO => {}
            // Not TLS after all, or not a ClientHello latchkey can read: no SNI to check.
            _ => return Ok(None),
        }
        let mut more = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut more)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&more[..n]),
            _ => return Err(()),
        }
    }
}

/// The longest method latchkey recognises as the start of an HTTP/1 request line.
const MAX_METHOD: usize = 16;

/// How far latchkey reads into a first line that starts like a request line.
const MAX_REQUEST_LINE: usize = 8192;

/// `METHOD SP`, then either ` HTTP/` before the line ends, or a line too long to tell
/// (treated as HTTP: what is parsed gets checked). A plain-text protocol whose first
/// line merely starts with a word (IRC's `NICK x`) is not HTTP.
fn looks_like_http(b: &[u8]) -> bool {
    let method = b.iter().take_while(|c| c.is_ascii_uppercase()).count();
    if method == 0 || method > MAX_METHOD || b.get(method) != Some(&b' ') {
        return false;
    }
    match b.iter().position(|&c| c == b'\n') {
        Some(end) => b[..end].windows(6).any(|w| w == b" HTTP/"),
        None => true,
    }
}

/// Not yet enough to tell: uppercase letters that may still become a method, or a
/// method whose line has not ended.
fn http_undecided(b: &[u8]) -> bool {
    let method = b.iter().take_while(|c| c.is_ascii_uppercase()).count();
    if method == b.len() {
        return b.len() <= MAX_METHOD;
    }
    method <= MAX_METHOD && b[method] == b' ' && !b.contains(&b'\n') && b.len() < MAX_REQUEST_LINE
}

/// A stream with bytes already read put back in front.
pub(super) struct Replay<T> {
    prefix: Vec<u8>,
    at: usize,
    inner: T,
}

impl<T> Replay<T> {
    pub(super) fn new(prefix: Vec<u8>, inner: T) -> Self {
        Replay { prefix, at: 0, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Replay<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Replay<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The destination the kernel recorded before a REDIRECT (nftables/iptables) rewrote
/// it: `SO_ORIGINAL_DST` for IPv4, `IP6T_SO_ORIGINAL_DST` for IPv6.
pub fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    use std::os::fd::AsRawFd;
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let fd = stream.as_raw_fd();
    let local = stream.local_addr()?;
    // SAFETY: getsockopt writes at most `len` bytes into the sockaddr we own.
    unsafe {
        if local.is_ipv4() {
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if libc::getsockopt(fd, libc::SOL_IP, SO_ORIGINAL_DST, (&raw mut sa).cast(), &mut len) != 0 {
                return Err(io::Error::last_os_error());
            }
            let ip = std::net::Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
            Ok(SocketAddr::new(ip.into(), u16::from_be(sa.sin_port)))
        } else {
            let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            if libc::getsockopt(fd, libc::SOL_IPV6, SO_ORIGINAL_DST, (&raw mut sa).cast(), &mut len) != 0 {
                return Err(io::Error::last_os_error());
            }
            let ip = std::net::Ipv6Addr::from(sa.sin6_addr.s6_addr);
            Ok(SocketAddr::new(ip.into(), u16::from_be(sa.sin6_port)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_request_lines_are_recognised() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"PROPFIND /x"), "a line not yet ended is treated as HTTP");
        assert!(!looks_like_http(b"NICK latchkey\r\n"));
        assert!(!looks_like_http(b"\x16\x03\x01"));
        assert!(!looks_like_http(b"SSH-2.0-OpenSSH"));
        assert!(!looks_like_http(b"get / HTTP/1.1"));
        assert!(!looks_like_http(b"GET"));
        assert!(http_undecided(b"GE") && http_undecided(b"GET") && http_undecided(b"GET /x"));
        assert!(
            !http_undecided(b"GET / HTTP/1.1\r\n") && !http_undecided(b"\x16") && !http_undecided(b"SSH-")
        );
    }

    #[test]
    fn an_sni_must_name_the_destination() {
        let config = Config::defaults().unwrap();
        let dest = Destination::parse_authority("api.example.com:443", None).unwrap();
        assert!(sni_refusal(&config, None, &dest, Some("api.example.com")).is_none());
        assert!(sni_refusal(&config, None, &dest, None).is_none());
        let r = sni_refusal(&config, None, &dest, Some("evil.example.net")).unwrap();
        assert_eq!(r.status, 421);
    }
}
