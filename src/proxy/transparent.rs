//! Transparent mode (`[proxy] transparent`, SPEC 9): connections nftables REDIRECTed to
//! latchkey, from clients that never heard of a proxy. The kernel kept the address the
//! client dialled (`SO_ORIGINAL_DST`); the connection's first bytes say which name it
//! wants (the TLS SNI, or a plain-HTTP `Host`). The name is the destination: the
//! connection is handled exactly as `CONNECT NAME:PORT` (`Proxy::serve_admitted`, the
//! jail's path), so latchkey connects to its own resolution of NAME and the address the
//! client chose is never dialled. Without a name it is `CONNECT IP:PORT`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};

use super::Proxy;
use super::destined::{Stalled, original_destination, read_client_hello};
use super::tunnel::Prefixed;
use crate::config::Limits;
use crate::policy::host::{canonical_ip, split_host_port};
use crate::policy::{Destination, Host};

const TLS_HANDSHAKE: u8 = 0x16;

/// How long latchkey waits for a redirected client's first bytes before taking it for
/// a protocol where the server speaks first (SSH, SMTP): then there is no name.
const FIRST_BYTES: Duration = Duration::from_millis(300);

impl Proxy {
    /// Accept redirected connections until the listener fails.
    pub async fn serve_transparent(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let mut backoff = super::ACCEPT_BACKOFF_MIN;
        loop {
            let (stream, peer) = super::accept(&listener, &mut backoff, "transparent accept").await;
            let Some(slot) = self.admit(peer) else { continue };
            let proxy = self.clone();
            self.spawn_serving(stream, move |stream, seat| async move {
                let slot = slot.seated(seat);
                let started = Instant::now();
                let _ = stream.set_nodelay(true);
                let Some((dest, stream)) = proxy.redirected(stream, peer).await else { return };
                let agent = proxy.generation().config.proxy.transparent_agent.clone();
                proxy.serve_admitted(slot, stream, peer, dest, agent.as_deref(), started).await;
            });
        }
    }

    /// The destination of a redirected connection, and the stream with the bytes read
    /// to learn it put back in front. `None`: nothing to serve (not redirected, a loop
    /// back to latchkey, or the client left before saying anything).
    async fn redirected(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<(Destination, Prefixed<TcpStream>)> {
        let orig = match original_destination(&stream) {
            Ok(a) => SocketAddr::new(canonical_ip(a.ip()), a.port()),
            Err(e) => {
                tracing::debug!("transparent connection from {peer} has no original destination: {e}");
                return None;
            }
        };
        // A client that dialled the listener itself (no REDIRECT happened): serving it
        // would have latchkey connect to itself.
        if stream.local_addr().is_ok_and(|l| SocketAddr::new(canonical_ip(l.ip()), l.port()) == orig) {
            tracing::debug!("{peer} connected to the transparent listener directly; closing");
            return None;
        }
        if self.looped(peer, orig) {
            return None;
        }
        let limits = self.generation().config.proxy.limits.clone();
        let mut first = Vec::new();
        let named = match first_name(&mut stream, &mut first, &limits).await {
            Ok(named) => named,
            Err(Stalled) => return None,
        };
        let host = named.and_then(|n| Host::parse(&n).ok()).unwrap_or(Host::Ip(orig.ip()));
        Some((Destination { host, port: orig.port() }, Prefixed::new(first, stream)))
    }

    /// Whether a redirected connection comes from a socket of latchkey's own uid: its
    /// own upstream connection, sent back by rules that do not exempt it. Refused (the
    /// upstream side then fails, and the request with it) rather than served in a loop.
    fn looped(&self, peer: SocketAddr, orig: SocketAddr) -> bool {
        // SAFETY: geteuid has no arguments.
        let me = unsafe { libc::geteuid() };
        match super::own_socket::tcp_owner(peer, orig) {
            Ok(Some(uid)) if uid == me => {
                tracing::error!(
                    "a connection from latchkey's own uid {me} to {orig} was redirected back to latchkey: the transparent rules must exempt this uid (latchkey transparent-rules --exclude-uid {me}); refused"
                );
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::debug!("cannot tell who owns {peer}: {e}");
                false
            }
        }
    }
}

/// The name a redirected connection's first bytes ask for: the SNI of a TLS
/// ClientHello, the `Host` of a plain-HTTP request; `None` for anything else, or when
/// the client waits for the server to speak first. The bytes read stay in `buf`.
async fn first_name<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    limits: &Limits,
) -> Result<Option<String>, Stalled> {
    let mut chunk = [0u8; 4096];
    match tokio::time::timeout(FIRST_BYTES, stream.read(&mut chunk)).await {
        Err(_) => return Ok(None),
        Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
        Ok(_) => return Err(Stalled),
    }
    if buf[0] == TLS_HANDSHAKE {
        return Ok(read_client_hello(stream, buf, limits).await?.sni);
    }
    http_host(stream, buf, limits).await
}

/// The `Host` of a plain-HTTP request head (without its port: the port is the one the
/// client dialled). `None` when the bytes are no HTTP request or it names no host.
async fn http_host<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    limits: &Limits,
) -> Result<Option<String>, Stalled> {
    let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
    loop {
        match request_host(buf, limits.max_headers) {
            Head::Host(host) => return Ok(host),
            Head::Partial if buf.len() < limits.max_header_bytes => {}
            // Too long a head: no name; the framing guard refuses it (431) later.
            Head::Partial | Head::NotHttp => return Ok(None),
        }
        let mut more = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut more)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&more[..n]),
            _ => return Err(Stalled),
        }
    }
}

enum Head {
    /// A complete request head, and the host its `Host` names.
    Host(Option<String>),
    Partial,
    NotHttp,
}

fn request_host(buf: &[u8], max_headers: usize) -> Head {
    let mut headers = vec![httparse::EMPTY_HEADER; max_headers];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::NotHttp,
    }
    let mut hosts = req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host = match (hosts.next(), hosts.next()) {
        // Two Host headers name no one host (the exchange refuses the request).
        (Some(h), None) => std::str::from_utf8(h.value).ok(),
        _ => None,
    };
    let host = host.and_then(|h| split_host_port(h.trim()).ok()).map(|(h, _)| h.to_string());
    Head::Host(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(bytes: &[u8]) -> Option<String> {
        match request_host(bytes, 32) {
            Head::Host(h) => h,
            Head::Partial => Some("<partial>".into()),
            Head::NotHttp => Some("<not http>".into()),
        }
    }

    #[test]
    fn the_host_of_a_plain_http_head_is_its_name() {
        assert_eq!(
            host(b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(
            host(b"GET / HTTP/1.1\r\nhost: api.example.com:8080\r\n\r\n").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(
            host(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n").as_deref(),
            Some("[2001:db8::1]"),
            "Host::parse takes it bracketed"
        );
        assert_eq!(host(b"GET / HTTP/1.0\r\n\r\n"), None, "no Host: no name");
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"), None);
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: a.exa").as_deref(), Some("<partial>"));
        assert_eq!(host(b"SSH-2.0-OpenSSH_9.6\r\n").as_deref(), Some("<not http>"));
    }
}
