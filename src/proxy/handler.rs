//! Requests on the proxy port: CONNECT, absolute-form plain HTTP, and the local
//! resources: `/ca.crt` (public by nature) and `/latchkey/...` (names and decisions,
//! see `crate::explain`). Every refusal here is latchkey's own (SPEC 6) and writes a
//! `blocked` line (SPEC 7).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderValue, PROXY_AUTHORIZATION};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::agent_auth::ClientCert;
use super::exchange;
use super::fanout::{self, ConnBudget};
use super::framing::{self, Gate, Malformed};
use super::respond::{self, Protocol};
use super::route::Route;
use super::tunnel::{Identity, Opener, Tunnel};
use super::{Body, Generation, HeldSlot, Proxy};
use crate::config::Config;
use crate::policy::{Destination, Refusal, RefusalKind};
use crate::telemetry::Record;
use crate::telemetry::record::{self, Path};

/// One client connection on the proxy port.
pub struct Connection {
    pub proxy: Arc<Proxy>,
    pub peer: SocketAddr,
    /// The client certificate presented on a `[proxy] tls` port, if any.
    pub cert: Option<ClientCert>,
    pub slot: HeldSlot,
    /// Where the framing guard learns whether a CONNECT or upgrade switched protocols.
    pub gate: Arc<Gate>,
    pub budget: ConnBudget,
}

/// One request on the proxy port, decided by the configuration in force when it
/// arrives (a reload reaches keep-alive connections too).
pub async fn serve(conn: Arc<Connection>, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let generation = conn.proxy.generation();
    if let Some(cert) = &conn.cert {
        req.extensions_mut().insert(cert.clone());
    }
    let switching = framing::may_switch(&req).then(|| req.method().clone());
    let handled = handle(conn.proxy.clone(), generation, conn.peer, conn.slot.clone(), req);
    let resp = fanout::scope(conn.budget.clone(), handled).await;
    if let Some(method) = switching {
        conn.gate.answer(framing::switched(&method, &resp));
    }
    Ok(resp)
}

async fn handle(
    proxy: Arc<Proxy>,
    generation: Arc<Generation>,
    peer: SocketAddr,
    slot: HeldSlot,
    req: Request<Incoming>,
) -> Response<Body> {
    if let Some((why, line)) = framing::refused(req.headers()) {
        return refuse_head(&proxy, peer, None, why, &line);
    }
    if let Some(r) = client_refusal(&generation.config, peer) {
        return refuse_request(&proxy, &generation, peer, None, &req, r);
    }
    let is_proxy_request = req.method() == Method::CONNECT || req.uri().scheme().is_some();
    let agent = if is_proxy_request {
        match super::agent_auth::authenticate(&generation.config, req.headers(), req.extensions().get()) {
            Ok(agent) => agent,
            Err(r) => return refuse_request(&proxy, &generation, peer, None, &req, r),
        }
    } else {
        None
    };
    if req.method() == Method::CONNECT {
        return connect(proxy, generation, peer, agent, slot, req).await;
    }
    let refuse = |r: Refusal| refuse_request(&proxy, &generation, peer, agent, &req, r);
    match req.uri().scheme_str() {
        Some("http") => {
            let authority = req.uri().authority().map(|a| a.as_str().to_string()).unwrap_or_default();
            match Destination::parse_authority(&authority, Some(80)) {
                Ok(dest) => {
                    let route =
                        Arc::new(Route::new(&generation.config, dest, false, false, None, peer, agent));
                    let Ok(resp) = exchange::handle(proxy, generation, route, req.map(Into::into)).await;
                    resp
                }
                Err(e) => refuse(Refusal::bad_request(format!("bad host {authority:?}: {e}"))),
            }
        }
        Some(_) => refuse(Refusal::bad_request(
            "send https:// requests through CONNECT (set HTTPS_PROXY); latchkey does not fetch them for you",
        )),
        None if req.method() == Method::GET && req.uri().path() == "/ca.crt" => {
            let mut resp = Response::new(respond::full(proxy.ca.cert_pem().to_string()));
            resp.headers_mut()
                .insert(http::header::CONTENT_TYPE, "application/x-pem-file".parse().expect("static"));
            resp
        }
        // `exec --token-ttl` where token.key is not readable (see `crate::token::endpoint`).
        None if req.method() == Method::GET && req.uri().path() == crate::token::endpoint::PATH => {
            let minted = crate::token::endpoint::answer(
                &proxy.tokens,
                &generation.config,
                peer,
                req.headers(),
                req.extensions().get(),
                req.uri().query(),
            )
            .await;
            match minted {
                Ok(token) => Response::new(respond::full(token)),
                Err(r) => refuse(r),
            }
        }
        // `/latchkey/...`: what this instance would do, by name (never a value), for
        // `env`, `exec`, `explain` and `check` running where the secrets are not.
        None if req.method() == Method::GET
            && let Some(answer) = crate::explain::local_endpoint(
                &generation.config,
                &proxy.tokens,
                peer,
                req.uri().path(),
                req.uri().query(),
            ) =>
        {
            match answer {
                Ok((body, kind)) => {
                    let mut resp = Response::new(respond::full(body));
                    resp.headers_mut()
                        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(kind));
                    resp
                }
                Err(r) => refuse(r),
            }
        }
        None => refuse(Refusal::bad_request(
            "this is a proxy: send absolute-form requests or CONNECT (see `latchkey env`)",
        )),
    }
}

/// 403 for a client outside `allowed_clients`.
pub fn client_refusal(config: &Config, peer: SocketAddr) -> Option<Refusal> {
    let clients = &config.proxy.allowed_clients;
    let ip = crate::policy::host::canonical_ip(peer.ip());
    (!clients.is_empty() && !clients.iter().any(|n| n.contains(&ip))).then(|| {
        Refusal::new(RefusalKind::ClientNotAllowed, format!("client {ip} is not in allowed_clients"))
    })
}

/// Admit whoever opened a tunnel again under `config` (after a reload): the agent its
/// CONNECT authenticated as, or the refusal it would get now.
pub fn admit(config: &Config, opener: &Opener) -> Result<Option<usize>, Refusal> {
    if let Some(r) = client_refusal(config, opener.peer) {
        return Err(r);
    }
    match &opener.identity {
        Identity::ProxyAuth { header, cert } => {
            let mut headers = http::HeaderMap::new();
            if let Some(v) = header {
                headers.insert(PROXY_AUTHORIZATION, v.clone());
            }
            super::agent_auth::authenticate(config, &headers, cert.as_ref())
        }
        Identity::Named(name) => super::destined::identify(config, name.as_deref()),
    }
}

async fn connect(
    proxy: Arc<Proxy>,
    generation: Arc<Generation>,
    peer: SocketAddr,
    agent: Option<usize>,
    slot: HeldSlot,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let authority = req.uri().authority().map(|a| a.as_str().to_string()).unwrap_or_default();
    let dest = match Destination::parse_authority(&authority, None) {
        Ok(d) => d,
        Err(e) => {
            let r = Refusal::bad_request(format!("bad CONNECT target {authority:?}: {e}"));
            return refuse_request(&proxy, &generation, peer, agent, &req, r);
        }
    };
    let refuse = |r: Refusal| {
        let rec = tunnel_record(&generation.config, peer, agent, &dest, started);
        log_refusal(&proxy, rec, &r, Protocol::Http)
    };
    let identity = Identity::ProxyAuth {
        header: proxy_auth(req.headers()),
        cert: req.extensions().get::<ClientCert>().cloned(),
    };
    let opener = Opener { peer, identity };
    let on_upgrade = hyper::upgrade::on(&mut req);
    match Tunnel::open(&proxy, &generation, opener, agent, &dest, started).await {
        Err(r) => refuse(r),
        Ok(tunnel) => {
            let slot = super::Slot::take(&slot);
            tokio::spawn(async move {
                let _slot = slot;
                let Ok(upgraded) = on_upgrade.await else { return };
                // Boxed: the task waits for the upgrade with the tunnel's state inline;
                // served, it holds a pointer.
                let serving = Box::pin(tunnel.serve(TokioIo::new(upgraded)));
                serving.await;
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

/// Write `rec` as a `blocked` line for refusal `r`, and answer with `r` as `protocol`.
pub fn log_refusal(proxy: &Proxy, mut rec: Record, r: &Refusal, protocol: Protocol) -> Response<Body> {
    rec.status = Some(r.status());
    rec.decision = "blocked";
    rec.reason = Some(r.message.clone().into());
    proxy.telemetry.finish(&rec, None, None);
    tracing::info!(target: "latchkey::request", host = %rec.host, port = rec.port, method = %rec.method, status = r.status(), kind = r.token(), "refused");
    respond::refusal(r, protocol)
}

/// Refuse a request on the proxy port, logged with what it named.
pub fn refuse_request<B>(
    proxy: &Proxy,
    generation: &Generation,
    peer: SocketAddr,
    agent: Option<usize>,
    req: &Request<B>,
    r: Refusal,
) -> Response<Body> {
    let connect = req.method() == Method::CONNECT;
    let named = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| req.headers().get(http::header::HOST).map(|h| framing::escape(h.as_bytes())))
        .unwrap_or_default();
    let (host, port) = loose_authority(&named, if connect { 0 } else { 80 });
    let mut rec =
        record(peer, req.method().as_str(), if connect { "https" } else { "http" }, host.into(), port);
    if !connect {
        let target =
            req.uri().path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        rec.path = Some(Path::Target(target));
    }
    rec.agent = agent_label(&generation.config, agent);
    log_refusal(proxy, rec, &r, Protocol::of(req.headers()))
}

/// Refuse a head the framing guard replaced by a marker, logged with what its first
/// line (escaped) named. Inside a tunnel, `route` is the tunnel's destination.
pub fn refuse_head(
    proxy: &Proxy,
    peer: SocketAddr,
    route: Option<&Route>,
    why: Malformed,
    line: &str,
) -> Response<Body> {
    let mut words = line.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let connect = method == "CONNECT";
    // An absolute-form target names its host; origin-form names only a path.
    let (authority, path) = match target.split_once("://") {
        Some((_, rest)) => rest.split_at(rest.find('/').unwrap_or(rest.len())),
        None if connect => (target, ""),
        None => ("", target),
    };
    let mut rec = match route {
        Some(route) => {
            let scheme = if route.tls { "https" } else { "http" };
            record(peer, method, scheme, route.host_text.clone(), route.dest.port)
        }
        None => {
            let (host, port) = loose_authority(authority, if connect { 0 } else { 80 });
            record(peer, method, if connect { "https" } else { "http" }, host.into(), port)
        }
    };
    if !connect {
        rec.path = Some(Path::Text(if path.is_empty() { "/" } else { path }.to_string()));
    }
    let what = if connect && why == Malformed::RequestLine {
        format!("bad CONNECT target \"{target}\": not a host:port latchkey can parse")
    } else {
        format!("{}: \"{line}\"", why.message())
    };
    log_refusal(proxy, rec, &Refusal::new(why.kind(), what), Protocol::Http)
}

/// Host and port as written, for the log of a refused request: normalised when they
/// parse, otherwise split at the last colon. `raw` is printable text already.
fn loose_authority(raw: &str, default_port: u16) -> (String, u16) {
    if let Ok(d) = Destination::parse_authority(raw, Some(default_port.max(1))) {
        return (d.host.to_string(), if raw.contains(':') { d.port } else { default_port });
    }
    match raw.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h.to_string(), p.parse().unwrap_or(0)),
        _ => (raw.to_string(), default_port),
    }
}

fn record(peer: SocketAddr, method: &str, scheme: &'static str, host: Arc<str>, port: u16) -> Record {
    Record::new(peer.ip(), record::method_text(method), scheme, host, port)
}

/// The record of a CONNECT (or a redirected connection) from `peer` as `agent` to
/// `dest`: a tunnel, or its refusal.
pub fn tunnel_record(
    config: &Config,
    peer: SocketAddr,
    agent: Option<usize>,
    dest: &Destination,
    started: Instant,
) -> Record {
    let mut rec = record(peer, "CONNECT", "https", dest.host.to_string().into(), dest.port);
    rec.agent = agent_label(config, agent);
    rec.duration_ms = started.elapsed().as_millis() as u64;
    rec
}

/// The name of agent `index` as a record carries it.
pub fn agent_label(config: &Config, agent: Option<usize>) -> Option<Arc<str>> {
    agent.map(|i| Arc::from(config.agents[i].name.as_str()))
}

/// The `Proxy-Authorization` a CONNECT presented, marked sensitive.
fn proxy_auth(headers: &http::HeaderMap) -> Option<HeaderValue> {
    let mut v = headers.get(PROXY_AUTHORIZATION).cloned()?;
    v.set_sensitive(true);
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_targets_are_logged_as_written_but_escaped() {
        assert_eq!(loose_authority("api..openai.com:443", 0), ("api..openai.com".into(), 443));
        assert_eq!(loose_authority("API.example.com:443", 0), ("api.example.com".into(), 443));
        assert_eq!(loose_authority("a\\x00b:8", 0), ("a\\x00b".into(), 8));
        assert_eq!(loose_authority("nohost", 0), ("nohost".into(), 0));
        assert_eq!(loose_authority("[fe80::1%eth0]:443", 0), ("[fe80::1%eth0]".into(), 443));
    }
}
