//! The hop from the agent to latchkey, protected: `[proxy] tls = true` serves the proxy
//! port over TLS (an `https://` proxy URL) with a leaf from latchkey's CA for the
//! proxy's own names, and asks for an optional client certificate that
//! `agent_auth::authenticate` may take as the agent's identity. The accepted stream is
//! wrapped here, before the usual serving code, which sees a [`ClientStream`].

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::agent_auth::ClientCert;
use crate::ca::CertAuthority;

/// The proxy's own leaf is minted again after this long (leaves live 30 days).
const RENEW_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

message_error!(
    /// The proxy port's TLS side cannot be set up (its certificate, its settings).
    pub HopError
);

pub struct TlsHop {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl TlsHop {
    /// The TLS side of the proxy port. `names` are the proxy's names and addresses its
    /// clients connect to (the certificate covers exactly those).
    pub fn new(ca: Arc<CertAuthority>, names: Vec<String>) -> Result<TlsHop, HopError> {
        let provider = ca.provider();
        let leaf = ca.own_leaf(&names).map_err(|e| format!("[proxy] tls_names {names:?}: {e}"))?;
        let resolver = OwnLeaf { ca, names, current: Mutex::new((Instant::now(), leaf)) };
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(Arc::new(AnyClientCert { provider }))
            .with_cert_resolver(Arc::new(resolver));
        // The proxy port speaks HTTP/1.1 (CONNECT and absolute-form requests).
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        cfg.ignore_client_order = true; // see `crate::ca::crypto_provider`
        Ok(TlsHop { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)) })
    }

    /// The TLS handshake, bounded by `timeout` (a client that stalls in it holds a slot).
    pub async fn accept(&self, tcp: TcpStream, timeout: Duration) -> io::Result<ClientStream> {
        let tls = tokio::time::timeout(timeout, self.acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let cert = tls.get_ref().1.peer_certificates().and_then(ClientCert::from_chain);
        Ok(ClientStream::Tls(Box::new(tls), cert))
    }
}

/// The names the proxy's certificate covers by default: loopback, the bind address and
/// the host name (a container's or pod's name), then `[proxy] tls_names`.
pub fn own_names(bind: std::net::IpAddr, extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = extra.to_vec();
    names.extend(["localhost".to_string(), "127.0.0.1".into(), "::1".into()]);
    if !bind.is_unspecified() {
        names.push(bind.to_string());
    }
    if let Some(host) = host_name() {
        names.push(host);
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.to_ascii_lowercase()));
    names
}

fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer it is given.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end]).ok()?.trim().to_ascii_lowercase();
    let valid = !name.is_empty()
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    valid.then_some(name)
}

/// The proxy's own leaf, minted again before it expires (a long-running proxy outlives
/// one leaf).
#[derive(Debug)]
struct OwnLeaf {
    ca: Arc<CertAuthority>,
    names: Vec<String>,
    current: Mutex<(Instant, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for OwnLeaf {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.0.elapsed() > RENEW_AFTER {
            match self.ca.own_leaf(&self.names) {
                Ok(leaf) => *current = (Instant::now(), leaf),
                Err(e) => tracing::warn!("cannot renew the proxy's own certificate: {e}"),
            }
        }
        Some(current.1.clone())
    }
}

/// Asks for a client certificate without requiring one, and accepts whichever is sent:
/// who it identifies (a pinned fingerprint, or an agent's `client_ca`) is decided per
/// request by `agent_auth::authenticate`, which answers 407 rather than a TLS alert. The
/// handshake signature is still checked, so a client presenting a certificate holds its
/// key.
#[derive(Debug)]
struct AnyClientCert {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A client connection on the proxy port: plain TCP, or TLS with the client's
/// certificate (if it sent one).
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>, Option<ClientCert>),
}

impl ClientStream {
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            ClientStream::Plain(s) => s.set_nodelay(on),
            ClientStream::Tls(s, _) => s.get_ref().0.set_nodelay(on),
        }
    }

    pub fn client_cert(&self) -> Option<ClientCert> {
        match self {
            ClientStream::Plain(_) => None,
            ClientStream::Tls(_, cert) => cert.clone(),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientStream::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(s) => s.is_write_vectored(),
            ClientStream::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl super::Proxy {
    /// The accepted connection as the serving code reads it: through the TLS handshake
    /// first on a `[proxy] tls` port. `None` when the handshake fails (logged at debug:
    /// port scanners and plain-HTTP clients land here).
    pub(super) async fn client_stream(
        &self,
        tcp: TcpStream,
        peer: std::net::SocketAddr,
    ) -> Option<ClientStream> {
        let Some(hop) = &self.hop else { return Some(ClientStream::Plain(tcp)) };
        let timeout = self.generation().config.proxy.limits.header_read_timeout;
        match hop.accept(tcp, timeout).await {
            Ok(stream) => Some(stream),
            Err(e) => {
                tracing::debug!("client {peer}: TLS handshake on the proxy port failed: {e}");
                None
            }
        }
    }
}
