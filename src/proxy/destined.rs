//! Connections whose destination is already known: a CONNECT (the authority), and a
//! TCP stream the kernel redirected to latchkey with its original destination (the
//! jail of `exec --jail`, transparent mode). Both join the normal flow at "identify
//! destination" and share what follows: the decision, the blind tunnel, interception
//! and the log line.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::tunnel::{Identity, Opener, Tunnel};
use super::{Generation, Proxy, handler, respond};
use crate::config::{Config, Limits};
use crate::policy::{Decision, Destination, Host, Question, Refusal, RefusalKind};

const TLS_HANDSHAKE: u8 = 0x16;
/// The most ClientHello bytes read to find the SNI of a blind tunnel.
const MAX_CLIENT_HELLO: usize = 32 * 1024;

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
        let _ = stream.set_nodelay(true);
        self.serve_admitted(slot, stream, peer, dest, agent, Instant::now()).await
    }

    /// `serve_destined` for a connection already holding its slot, whose first bytes
    /// latchkey may have read (transparent mode puts them back in front).
    pub(super) async fn serve_admitted<S>(
        self: Arc<Self>,
        _slot: super::Slot,
        stream: S,
        peer: SocketAddr,
        dest: Destination,
        agent: Option<&str>,
        started: Instant,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let generation = self.generation();
        let stream = super::SendDeadline::new(stream, generation.config.proxy.limits.idle_timeout);
        let opener = Opener { peer, identity: Identity::Named(agent.map(str::to_string)) };
        let agent = match handler::admit(&generation.config, &opener) {
            Ok(a) => a,
            Err(r) => return self.refuse_stream(&generation, stream, peer, &dest, None, r, started).await,
        };
        match Tunnel::open(&self, &generation, opener, agent, &dest, started).await {
            Ok(tunnel) => tunnel.serve(stream).await,
            Err(r) => self.refuse_stream(&generation, stream, peer, &dest, agent, r, started).await,
        }
    }

    /// Refuse a connection that has no CONNECT to answer: a TLS client gets an
    /// `access_denied` alert, a plain-HTTP client latchkey's own refusal (SPEC 6), and
    /// the refusal is logged as `blocked` like a refused CONNECT.
    #[allow(clippy::too_many_arguments)]
    async fn refuse_stream<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        generation: &Generation,
        mut stream: S,
        peer: SocketAddr,
        dest: &Destination,
        agent: Option<usize>,
        r: Refusal,
        started: Instant,
    ) {
        let rec = handler::tunnel_record(&generation.config, peer, agent, dest, started);
        handler::log_refusal(self, rec, &r, respond::Protocol::Http);
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
        let io = super::tunnel::Prefixed::new(first.to_vec(), stream);
        respond::on_stream(io, r, limits).await;
    }
}

/// A fatal TLS alert record, `access_denied` (RFC 8446 6.2), sent in the clear.
pub(super) const TLS_ACCESS_DENIED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49];

/// The agent a destined connection belongs to. Without `[agents]` nobody needs to be
/// named; with them, a connection must carry a configured agent.
pub(super) fn identify(config: &Config, agent: Option<&str>) -> Result<Option<usize>, Refusal> {
    if config.agents.is_empty() {
        return Ok(None);
    }
    let found = agent.and_then(|name| config.agents.iter().position(|a| a.name == name));
    found.map(Some).ok_or_else(|| {
        Refusal::new(RefusalKind::ProxyAuth,
            "this connection carries no agent identity; with [agents] configured, start the jail with `latchkey exec --jail --agent NAME` (transparent mode: [proxy] transparent_agent)",
        )
    })
}

/// Whether a blind tunnel's ClientHello may go on. For a named destination the SNI must
/// name it (a name the client chose is the destination, never a front for another);
/// for an IP destination an SNI may name any host the policy would let through.
pub(super) fn sni_refusal(
    config: &Config,
    tokens: &crate::token::state::TokenState,
    agent: Option<usize>,
    dest: &Destination,
    sni: Option<&str>,
) -> Option<Refusal> {
    let sni = sni?;
    let named = match Host::parse(sni) {
        Ok(h) => h,
        Err(_) => return Some(Refusal::misdirected(format!("TLS SNI {sni:?} is not a host name"))),
    };
    match &dest.host {
        Host::Domain(_) if named != dest.host => {
            Some(Refusal::misdirected(format!("TLS SNI {sni:?} does not name the destination {}", dest.host)))
        }
        Host::Domain(_) => None,
        Host::Ip(_) => {
            let named = Destination { host: named, port: dest.port };
            match config.decide(&Question::now(agent, &named, None), tokens) {
                Decision::Block(r) => Some(r),
                // A name nobody approved is not let through behind an approved address.
                Decision::Ask => Some(Refusal::new(
                    RefusalKind::NotApproved,
                    format!(
                        "TLS SNI {sni:?} names a host nobody approved; the tunnel to {} does not carry it",
                        dest.host
                    ),
                )),
                _ => None,
            }
        }
    }
}

/// What a blind tunnel's ClientHello said that latchkey checks.
pub(super) struct ClientHello {
    /// The server name it asks for; `None` without one, or when it is not a ClientHello
    /// latchkey can read (then there is no name to check).
    pub sni: Option<String>,
}

/// The client went away, or was too slow, before its ClientHello was complete.
#[derive(Debug)]
pub(super) struct Stalled;

/// Read until the ClientHello is complete (or proves malformed). The bytes read stay in
/// `buf` for the upstream.
pub(super) async fn read_client_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    limits: &Limits,
) -> Result<ClientHello, Stalled> {
    let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
    loop {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd: &[u8] = buf;
        while !rd.is_empty() {
            match acceptor.read_tls(&mut rd) {
                Ok(n) if n > 0 => {}
                _ => return Ok(ClientHello { sni: None }),
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return Ok(ClientHello { sni: accepted.client_hello().server_name().map(str::to_string) });
            }
            Ok(None) if buf.len() < MAX_CLIENT_HELLO => {}
            // Not TLS after all, or not a ClientHello latchkey can read: no SNI to check.
            _ => return Ok(ClientHello { sni: None }),
        }
        let mut more = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut more)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&more[..n]),
            _ => return Err(Stalled),
        }
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
        // An IPv4 connection accepted on a dual-stack socket has a v4-mapped address:
        // its conntrack entry is IPv4.
        let v4 = match local.ip() {
            std::net::IpAddr::V4(_) => true,
            std::net::IpAddr::V6(a) => a.to_ipv4_mapped().is_some(),
        };
        if v4 {
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
    fn an_sni_must_name_the_destination() {
        let config = Config::defaults().unwrap();
        let tokens = crate::token::state::TokenState::keyless();
        let dest = Destination::parse_authority("api.example.com:443", None).unwrap();
        assert!(sni_refusal(&config, &tokens, None, &dest, Some("api.example.com")).is_none());
        assert!(sni_refusal(&config, &tokens, None, &dest, None).is_none());
        let r = sni_refusal(&config, &tokens, None, &dest, Some("evil.example.net")).unwrap();
        assert_eq!(r.status(), 421);
    }
}
