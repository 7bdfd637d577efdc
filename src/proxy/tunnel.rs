//! Inside a CONNECT tunnel latchkey chose to intercept: TLS with a leaf for the
//! tunnel's host (refusing a ClientHello that names another host), or plain HTTP when
//! the tunnel does not start with TLS. Either way the destination stays the tunnel's.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio_rustls::LazyConfigAcceptor;

use super::forward::{self, Route};
use super::{Generation, Proxy};
use crate::metrics::{KindLabel, ResultLabel};
use crate::policy::{Destination, Host};

const TLS_HANDSHAKE: u8 = 0x16;

pub async fn intercept<S>(
    proxy: Arc<Proxy>,
    generation: Arc<Generation>,
    peer: SocketAddr,
    agent: Option<usize>,
    dest: Destination,
    client: S,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = generation.config.proxy.limits.clone();
    let _open = TunnelGauge::open(&proxy, "intercepted");
    let mut io = super::capped::Capped::new(client, limits.max_tunnel_bytes);
    let mut first = [0u8; 1];
    match tokio::time::timeout(limits.header_read_timeout, io.read(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return,
    }
    let io = Prefixed { first: Some(first[0]), inner: io };
    if first[0] != TLS_HANDSHAKE {
        let route = Arc::new(Route::new(dest, false, true, None, peer, agent));
        Box::pin(serve(proxy, generation, route, io)).await;
        return;
    }
    let accept = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let start = match tokio::time::timeout(limits.header_read_timeout, accept).await {
        Ok(Ok(s)) => s,
        _ => return,
    };
    let misdirected = start.client_hello().server_name().and_then(|sni| match Host::parse(sni) {
        Ok(h) if h == dest.host => None,
        _ => Some(format!("TLS SNI {sni:?} does not name the tunnel's host {}", dest.host)),
    });
    let (config, hit) = proxy.ca.server_config_counted(&dest.host);
    let metrics = &proxy.ops.metrics;
    metrics.leaf_cache.get_or_create(&ResultLabel { result: if hit { "hit" } else { "miss" } }).inc();
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cannot mint a certificate for {}: {e}", dest.host);
            return;
        }
    };
    let handshake = tokio::time::timeout(limits.header_read_timeout, start.into_stream(config)).await;
    let result = if matches!(handshake, Ok(Ok(_))) { "ok" } else { "failed" };
    metrics.handshakes.get_or_create(&ResultLabel { result }).inc();
    let tls = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake with {peer} for {dest} failed: {e}");
            return;
        }
        Err(_) => return,
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let route = Arc::new(Route::new(dest, true, true, misdirected, peer, agent));
    // Boxed: the task then holds only the connection kind it serves (an h2 server's
    // state is several KiB an HTTP/1.1 connection would otherwise carry while idle).
    if h2 {
        Box::pin(serve_h2(proxy, generation, route, tls)).await;
    } else {
        Box::pin(serve(proxy, generation, route, tls)).await;
    }
}

async fn serve_h2<S>(proxy: Arc<Proxy>, generation: Arc<Generation>, route: Arc<Route>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = generation.config.proxy.limits.clone();
    let service =
        service_fn(move |req| forward::handle(proxy.clone(), generation.clone(), route.clone(), req));
    let conn = super::h2_builder(&limits).serve_connection(TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!("h2 tunnel: {e}");
    }
}

async fn serve<S>(proxy: Arc<Proxy>, generation: Arc<Generation>, route: Arc<Route>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = generation.config.proxy.limits.clone();
    let service =
        service_fn(move |req| forward::handle(proxy.clone(), generation.clone(), route.clone(), req));
    let stream = super::framing::Guarded::new(stream, &limits);
    let conn = super::server_builder(&limits).serve_connection(TokioIo::new(stream), service).with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!("tunnel: {e}");
    }
}

/// Counts a tunnel in `latchkey_tunnels{kind}` while it is alive.
pub struct TunnelGauge(prometheus_client::metrics::gauge::Gauge);

impl TunnelGauge {
    pub fn open(proxy: &Proxy, kind: &'static str) -> TunnelGauge {
        let g = proxy.ops.metrics.tunnels.get_or_create(&KindLabel { kind }).clone();
        g.inc();
        TunnelGauge(g)
    }
}

impl Drop for TunnelGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A stream with the one byte latchkey peeked at put back in front.
struct Prefixed<T> {
    first: Option<u8>,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(b) = self.first.take() {
            buf.put_slice(&[b]);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
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
