//! The upstream side: resolve (with `[upstream.resolve]` overrides), refuse non-public
//! addresses at the moment of connecting, TCP + TLS with public roots, pooled.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::policy::{Destination, Host, ssrf};

/// Why an upstream could not be reached; maps to 403, 502 or 504.
#[derive(Debug, Clone)]
pub enum UpstreamError {
    /// Every address is one latchkey refuses (invariant 12).
    Refused {
        host: String,
        addr: std::net::IpAddr,
        why: &'static str,
    },
    Resolve {
        host: String,
        why: String,
    },
    Connect {
        host: String,
        why: String,
    },
    Tls {
        host: String,
        why: String,
    },
    /// The upstream accepts none of the protocols offered by ALPN.
    NoCommonProtocol {
        host: String,
    },
    Timeout {
        host: String,
    },
    /// The corporate proxy (`[upstream] proxy`) could not be reached or refused the tunnel.
    Proxy {
        proxy: String,
        host: String,
        why: String,
    },
    /// No upstream connection may be opened now: a `[proxy.limits]` budget is spent.
    Busy {
        host: String,
        what: &'static str,
    },
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Refused { host, addr, why } => write!(
                f,
                "{host} resolves to {addr} ({why}); latchkey refuses such destinations unless [proxy] allow_private lists them"
            ),
            UpstreamError::Resolve { host, why } => write!(f, "cannot resolve {host}: {why}"),
            UpstreamError::Connect { host, why } => write!(f, "cannot connect to {host}: {why}"),
            UpstreamError::Tls { host, why } => write!(f, "TLS with {host} failed: {why}"),
            UpstreamError::Timeout { host } => write!(f, "{host} did not answer in time"),
            UpstreamError::Proxy { proxy, host, why } => {
                write!(f, "cannot reach {host} through the upstream proxy {proxy}: {why}")
            }
            UpstreamError::Busy { host, what } => write!(
                f,
                "no connection to {host} could be opened: too many upstream connections open ([proxy.limits] {what}); try again"
            ),
            UpstreamError::NoCommonProtocol { host } => {
                write!(f, "TLS with {host} failed: no application protocol in common (ALPN)")
            }
        }
    }
}

impl std::error::Error for UpstreamError {}

/// Resolution and connection rules shared by blind tunnels and the pooled client.
pub struct Dialer {
    pub resolve: HashMap<Destination, SocketAddr>,
    pub allow_private: Vec<IpNet>,
    /// latchkey's own listening sockets: never a destination, whatever the config says.
    pub own_sockets: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    /// `[proxy] timeout`: also how long the rest of an upload the upstream answered
    /// early may take (`client::response`).
    pub timeout: Duration,
    /// Upstream connections opened for requests hold a permit from this (invariant 9).
    pub budget: Arc<super::fanout::Budget>,
    /// ALPN h2 + http/1.1, for the pooled client.
    pub tls: TlsConnector,
    /// ALPN http/1.1 only, for upgrades (WebSocket needs an HTTP/1.1 connection).
    pub tls_h1: TlsConnector,
    /// Destinations that answered an HTTP/1.1-only offer with no protocol.
    pub alpn: AlpnMemo,
    /// `[upstream] proxy`: the corporate proxy connections leave through.
    pub proxy: Option<Arc<super::corporate::CorporateProxy>>,
}

/// What a destination did when offered HTTP/1.1 only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learned {
    /// It speaks h2 only: offer h2 straight away.
    H2Only,
    /// It chose no protocol when offered h2 either: HTTP/1.1 without ALPN.
    NoAlpn,
}

/// Per-destination memory of `Learned`, bounded in size and time (a server may change).
#[derive(Debug, Default)]
pub struct AlpnMemo(std::sync::Mutex<HashMap<Destination, (Learned, std::time::Instant)>>);

impl AlpnMemo {
    const MAX: usize = 4096;
    const TTL: Duration = Duration::from_secs(600);

    fn get(&self, dest: &Destination) -> Option<Learned> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(dest).filter(|(_, at)| at.elapsed() < Self::TTL).map(|(l, _)| *l)
    }

    fn learn(&self, dest: &Destination, what: Learned) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= Self::MAX {
            map.retain(|_, (_, at)| at.elapsed() < Self::TTL);
            if map.len() >= Self::MAX {
                map.clear();
            }
        }
        map.insert(dest.clone(), (what, std::time::Instant::now()));
    }

    fn forget(&self, dest: &Destination) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(dest);
    }
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer").field("resolve", &self.resolve).finish_non_exhaustive()
    }
}

impl Dialer {
    /// The addresses latchkey may connect to for `dest`, checked (invariant 12).
    pub async fn addresses(&self, dest: &Destination) -> Result<Vec<SocketAddr>, UpstreamError> {
        let host = dest.to_string();
        if let Some(addr) = self.resolve.get(dest) {
            self.check_own(&host, *addr)?;
            return Ok(vec![*addr]);
        }
        let found: Vec<SocketAddr> = match &dest.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, dest.port)],
            Host::Domain(name) => tokio::net::lookup_host((name.as_str(), dest.port))
                .await
                .map_err(|e| UpstreamError::Resolve { host: host.clone(), why: e.to_string() })?
                .collect(),
        };
        let mut allowed = Vec::new();
        let mut refusal = None;
        for addr in found {
            let addr = SocketAddr::new(crate::policy::host::canonical_ip(addr.ip()), addr.port());
            self.check_own(&host, addr)?;
            match ssrf::refused(addr.ip(), &self.allow_private) {
                Some(why) => {
                    refusal = Some(UpstreamError::Refused { host: host.clone(), addr: addr.ip(), why })
                }
                None => allowed.push(addr),
            }
        }
        match (allowed.is_empty(), refusal) {
            (false, _) => Ok(allowed),
            (true, Some(r)) => Err(r),
            (true, None) => Err(UpstreamError::Resolve { host, why: "no addresses".into() }),
        }
    }

    fn check_own(&self, host: &str, addr: SocketAddr) -> Result<(), UpstreamError> {
        let own = self.own_sockets.iter().any(|s| {
            s.port() == addr.port()
                && (s.ip() == addr.ip()
                    || (s.ip().is_unspecified() && ssrf::non_public_reason(addr.ip()).is_some()))
        });
        if own {
            return Err(UpstreamError::Refused {
                host: host.into(),
                addr: addr.ip(),
                why: "latchkey's own socket",
            });
        }
        Ok(())
    }

    /// The corporate proxy a connection to `dest` goes through, if any.
    fn proxy_for(&self, dest: &Destination) -> Option<&super::corporate::CorporateProxy> {
        self.proxy.as_deref().filter(|p| p.applies(dest))
    }

    /// What to CONNECT to through the corporate proxy, after the same SSRF check as a
    /// direct connection: an `[upstream.resolve]` override's address, else the name
    /// (the proxy resolves it; a name latchkey cannot resolve itself, common behind
    /// corporate proxies, is left to the proxy).
    async fn proxy_target(&self, dest: &Destination) -> Result<String, UpstreamError> {
        if let Some(addr) = self.resolve.get(dest) {
            self.check_own(&dest.to_string(), *addr)?;
            return Ok(addr.to_string());
        }
        match self.addresses(dest).await {
            Ok(_) | Err(UpstreamError::Resolve { .. }) => Ok(dest.to_string()),
            Err(e) => Err(e),
        }
    }

    /// A tunnel to `dest` through the corporate proxy, within the connect timeout.
    async fn connect_proxied(
        &self,
        proxy: &super::corporate::CorporateProxy,
        dest: &Destination,
    ) -> Result<TcpStream, UpstreamError> {
        let host = dest.to_string();
        let attempt = async {
            let target = self.proxy_target(dest).await?;
            proxy.tunnel(&target, &host).await
        };
        tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| UpstreamError::Timeout { host })?
    }

    /// TCP to the first checked address that answers (a tunnel through the corporate
    /// proxy when there is one).
    pub async fn connect_tcp(&self, dest: &Destination) -> Result<TcpStream, UpstreamError> {
        if let Some(proxy) = self.proxy_for(dest) {
            return self.connect_proxied(proxy, dest).await;
        }
        let host = dest.to_string();
        let addrs = self.addresses(dest).await?;
        let attempt = async {
            let mut last = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        return Ok(s);
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(UpstreamError::Connect {
                host: host.clone(),
                why: last.map(|e| e.to_string()).unwrap_or_else(|| "no address".into()),
            })
        };
        tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| UpstreamError::Timeout { host: host.clone() })?
    }

    /// An HTTP/1.1-only connection: for upgrades (never pooled) and the HTTP/1.1 pool.
    pub async fn connect_h1(&self, dest: Destination, tls: bool) -> Result<UpstreamIo, UpstreamError> {
        self.connect_with(dest, tls, &self.tls_h1).await
    }

    pub async fn connect(&self, dest: Destination, tls: bool) -> Result<UpstreamIo, UpstreamError> {
        self.connect_with(dest, tls, &self.tls).await
    }

    /// For the HTTP/1.1 pool: offer HTTP/1.1 only, so an upstream that speaks both keeps
    /// HTTP/1.1 clients on parallel HTTP/1.1 connections. An upstream that speaks nothing
    /// but h2 either refuses (`no_application_protocol`) or, like OpenSSL servers,
    /// completes the handshake choosing no protocol; either way it is dialled again
    /// offering h2, and the pool multiplexes HTTP/1.1 clients over that connection.
    /// What was learned is kept per destination, so the next dial goes straight to the
    /// right offer. An upstream that chose HTTP/1.1 (the common case) costs nothing extra.
    pub async fn connect_prefer_h1(&self, dest: Destination, tls: bool) -> Result<UpstreamIo, UpstreamError> {
        if !tls {
            return self.connect_with(dest, tls, &self.tls_h1).await;
        }
        match self.alpn.get(&dest) {
            Some(Learned::H2Only) => {
                let io = self.connect(dest.clone(), tls).await?;
                if !io.h2 {
                    self.alpn.forget(&dest);
                }
                return Ok(io);
            }
            Some(Learned::NoAlpn) => return self.connect_with(dest, tls, &self.tls_h1).await,
            None => {}
        }
        match self.connect_with(dest.clone(), tls, &self.tls_h1).await {
            Err(UpstreamError::NoCommonProtocol { .. }) => {
                self.alpn.learn(&dest, Learned::H2Only);
                self.connect(dest, tls).await
            }
            Ok(io) if io.no_alpn => {
                // No protocol chosen: a server without ALPN (HTTP/1.1) or an h2-only
                // server that ignored the offer. Offering h2 tells them apart.
                let again = match self.connect(dest.clone(), tls).await {
                    Ok(again) => again,
                    Err(_) => return Ok(io),
                };
                self.alpn.learn(&dest, if again.h2 { Learned::H2Only } else { Learned::NoAlpn });
                Ok(again)
            }
            other => other,
        }
    }

    async fn connect_with(
        &self,
        dest: Destination,
        tls: bool,
        connector: &TlsConnector,
    ) -> Result<UpstreamIo, UpstreamError> {
        let host = dest.to_string();
        let permit = self.budget.acquire(&host, self.connect_timeout).await?;
        let tcp = self.connect_tcp(&dest).await?;
        if !tls {
            return Ok(UpstreamIo {
                io: TokioIo::new(Stream::Plain(tcp)),
                h2: false,
                no_alpn: false,
                proxied: false,
                _permit: permit,
            });
        }
        let name = match &dest.host {
            Host::Domain(d) => ServerName::try_from(d.clone())
                .map_err(|e| UpstreamError::Tls { host: host.clone(), why: e.to_string() })?,
            Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
        };
        let handshake = connector.connect(name, tcp);
        let stream = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| UpstreamError::Timeout { host: host.clone() })?
            .map_err(|e| match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)) => {
                    UpstreamError::NoCommonProtocol { host: host.clone() }
                }
                _ => UpstreamError::Tls { why: self.tls_cause_via(&dest, &e), host },
            })?;
        let alpn = stream.get_ref().1.alpn_protocol();
        let (h2, no_alpn) = (alpn == Some(b"h2"), alpn.is_none());
        Ok(UpstreamIo {
            io: TokioIo::new(Stream::Tls(Box::new(stream))),
            h2,
            no_alpn,
            proxied: false,
            _permit: permit,
        })
    }

    /// A TLS failure, naming the corporate proxy when the connection went through one
    /// (a proxy that intercepts TLS shows up here: its CA is never trusted).
    fn tls_cause_via(&self, dest: &Destination, e: &io::Error) -> String {
        match self.proxy_for(dest) {
            Some(p) => format!("{} (through the upstream proxy {})", tls_cause(e), p.shown),
            None => tls_cause(e),
        }
    }

    /// A plain-HTTP connection to the corporate proxy itself, for requests written in
    /// absolute form (after the destination's SSRF check); `None` without a proxy.
    pub(super) async fn connect_plain_proxied(
        &self,
        dest: &Destination,
    ) -> Option<Result<UpstreamIo, UpstreamError>> {
        let proxy = self.proxy_for(dest)?;
        let host = dest.to_string();
        let attempt = async {
            let permit = self.budget.acquire(&host, self.connect_timeout).await?;
            self.proxy_target(dest).await?;
            let tcp = proxy.connect(&host).await?;
            Ok(UpstreamIo {
                io: TokioIo::new(Stream::Plain(tcp)),
                h2: false,
                no_alpn: false,
                proxied: true,
                _permit: permit,
            })
        };
        let timed = tokio::time::timeout(self.connect_timeout, attempt).await;
        Some(timed.unwrap_or(Err(UpstreamError::Timeout { host })))
    }
}

fn tls_cause(e: &io::Error) -> String {
    e.get_ref().map(|inner| inner.to_string()).unwrap_or_else(|| e.to_string())
}

message_error! {
    /// Why latchkey's upstream TLS could not be set up (a bad `ca_file`, client certificate).
    pub TlsSetupError
}

/// Upstream trust: the public roots plus `[upstream] ca_file`, never the latchkey CA
/// and never `SSL_CERT_FILE`/`SSL_CERT_DIR` (an agent could set those).
pub fn client_tls(
    provider: Arc<rustls::crypto::CryptoProvider>,
    ca_file: Option<&std::path::Path>,
    credential: Option<&crate::secrets::ClientTls>,
) -> Result<ClientConfig, TlsSetupError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned());
    if let Some(path) = ca_file {
        let err = |e: &dyn std::fmt::Display| format!("[upstream] ca_file {}: {e}", path.display());
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(&e))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(&e))?;
        if certs.is_empty() {
            return Err(err(&"no certificates").into());
        }
        for c in certs {
            roots.add(c).map_err(|e| err(&e))?;
        }
    }
    for c in credential.map(|m| m.roots.clone()).unwrap_or_default() {
        roots.add(c).map_err(|e| format!("upstream_ca: {e}"))?;
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut cfg = match credential.and_then(|m| m.identity.as_ref()) {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("client certificate: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    // The upstream leg negotiates its own protocol, independent of the client's.
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// An upstream connection as hyper sees it. An `h2` connection is shared by every
/// concurrent request to its destination.
pub struct UpstreamIo {
    io: TokioIo<Stream>,
    h2: bool,
    /// TLS completed without an application protocol.
    no_alpn: bool,
    /// A plain connection to the corporate proxy: hyper writes requests in absolute form.
    proxied: bool,
    _permit: super::fanout::Permit,
}

impl UpstreamIo {
    /// ALPN chose h2: the connection is shared by every concurrent request to its destination.
    pub(super) fn is_h2(&self) -> bool {
        self.h2
    }

    /// A plain connection to the corporate proxy: requests on it go in absolute form.
    pub(super) fn is_proxied(&self) -> bool {
        self.proxied
    }
}

/// The own client's side (`client`): the same stream, read and written directly.
impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io.inner_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().io.inner_mut()).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io.inner_mut()).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().io.inner_mut()).poll_shutdown(cx)
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
