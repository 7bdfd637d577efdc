//! Requests on the proxy port: CONNECT, absolute-form plain HTTP, and the one local
//! resources: `/ca.crt` (public by nature) and `/latchkey/active` (credential names).

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
        // Which credentials are active here, by name: `env` and `exec` run where the
        // secrets are not, and export placeholders for what this instance can inject.
        None if req.method() == Method::GET && req.uri().path() == "/latchkey/active" => {
            let names: String = generation
                .config
                .policy
                .credentials
                .iter()
                .filter(|c| c.state == crate::policy::CredState::Active)
                .map(|c| format!("{}\n", c.name))
                .collect();
            Ok(Response::new(respond::full(names)))
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
        super::destined::log_refused(&proxy, peer, &dest, agent_name.clone(), &r, started);
        respond::refusal(&r)
    };
    let decision = super::destined::decide(&generation.config, agent, &dest);
    let on_upgrade = hyper::upgrade::on(&mut req);
    match decision {
        ConnectDecision::Block(r) => refuse(r),
        ConnectDecision::Tunnel => {
            let upstream = match generation.dialer.connect_tcp(&dest).await {
                Ok(s) => s,
                Err(e) => return refuse(respond::upstream_refusal(&e)),
            };
            let limits = generation.config.proxy.limits.clone();
            let slot = super::Slot::take(&slot);
            tokio::spawn(async move {
                let _slot = slot;
                let Ok(upgraded) = on_upgrade.await else { return };
                let client = TokioIo::new(upgraded);
                super::destined::blind(&proxy, &limits, peer, dest, agent_name, client, upstream, started)
                    .await;
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
                let io = TokioIo::new(upgraded);
                super::tunnel::intercept(proxy, generation, peer, agent, dest, io).await;
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
