//! One request to a known destination: check that the request agrees with the
//! destination, decide, inject, forward, and stream the response back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::{Counted, Logged, Pending, ScanBody};
use super::respond::{self, bad_request, misdirected};
use super::upstream::UpstreamError;
use super::{Body, Generation, Proxy};
use crate::audit::{Record, now_ts, path_only};
use crate::inject::is_hop_by_hop;
use crate::policy::{Decision, Destination, Refusal, RequestHead};

/// Where requests on this connection go. Fixed before the first request is read.
#[derive(Debug)]
pub struct Route {
    pub dest: Destination,
    /// The upstream leg is TLS.
    pub tls: bool,
    /// Inside a CONNECT tunnel (rather than absolute-form on the proxy port).
    pub tunnel: bool,
    /// Set when the TLS ClientHello named another host: every request gets 421.
    pub misdirected: Option<String>,
    pub peer: SocketAddr,
}

pub async fn handle(
    proxy: Arc<Proxy>,
    generation: Arc<Generation>,
    route: Arc<Route>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
        .to_string();
    let mut record = Record {
        ts: now_ts(),
        client: route.peer.ip().to_string(),
        agent: None,
        method: parts.method.to_string(),
        scheme: if route.tls { "https" } else { "http" },
        host: route.dest.host.to_string(),
        port: route.dest.port,
        path: Some(path_only(&target)),
        status: None,
        decision: "blocked",
        reason: None,
        credential: None,
        bytes_up: 0,
        bytes_down: 0,
        duration_ms: 0,
    };
    let refuse = |mut record: Record, r: Refusal| {
        record.status = Some(r.status);
        record.reason = Some(r.message.clone());
        record.duration_ms = started.elapsed().as_millis() as u64;
        proxy.audit.log(&record);
        tracing::info!(target: "latchkey::request", dest = %route.dest, status = r.status, kind = r.kind, "refused");
        Ok(respond::refusal(&r))
    };
    if let Err(r) = check_route(&route, &parts) {
        return refuse(record, r);
    }
    let config = &generation.config;
    let head = RequestHead {
        method: parts.method.as_str(),
        target: &target,
        path: parts.uri.path(),
        headers: &parts.headers,
        tls: route.tls,
    };
    let decision = config.policy.decide(&route.dest, &head, |i| {
        let c = &config.credentials[i];
        c.injector.carries_placeholder(&parts, &c.placeholder)
    });
    let mut parts = parts;
    let credential = match decision {
        Decision::Block(r) => return refuse(record, r),
        Decision::Pass(reason) => {
            record.decision = "passed";
            record.reason = Some(reason);
            None
        }
        Decision::Inject { credential, captures } => {
            let cred = &config.credentials[credential];
            record.credential = Some(cred.name.clone());
            if let Err(e) = cred.injector.inject(&mut parts, &captures) {
                let crate::inject::InjectError::Unavailable(why) = e;
                let r = Refusal::new(
                    502,
                    "credential-failed",
                    format!("credential {} cannot be used here: {why}", cred.name),
                );
                return refuse(record, r);
            }
            record.decision = "injected";
            Some(cred)
        }
    };

    if let Err(r) = prepare_upstream(&mut parts, &route) {
        return refuse(record, r);
    }
    let up = Arc::new(AtomicU64::new(0));
    let counted = Counted::new(body, up.clone());
    let (body, hit): (Body, _) = if config.policy.filters.content.is_empty() {
        (counted.boxed(), None)
    } else {
        let scan = ScanBody::new(counted, config.clone());
        let hit = scan.hit.clone();
        (scan.boxed(), Some(hit))
    };
    let upstream_req = Request::from_parts(parts, body);
    let result = tokio::time::timeout(config.proxy.timeout, generation.client.request(upstream_req)).await;
    let resp = match result {
        Err(_) => {
            let r = Refusal::new(
                504,
                "upstream-timeout",
                format!(
                    "{} did not answer within {}s",
                    route.dest,
                    config.proxy.timeout.as_secs()
                ),
            );
            return refuse(record, r);
        }
        Ok(Err(e)) => {
            if let Some(pattern) = hit.as_ref().and_then(|h| h.get()) {
                let r = Refusal::new(
                    403,
                    "blocked-pattern",
                    format!("request body matches blocked pattern {pattern:?}"),
                );
                return refuse(record, r);
            }
            return refuse(record, upstream_failure(&route.dest, &e));
        }
        Ok(Ok(resp)) => resp,
    };
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers);
    if credential.is_some_and(|c| !c.pass_cookies) {
        rparts.headers.remove(header::SET_COOKIE);
    }
    record.status = Some(rparts.status.as_u16());
    tracing::debug!(target: "latchkey::request", dest = %route.dest, status = rparts.status.as_u16(), decision = record.decision, "forwarded");
    let pending = Pending {
        audit: proxy.audit.clone(),
        record,
        up,
        down: Arc::new(AtomicU64::new(0)),
        started,
    };
    Ok(Response::from_parts(rparts, Logged::new(rbody, pending).boxed()))
}

/// Invariant 1: a request inside a tunnel names the tunnel's host or nothing.
fn check_route(route: &Route, parts: &http::request::Parts) -> Result<(), Refusal> {
    if let Some(why) = &route.misdirected {
        return Err(misdirected(why.clone()));
    }
    if parts.method == Method::CONNECT {
        return Err(bad_request("CONNECT inside a tunnel is refused"));
    }
    let default_port = if route.tls { 443 } else { 80 };
    if route.tunnel
        && let Some(authority) = parts.uri.authority()
    {
        let scheme_port = match parts.uri.scheme_str() {
            Some("https") => 443,
            Some("http") => 80,
            _ => return Err(bad_request("unsupported scheme in request target")),
        };
        let named = Destination::parse_authority(authority.as_str(), Some(scheme_port))
            .map_err(|e| bad_request(format!("bad request target: {e}")))?;
        if named != route.dest {
            return Err(misdirected(format!(
                "request names {named} but this tunnel goes to {}",
                route.dest
            )));
        }
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(bad_request("more than one Host header"));
    }
    if let Some(value) = host {
        let text = value
            .to_str()
            .map_err(|_| bad_request("Host header is not text"))?;
        let named = Destination::parse_authority(text, Some(default_port))
            .map_err(|e| bad_request(format!("bad Host header {text:?}: {e}")))?;
        if named != route.dest {
            return Err(misdirected(format!(
                "Host {named} differs from the destination {}",
                route.dest
            )));
        }
    }
    Ok(())
}

/// Rewrite the request for the upstream: absolute URI built from the destination
/// (never from a client-written host), hop-by-hop headers removed, HTTP/1.1.
fn prepare_upstream(parts: &mut http::request::Parts, route: &Route) -> Result<(), Refusal> {
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    let scheme = if route.tls { "https" } else { "http" };
    let pq = parts.uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
    let pq = if pq.starts_with('/') {
        pq.to_string()
    } else {
        format!("/{pq}")
    };
    parts.uri = format!("{scheme}://{}{pq}", route.dest.authority())
        .parse()
        .map_err(|_| bad_request("cannot rebuild the request URI"))?;
    parts.version = Version::HTTP_11;
    Ok(())
}

/// Remove hop-by-hop headers and every header the Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let hop: Vec<HeaderName> = headers.keys().filter(|k| is_hop_by_hop(k)).cloned().collect();
    for name in hop {
        headers.remove(name);
    }
}

fn upstream_failure(dest: &Destination, e: &hyper_util::client::legacy::Error) -> Refusal {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(u) = err.downcast_ref::<UpstreamError>() {
            return respond::upstream_refusal(u);
        }
        source = err.source();
    }
    let cause = std::error::Error::source(e)
        .map(|s| s.to_string())
        .unwrap_or_else(|| e.to_string());
    Refusal::new(502, "upstream-reset", format!("{dest} failed: {cause}"))
}
