//! WebSocket: the handshake is checked and injected like any request, sent on a
//! dedicated HTTP/1.1 upstream connection, and on 101 the two upgraded streams are
//! joined byte for byte — no frame is re-encoded. An HTTP/2 client's extended CONNECT
//! (`:protocol = websocket`, RFC 8441) is relayed as an HTTP/1.1 upgrade and answered
//! 200 when the upstream switches protocols.

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::redact::Set;

use super::route::Route;
use super::upstream::Dialer;
use crate::config::Config;
use crate::policy::{Refusal, RefusalKind};

/// An upgrade latchkey relays.
pub enum Upgrade {
    /// HTTP/1.1 `Upgrade: websocket` (the header value, kept as the client wrote it).
    H1(HeaderValue),
    /// HTTP/2 extended CONNECT with `:protocol = websocket`.
    H2WebSocket,
}

/// The upgrade a request asks for, if latchkey relays it: only WebSocket. Anything else
/// (notably `h2c`) loses its Upgrade header with the other hop-by-hop headers, so the
/// request goes upstream as a plain request and never upgrades.
pub fn requested(parts: &Parts) -> Option<Upgrade> {
    if parts.method == http::Method::CONNECT {
        let protocol = parts.extensions.get::<h2::ext::Protocol>()?;
        return protocol.as_str().eq_ignore_ascii_case("websocket").then_some(Upgrade::H2WebSocket);
    }
    // Upgrade first: most requests have none, and need no second lookup.
    let protocol = parts.headers.get(header::UPGRADE)?;
    let connection_upgrade = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    (connection_upgrade && protocol.as_bytes().eq_ignore_ascii_case(b"websocket"))
        .then(|| Upgrade::H1(protocol.clone()))
}

/// The client's side of an upgrade, once latchkey answered it: hyper's HTTP/1.1
/// connection, or the own HTTP/2 server's stream (`h2_server`).
pub enum ClientSide {
    H1(OnUpgrade),
    H2(tokio::sync::oneshot::Receiver<super::h2_server::Upgraded>),
}

impl ClientSide {
    /// Taken from a request's extensions: each request can upgrade once.
    pub fn take(extensions: &mut http::Extensions) -> Option<ClientSide> {
        if let Some(on) = extensions.remove::<OnUpgrade>() {
            return Some(ClientSide::H1(on));
        }
        extensions.remove::<super::h2_server::Pending>()?.take().map(ClientSide::H2)
    }
}

/// What is scanned on an upgraded connection: the upstream's frames for the
/// credentials' secrets (response redaction), the client's messages for `[proxy.dlp]`.
pub struct Scans {
    pub redactors: Option<Set>,
    pub screen: Option<super::wsscreen::WsScreen>,
}

/// Send an (already injected, hop-by-hop-free) upgrade request upstream. On 101, join
/// the client's and the upstream's upgraded streams in the background.
pub async fn relay(
    config: &Config,
    dialer: &Dialer,
    route: &Route,
    mut parts: Parts,
    kind: Upgrade,
    client: ClientSide,
    scans: Scans,
) -> Result<Response<Incoming>, Refusal> {
    let Scans { redactors, screen } = scans;
    if redactors.is_some() || screen.is_some() {
        // Compressed frames could not be scanned: no permessage-deflate (or any extension).
        parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    }
    parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    match &kind {
        Upgrade::H1(protocol) => {
            parts.headers.insert(header::UPGRADE, protocol.clone());
        }
        Upgrade::H2WebSocket => {
            // RFC 8441 carries no key; the HTTP/1.1 upstream needs one.
            parts.method = http::Method::GET;
            parts.version = http::Version::HTTP_11;
            parts.headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            parts.headers.insert(header::SEC_WEBSOCKET_KEY, websocket_key()?);
            parts.headers.entry(header::SEC_WEBSOCKET_VERSION).or_insert(HeaderValue::from_static("13"));
        }
    }
    let host = match (route.tls, route.dest.port) {
        (true, 443) | (false, 80) => route.dest.host.to_string(),
        _ => route.dest.authority(),
    };
    parts.headers.insert(header::HOST, HeaderValue::from_str(&host).map_err(|_| bad_host())?);
    // The connection-level client wants origin-form.
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    parts.uri = pq.parse().map_err(|_| bad_host())?;

    let send = async {
        let io = dialer.connect_h1(route.dest.clone(), route.tls).await;
        let io = io.map_err(|e| super::respond::upstream_refusal(&e))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(io).await.map_err(|e| reset(route, e))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let body = super::respond::empty();
        sender.send_request(Request::from_parts(parts, body)).await.map_err(|e| reset(route, e))
    };
    let mut resp = match tokio::time::timeout(config.proxy.timeout, send).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(Refusal::new(RefusalKind::UpstreamTimeout, format!("{} did not answer", route.dest)));
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let scanned = redactors.is_some() || screen.is_some();
        if scanned && resp.headers().contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
            // latchkey offered none: compressed frames (RSV1) would pass unscanned.
            return Err(Refusal::new(
                RefusalKind::UpstreamWebSocket,
                format!(
                    "{} accepted a WebSocket extension latchkey did not offer; its frames could not be scanned for credentials",
                    route.dest
                ),
            ));
        }
        let upstream = hyper::upgrade::on(&mut resp);
        let limits = &config.proxy.limits;
        let (limit, idle) = (limits.tunnel_timeout, limits.idle_timeout);
        tokio::spawn(join(client, upstream, (limit, idle), redactors, screen));
        if let Upgrade::H2WebSocket = kind {
            // An HTTP/2 client is told 200; the handshake headers are HTTP/1.1's.
            *resp.status_mut() = StatusCode::OK;
            resp.headers_mut().remove(header::SEC_WEBSOCKET_ACCEPT);
        }
    }
    Ok(resp)
}

/// `limit` is the whole stream's time, `idle` how long a write to the upstream, or to an
/// HTTP/2 client, may wait (for its window) before the stream ends; an HTTP/1.1 client's
/// socket has its own deadline underneath.
async fn join(
    client: ClientSide,
    upstream: OnUpgrade,
    (limit, idle): (Duration, Duration),
    redactors: Option<Set>,
    screen: Option<super::wsscreen::WsScreen>,
) {
    let Ok(upstream) = upstream.await else { return };
    let upstream = super::SendDeadline::upstream(TokioIo::new(upstream), idle);
    match client {
        ClientSide::H1(on) => {
            let Ok(client) = on.await else { return };
            bridge(TokioIo::new(client), upstream, limit, redactors, screen).await;
        }
        ClientSide::H2(rx) => {
            let Ok(client) = rx.await else { return };
            let client = super::SendDeadline::new(client, idle);
            bridge(client, upstream, limit, redactors, screen).await;
        }
    }
}

/// The client's and the upstream's upgraded streams joined until either ends or
/// `limit` passes.
async fn bridge<A, B>(
    mut a: A,
    mut b: B,
    limit: Duration,
    redactors: Option<Set>,
    screen: Option<super::wsscreen::WsScreen>,
) where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if redactors.is_none() && screen.is_none() {
        let _ = tokio::time::timeout(limit, tokio::io::copy_bidirectional(&mut a, &mut b)).await;
        return;
    }
    // Credentialed: upstream → client frame by frame, masked; with `[proxy.dlp]`,
    // client → upstream message by message, scanned. Otherwise bytes as they are.
    let (mut client_read, mut client_write) = tokio::io::split(a);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(b);
    let up = async {
        match screen {
            Some(s) => super::wsscreen::screen(client_read, upstream_write, s).await,
            None => tokio::io::copy(&mut client_read, &mut upstream_write).await.map(|_| ()),
        }
    };
    let down = async {
        match redactors {
            Some(r) => super::wsframes::mask(upstream_read, client_write, r).await,
            None => tokio::io::copy(&mut upstream_read, &mut client_write).await.map(|_| ()),
        }
    };
    let both = async {
        tokio::select! {
            r = up => if let Err(e) = r {
                tracing::info!(target: "latchkey::request", "WebSocket closed: {e}");
            },
            _ = down => {}
        }
    };
    let _ = tokio::time::timeout(limit, both).await;
}

fn websocket_key() -> Result<HeaderValue, Refusal> {
    use base64::Engine;
    let mut nonce = [0u8; 16];
    let provider = rustls::crypto::CryptoProvider::get_default()
        .ok_or_else(|| Refusal::new(RefusalKind::Internal, "no crypto provider"))?;
    provider
        .secure_random
        .fill(&mut nonce)
        .map_err(|_| Refusal::new(RefusalKind::Internal, "no randomness"))?;
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);
    HeaderValue::from_str(&key).map_err(|_| bad_host())
}

fn bad_host() -> Refusal {
    Refusal::bad_request("cannot build the upgrade request")
}

fn reset(route: &Route, e: hyper::Error) -> Refusal {
    Refusal::new(RefusalKind::UpstreamReset, format!("{} failed during the upgrade: {e}", route.dest))
}
