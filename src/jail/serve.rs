//! Serving one jail's sockets with a proxy (in `latchkey exec`, or the running
//! instance it attached to): the explicit proxy port, the redirected connections
//! (each `serve_destined` to the name its address stands for) and the resolver.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::SocketKind;
use super::dns::{self, FakeAddrs};
use crate::policy::{Destination, Host};
use crate::proxy::Proxy;

/// A jail's sockets as the helper made them, in its network namespace.
pub struct JailSockets {
    pub kinds: Vec<SocketKind>,
    pub fds: Vec<OwnedFd>,
}

type Map = Arc<Mutex<FakeAddrs>>;

/// Serve until dropped (every task is aborted with it). `agent`: the `[agents]`
/// identity of every redirected connection.
pub async fn serve(proxy: Arc<Proxy>, sockets: JailSockets, agent: Option<String>) {
    let map: Map = Arc::default();
    let agent: Option<Arc<str>> = agent.map(Arc::from);
    let mut tasks = tokio::task::JoinSet::new();
    for (kind, fd) in sockets.kinds.into_iter().zip(sockets.fds) {
        match kind {
            SocketKind::Proxy => match tcp(fd) {
                Ok(l) => {
                    let p = proxy.clone();
                    tasks.spawn(async move {
                        let _ = p.serve(l).await;
                    });
                }
                Err(e) => tracing::error!("jail proxy port: {e}"),
            },
            SocketKind::Transparent => match tcp(fd) {
                Ok(l) => {
                    tasks.spawn(redirected(proxy.clone(), l, map.clone(), agent.clone()));
                }
                Err(e) => tracing::error!("jail listener: {e}"),
            },
            SocketKind::DnsUdp => match udp(fd) {
                Ok(s) => {
                    tasks.spawn(dns_udp(s, map.clone()));
                }
                Err(e) => tracing::error!("jail DNS: {e}"),
            },
            SocketKind::DnsTcp => match tcp(fd) {
                Ok(l) => {
                    tasks.spawn(dns_tcp(l, map.clone()));
                }
                Err(e) => tracing::error!("jail DNS: {e}"),
            },
        }
    }
    while tasks.join_next().await.is_some() {}
}

fn tcp(fd: OwnedFd) -> std::io::Result<TcpListener> {
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

fn udp(fd: OwnedFd) -> std::io::Result<UdpSocket> {
    let s = std::net::UdpSocket::from(fd);
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

/// Connections nftables redirected: each to the destination its original address
/// stands for.
async fn redirected(proxy: Arc<Proxy>, listener: TcpListener, map: Map, agent: Option<Arc<str>>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("jail accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(dest) = destination(&stream, &map) else { continue };
        let (p, agent) = (proxy.clone(), agent.clone());
        proxy.spawn_serving(stream, move |stream, seat| async move {
            let _seat = seat;
            p.serve_destined(stream, peer, dest, agent.as_deref()).await
        });
    }
}

/// The name an address from the jail's range was handed out for; any other address
/// (or one this jail no longer knows, which the SSRF rule then refuses) as an IP.
fn destination(stream: &TcpStream, map: &Map) -> Option<Destination> {
    let orig = match crate::proxy::original_destination(stream) {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!("jail connection without an original destination: {e}");
            return None;
        }
    };
    let host = match crate::policy::host::canonical_ip(orig.ip()) {
        IpAddr::V4(v4) if FakeAddrs::in_range(v4) => {
            match map.lock().unwrap_or_else(|p| p.into_inner()).name_of(v4) {
                Some(name) => Host::Domain(name),
                None => Host::Ip(v4.into()),
            }
        }
        ip => Host::Ip(ip),
    };
    Some(Destination { host, port: orig.port() })
}

fn answer(query: &[u8], map: &Map) -> Option<Vec<u8>> {
    dns::answer(query, &mut map.lock().unwrap_or_else(|p| p.into_inner()))
}

async fn dns_udp(sock: UdpSocket, map: Map) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from): (usize, SocketAddr) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(_) => continue,
        };
        if let Some(resp) = answer(&buf[..n], &map) {
            let _ = sock.send_to(&resp, from).await;
        }
    }
}

/// DNS over TCP connections one jail may hold open at once.
const DNS_TCP_CONNECTIONS: usize = 64;

/// DNS over TCP (RFC 7766): length-prefixed messages, idle connections closed, a
/// bounded number at a time.
async fn dns_tcp(listener: TcpListener, map: Map) {
    let open = Arc::new(tokio::sync::Semaphore::new(DNS_TCP_CONNECTIONS));
    loop {
        let Ok(permit) = open.clone().acquire_owned().await else { return };
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let map = map.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let idle = Duration::from_secs(10);
            loop {
                let mut len = [0u8; 2];
                if !matches!(tokio::time::timeout(idle, stream.read_exact(&mut len)).await, Ok(Ok(_))) {
                    return;
                }
                let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
                if !matches!(tokio::time::timeout(idle, stream.read_exact(&mut msg)).await, Ok(Ok(_))) {
                    return;
                }
                let Some(resp) = answer(&msg, &map) else { return };
                let mut out = (resp.len() as u16).to_be_bytes().to_vec();
                out.extend_from_slice(&resp);
                if stream.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}
