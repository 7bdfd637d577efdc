//! Requests on the proxy port: CONNECT, absolute-form plain HTTP, and the local
//! resources: `/ca.crt` (public by nature) and `/latchkey/...` (names and decisions,
//! see `crate::explain`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::forward::{self, Route};
use super::respond::{self, bad_request};
use super::{Body, Generation, Proxy};
use crate::audit::{Record, now_ts};
use crate::policy::{ConnectDecision, Destination, Refusal};

pub async fn handle(
    proxy: Arc<Proxy>,
    generation: Arc<Generation>,
    peer: SocketAddr,
    slot: super::HeldSlot,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let is_proxy_request = req.method() == Method::CONNECT || req.uri().scheme().is_some();
    let agent = if is_proxy_request {
        match super::identity::authenticate(&generation.config, req.headers()) {
            Ok(agent) => agent,
            Err(r) => {
                tracing::info!(target: "latchkey::request", %peer, "proxy authentication failed");
                return Ok(respond::refusal(&r));
            }
        }
    } else {
        None
    };
    if req.method() == Method::CONNECT {
        return Ok(connect(proxy, generation, peer, agent, slot, req).await);
    }
    match req.uri().scheme_str() {
        Some("http") => {
            let authority = req.uri().authority().map(|a| a.as_str().to_string()).unwrap_or_default();
            match Destination::parse_authority(&authority, Some(80)) {
                Ok(dest) => {
                    let route = Arc::new(Route::new(dest, false, false, None, peer, agent));
                    forward::handle(proxy, generation, route, req).await
                }
                Err(e) => Ok(respond::refusal(&bad_request(format!("bad host {authority:?}: {e}")))),
            }
        }
        Some(_) => Ok(respond::refusal(&bad_request(
            "send https:// requests through CONNECT (set HTTPS_PROXY); latchkey does not fetch them for you",
        ))),
        None if req.method() == Method::GET && req.uri().path() == "/ca.crt" => {
            let mut resp = Response::new(respond::full(proxy.ca.cert_pem().to_string()));
            resp.headers_mut()
                .insert(http::header::CONTENT_TYPE, "application/x-pem-file".parse().expect("static"));
            Ok(resp)
        }
        // `exec --token-ttl` where token.key is not readable (see `crate::token::endpoint`).
        None if req.method() == Method::GET && req.uri().path() == crate::token::endpoint::PATH => {
            let minted = crate::token::endpoint::answer(
                &proxy.tokens,
                &generation.config,
                peer,
                req.headers(),
                req.uri().query(),
            )
            .await;
            Ok(match minted {
                Ok(token) => Response::new(respond::full(token)),
                Err(r) => respond::refusal(&r),
            })
        }
        // `/latchkey/...`: what this instance would do, by name (never a value), for
        // `env`, `exec`, `explain` and `check` running where the secrets are not.
        None if req.method() == Method::GET
            && let Some(answer) = crate::explain::local_endpoint(
                &generation.config,
                peer,
                req.uri().path(),
                req.uri().query(),
            ) =>
        {
            Ok(match answer {
                Ok((body, kind)) => {
                    let mut resp = Response::new(respond::full(body));
                    resp.headers_mut()
                        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(kind));
                    resp
                }
                Err(r) => respond::refusal(&r),
            })
        }
        None => Ok(respond::refusal(&bad_request(
            "this is a proxy: send absolute-form requests or CONNECT (see `latchkey env`)",
        ))),
    }
}

async fn connect(
    proxy: Arc<Proxy>,
    generation: Arc<Generation>,
    peer: SocketAddr,
    agent: Option<usize>,
    slot: super::HeldSlot,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let authority = req.uri().authority().map(|a| a.as_str().to_string()).unwrap_or_default();
    let dest = match Destination::parse_authority(&authority, None) {
        Ok(d) => d,
        Err(e) => return respond::refusal(&bad_request(format!("bad CONNECT target {authority:?}: {e}"))),
    };
    let agent_name = super::identity::agent_name(&generation.config, agent);
    let refuse = |r: Refusal| {
        let mut rec = tunnel_record(peer, &dest, r.status, "blocked", Some(r.message.clone()), started);
        rec.agent = agent_name.clone();
        proxy.ops.finish(&rec, None, None);
        tracing::info!(target: "latchkey::request", %dest, status = r.status, kind = r.kind, "CONNECT refused");
        respond::refusal(&r)
    };
    let decision = match super::identity::destination_refusal(&generation.config, agent, &dest) {
        Some(r) => ConnectDecision::Block(r),
        None => generation.config.policy.decide_connect(&dest),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    match decision {
        ConnectDecision::Block(r) => refuse(r),
        ConnectDecision::Tunnel => {
            let upstream = match generation.dialer.connect_tcp(&dest).await {
                Ok(s) => s,
                Err(e) => return refuse(respond::upstream_refusal(&e)),
            };
            let ops = proxy.ops.clone();
            let limit = generation.config.proxy.limits.tunnel_timeout;
            let cap = generation.config.proxy.limits.max_tunnel_bytes;
            let gauge = super::tunnel::TunnelGauge::open(&proxy, "blind");
            let slot = super::Slot::take(&slot);
            tokio::spawn(async move {
                let _held = (gauge, slot);
                let Ok(upgraded) = on_upgrade.await else { return };
                let mut client = super::capped::Capped::new(TokioIo::new(upgraded), cap);
                let mut upstream = upstream;
                let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
                let (up, down) = match tokio::time::timeout(limit, copy).await {
                    Ok(Ok(n)) => n,
                    _ => (0, 0),
                };
                let mut rec = tunnel_record(peer, &dest, 200, "tunnelled", None, started);
                rec.agent = agent_name;
                rec.bytes_up = up;
                rec.bytes_down = down;
                ops.finish(&rec, None, None);
            });
            established()
        }
        ConnectDecision::Intercept => {
            // Refuse SSRF targets before any TLS; the connector checks again on connect.
            if let Err(e) = generation.dialer.addresses(&dest).await {
                return refuse(respond::upstream_refusal(&e));
            }
            let slot = super::Slot::take(&slot);
            tokio::spawn(async move {
                let _slot = slot;
                let Ok(upgraded) = on_upgrade.await else { return };
                super::tunnel::intercept(proxy, generation, peer, agent, dest, upgraded).await;
            });
            established()
        }
    }
}

fn established() -> Response<Body> {
    let mut resp = Response::new(respond::empty());
    *resp.status_mut() = StatusCode::OK;
    resp
}

fn tunnel_record(
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
