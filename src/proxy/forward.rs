//! One request to a known destination: check that the request agrees with the
//! destination, decide, inject, forward, and stream the response back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;
use http::{Method, Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;

use super::upgrade::Upgrade;

use super::body::{Counted, Logged, Pending, Redacted, ScanBody};
use super::respond::{self, bad_request, misdirected};
use super::trailers::{GuardedTrailers, TrailerRules};
use super::upstream::{Connector, UpstreamError};
use super::{Body, Generation, Proxy};
use crate::audit::{Record, now_ts, path_only};
use crate::config::{Config, Credential};
use crate::inject::{InjectError, is_hop_by_hop};
use crate::policy::{Decision, Destination, Refusal, RequestHead};
use hyper_util::client::legacy::Client;

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
    /// The authenticated agent (index into `config.agents`), when agents are configured.
    pub agent: Option<usize>,
    /// `host:port` of `dest`, computed once per connection rather than per request.
    pub authority: String,
    /// `scheme://host[:port]` of the upstream URI, the port left out when it is the
    /// scheme's default (HTTP/2 sends it as `:authority`, as clients write it).
    origin: String,
}

impl Route {
    pub fn new(
        dest: Destination,
        tls: bool,
        tunnel: bool,
        misdirected: Option<String>,
        peer: SocketAddr,
        agent: Option<usize>,
    ) -> Route {
        let authority = dest.authority();
        let (scheme, default_port) = if tls { ("https", 443) } else { ("http", 80) };
        let origin = if dest.port == default_port {
            format!("{scheme}://{}", dest.host)
        } else {
            format!("{scheme}://{authority}")
        };
        Route { dest, tls, tunnel, misdirected, peer, agent, authority, origin }
    }

    /// Whether a Host value names this destination exactly as latchkey writes it: the
    /// common case, answered without parsing. Anything else is parsed and compared.
    fn is_exactly(&self, host: &[u8], default_port: u16) -> bool {
        host == self.authority.as_bytes()
            || (self.dest.port == default_port
                && self.authority.len() > host.len()
                && self.authority.as_bytes().starts_with(host)
                && self.authority.as_bytes()[host.len()] == b':')
    }
}

pub async fn handle(
    proxy: Arc<Proxy>,
    generation: Arc<Generation>,
    route: Arc<Route>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let in_flight = proxy.exchanges.start();
    let (parts, body) = req.into_parts();
    let mut record = new_record(&route, &parts);
    record.agent = super::identity::agent_name(&generation.config, route.agent);
    let span = proxy.ops.start_span(&generation.config, parts.method.as_str(), &parts.headers);
    if route.tls
        && let Some(resp) =
            super::tokens::vend(&generation.config, &route.dest, &parts.method, parts.uri.path())
    {
        record.decision = "injected";
        record.reason = Some("token vended by latchkey (stub credentials)".into());
        record.status = Some(200);
        record.duration_ms = started.elapsed().as_millis() as u64;
        proxy.ops.finish(&record, None, span);
        drop(in_flight);
        return Ok(resp);
    }
    let up = Arc::new(AtomicU64::new(0));
    // Boxed: hyper keeps a slot sized for this future on every connection, idle or not;
    // the exchange's state is allocated only while a request is in flight.
    let exchanged = Box::pin(exchange(
        &proxy.ops,
        &proxy.tokens,
        &generation,
        &route,
        parts,
        body,
        &mut record,
        up.clone(),
    ));
    match exchanged.await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            record.status = Some(parts.status.as_u16());
            tracing::debug!(target: "latchkey::request", dest = %route.dest, status = parts.status.as_u16(), decision = record.decision, "forwarded");
            // Usage is read from credentialed responses only: those are the metered APIs.
            let meter = record
                .credential
                .as_ref()
                .and(parts.headers.get(header::CONTENT_TYPE))
                .and_then(|ct| crate::usage::Meter::for_content_type(ct.to_str().unwrap_or("")));
            let cap = generation.config.telemetry.capture_body_bytes;
            let capture = (span.is_some() && cap > 0).then(|| (cap, Vec::new()));
            let pending = Pending {
                _exchange: in_flight,
                ops: proxy.ops.clone(),
                record,
                up,
                down: Arc::new(AtomicU64::new(0)),
                started,
                upstream: Some(started.elapsed()),
                meter,
                span,
                capture,
                config: generation.config.clone(),
            };
            Ok(Response::from_parts(parts, Logged::new(body, pending).boxed()))
        }
        Err(r) => {
            record.decision = "blocked";
            record.status = Some(r.status);
            record.reason = Some(r.message.clone());
            record.duration_ms = started.elapsed().as_millis() as u64;
            proxy.ops.finish(&record, None, span);
            tracing::info!(target: "latchkey::request", dest = %route.dest, status = r.status, kind = r.kind, "refused");
            Ok(respond::refusal(&r))
        }
    }
}

/// check → decide → inject → forward; the response comes back with hop-by-hop headers
/// (and, on credentialed routes, `Set-Cookie`) removed.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    ops: &super::ops::Ops,
    tokens: &crate::token::state::TokenState,
    generation: &Generation,
    route: &Route,
    mut parts: Parts,
    body: Incoming,
    record: &mut Record,
    up: Arc<AtomicU64>,
) -> Result<Response<Body>, Refusal> {
    let upgrade = super::upgrade::requested(&parts);
    let h2_websocket = matches!(upgrade, Some(Upgrade::H2WebSocket));
    check_route(route, &parts, h2_websocket)?;
    if h2_websocket {
        // Policy, injection and the log see the WebSocket handshake as what it is: a GET.
        parts.method = Method::GET;
    }
    let config = &generation.config;
    if let Some(r) = super::identity::destination_refusal(config, route.agent, &route.dest) {
        return Err(r);
    }
    let chosen = decide(config, route, &parts, record)?;
    if let Some(r) =
        chosen.as_ref().and_then(|(i, _)| super::identity::credential_refusal(config, route.agent, *i))
    {
        return Err(r);
    }
    // A scoped token in the credential's slot is checked here, before anything is sent.
    if let Some((index, _)) = &chosen
        && let Some(id) = crate::token::gate::check(tokens, config, *index, &route.dest, &parts, route.agent)?
    {
        record.reason = Some(format!("token {id}"));
    }
    ops.admit(config, chosen.as_ref().map(|(i, _)| *i), route.agent)?;
    let (dialer, client) = generation.upstream(chosen.as_ref().map(|(i, _)| *i), parts.version);
    prepare_upstream(&mut parts, route)?;
    if config.proxy.via {
        add_via(&mut parts.headers);
    }
    // Every response from a host a credential names is scanned, whether or not this
    // request carries the credential (it may return one sent earlier).
    let redact = config.proxy.redact_responses && config.policy.naming_host(&route.dest).next().is_some();
    if redact {
        // A compressed body could not be scanned for the secret: ask for identity.
        parts.headers.insert(header::ACCEPT_ENCODING, header::HeaderValue::from_static("identity"));
    }
    let mut body: Body = body.map_err(client_body_error).boxed();
    let tokens = super::tokens::ClientHttp { client: &generation.client, timeout: config.proxy.timeout };
    let mut replay = None;
    let credential = match chosen {
        None => None,
        Some((index, captures)) => {
            let cred = &config.credentials[index];
            body = inject(cred, &mut parts, &captures, body, &tokens).await?;
            record.decision = "injected";
            if cred.injector.token_source().is_some() && upgrade.is_none() {
                // Minted tokens can be revoked early: keep a small request replayable.
                if let Some((copy, bytes)) = replayable(&parts, &mut body).await? {
                    replay = Some((copy, bytes, captures));
                }
            }
            Some(cred)
        }
    };
    let trailer_rules = TrailerRules::new(credential, config);
    let mut resp = match upgrade {
        Some(kind) => {
            let client =
                parts.extensions.remove::<OnUpgrade>().ok_or_else(|| bad_request("cannot upgrade here"))?;
            drop(body);
            let redactors = redact.then(|| crate::redact::for_host(config, &route.dest)).flatten();
            super::upgrade::relay(config, dialer, route, parts, kind, client, redactors).await?
        }
        None => send(config, client, route, parts, body, up.clone(), &trailer_rules).await?,
    };
    if resp.status() == http::StatusCode::UNAUTHORIZED
        && let (Some(cred), Some((mut again, bytes, captures))) = (credential, replay)
        && let Some(source) = cred.injector.token_source()
    {
        // One retry with a fresh token; a second 401 goes back to the client.
        let used = source.current();
        if source.ensure(&tokens, used.as_ref()).await.is_ok() {
            let body = inject(cred, &mut again, &captures, super::respond::full(bytes), &tokens).await?;
            resp = send(config, client, route, again, body, up, &trailer_rules).await?;
        }
    }
    let resp = resp.map(|b| b.map_err(box_error).boxed());
    // Looked up now, after any token refresh above; and before hop-by-hop headers go,
    // since a Transfer-Encoding coding counts too.
    let mut resp = match redact.then(|| crate::redact::for_host(config, &route.dest)).flatten() {
        Some(set) => redact_response(&set, resp, route)?,
        None => resp,
    };
    let switching = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    let (connection, upgrade) =
        (resp.headers().get(header::CONNECTION).cloned(), resp.headers().get(header::UPGRADE).cloned());
    strip_hop_by_hop(resp.headers_mut());
    if switching && let (Some(c), Some(u)) = (connection, upgrade) {
        resp.headers_mut().insert(header::CONNECTION, c);
        resp.headers_mut().insert(header::UPGRADE, u);
    }
    if credential.is_some_and(|c| !c.pass_cookies) {
        resp.headers_mut().remove(header::SET_COOKIE);
    }
    if config.proxy.via {
        add_via(resp.headers_mut());
    }
    Ok(resp)
}

/// Mask the secrets of every credential naming this host in the response head and, as
/// it streams, the body. A coding latchkey could not scan through is refused.
fn redact_response(
    set: &crate::redact::Set,
    mut resp: Response<Body>,
    route: &Route,
) -> Result<Response<Body>, Refusal> {
    if let Some(coding) = super::body::unscannable_coding(resp.headers()) {
        return Err(Refusal::new(
            502,
            "upstream-encoding",
            format!(
                "{} sent a compressed response ({coding}) although latchkey asked for identity; it cannot be scanned for credentials, so it is not passed on",
                route.dest
            ),
        ));
    }
    super::body::redact_head(&mut resp, set);
    let (parts, body) = resp.into_parts();
    let body = Redacted::new(body, set.clone(), &parts.headers).boxed();
    Ok(Response::from_parts(parts, body))
}

fn new_record(route: &Route, parts: &Parts) -> Record {
    let target = parts.uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
    Record {
        ts: now_ts(),
        client: route.peer.ip().to_string(),
        agent: None,
        method: parts.method.to_string(),
        scheme: if route.tls { "https" } else { "http" },
        host: route.dest.host.to_string(),
        port: route.dest.port,
        path: Some(path_only(target)),
        status: None,
        decision: "blocked",
        reason: None,
        credential: None,
        bytes_up: 0,
        bytes_down: 0,
        duration_ms: 0,
        usage: None,
    }
}

/// The credential a request gets: its index and the regex captures of its host.
type Chosen = (usize, Vec<(String, String)>);

/// Ask the policy which credential (if any) this request gets.
fn decide(
    config: &Config,
    route: &Route,
    parts: &Parts,
    record: &mut Record,
) -> Result<Option<Chosen>, Refusal> {
    let target = parts.uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
    let head = RequestHead {
        method: parts.method.as_str(),
        target,
        path: parts.uri.path(),
        headers: &parts.headers,
        tls: route.tls,
    };
    let decision = config.policy.decide(&route.dest, &head, |i| {
        crate::token::gate::holds_placeholder_or_token(&config.credentials[i], parts)
    });
    match decision {
        Decision::Block(r) => Err(r),
        Decision::Pass(reason) => {
            record.decision = "passed";
            record.reason = Some(reason);
            Ok(None)
        }
        Decision::Inject { credential, captures } => {
            record.credential = Some(config.credentials[credential].name.clone());
            if crate::policy::is_trace(&head) {
                return Err(Refusal::new(
                    403,
                    "trace-refused",
                    "TRACE/TRACK (in any case, or as a method override) echo the request, credential included; refused on credentialed routes",
                ));
            }
            Ok(Some((credential, captures)))
        }
    }
}

/// Write the credential into the request. An injector that signs the body (SigV4) gets
/// it buffered, up to its limit; the request then carries the buffered copy.
async fn inject(
    cred: &Credential,
    parts: &mut Parts,
    captures: &[(String, String)],
    body: Body,
    tokens: &dyn crate::inject::gcp::TokenHttp,
) -> Result<Body, Refusal> {
    if let Some(source) = cred.injector.token_source() {
        source.ensure(tokens, None).await.map_err(|why| {
            Refusal::new(
                502,
                "credential-failed",
                format!("credential {}: cannot get a token: {why}", cred.name),
            )
        })?;
    }
    let (body, bytes) = match cred.injector.body_limit(parts) {
        None => (body, None),
        Some(limit) => {
            let bytes = buffer(body, limit).await.map_err(|e| match e {
                None => Refusal::new(
                    413,
                    "body-too-large",
                    format!(
                        "credential {} signs request bodies up to {limit} bytes; this one is larger",
                        cred.name
                    ),
                ),
                Some(e) => bad_request(format!("reading the request body failed: {e}")),
            })?;
            (super::respond::full(bytes.clone()), Some(bytes))
        }
    };
    // Files and commands are refreshed off the runtime threads, never in `inject`.
    cred.ready().await;
    cred.injector.inject(parts, captures, bytes.as_deref()).map_err(|e| match e {
        InjectError::Unavailable(why) => Refusal::new(
            502,
            "credential-failed",
            format!("credential {} cannot be used here: {why}", cred.name),
        ),
        InjectError::Refused { status, message } => {
            Refusal::new(status, "credential-refused", format!("credential {}: {message}", cred.name))
        }
    })?;
    Ok(body)
}

/// Largest request body kept for one replay after a 401.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// A copy of a request whose body is small enough to send twice (declared length within
/// `REPLAY_LIMIT`, or none); the body is buffered and `body` replaced by the buffer.
async fn replayable(parts: &Parts, body: &mut Body) -> Result<Option<(Parts, bytes::Bytes)>, Refusal> {
    let declared =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
    match declared {
        Some(n) if n <= REPLAY_LIMIT && !chunked => {}
        None if !chunked && http_body::Body::is_end_stream(body) => {}
        _ => return Ok(None),
    }
    let taken = std::mem::replace(body, super::respond::empty());
    let bytes = buffer(taken, REPLAY_LIMIT as usize)
        .await
        .map_err(|_| bad_request("reading the request body failed"))?;
    *body = super::respond::full(bytes.clone());
    let mut copy =
        http::Request::builder().method(parts.method.clone()).uri(parts.uri.clone()).version(parts.version);
    for (k, v) in &parts.headers {
        copy = copy.header(k, v);
    }
    let copy = copy.body(()).map_err(|_| bad_request("cannot copy the request"))?.into_parts().0;
    Ok(Some((copy, bytes)))
}

/// The whole body, or `Err(None)` past `limit` bytes, `Err(Some(e))` on a read error.
async fn buffer(mut body: Body, limit: usize) -> Result<bytes::Bytes, Option<super::BoxError>> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(Some)?.into_data() {
            if buf.len() + data.len() > limit {
                return Err(None);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// Send upstream within `timeout`, scanning the body (and cleaning and scanning its
/// trailers) when `trailers` or content filters ask for it.
async fn send(
    config: &Arc<Config>,
    client: &Client<Connector, Body>,
    route: &Route,
    parts: Parts,
    body: Body,
    up: Arc<AtomicU64>,
    trailers: &TrailerRules,
) -> Result<Response<Incoming>, Refusal> {
    let trailer_hit = Arc::new(std::sync::OnceLock::new());
    let body = if trailers.is_empty() {
        body
    } else {
        GuardedTrailers::new(body, trailers.clone(), trailer_hit.clone()).boxed()
    };
    let counted = Counted::new(body, up);
    let (body, hit): (Body, _) = if config.policy.filters.content.is_empty() {
        (counted.boxed(), None)
    } else {
        let scan = ScanBody::new(counted, config.clone());
        let hit = scan.hit.clone();
        (scan.boxed(), Some(hit))
    };
    let request = client.request(Request::from_parts(parts, body));
    match tokio::time::timeout(config.proxy.timeout, request).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => match (hit.as_ref().and_then(|h| h.get()), trailer_hit.get()) {
            (Some(pattern), _) => Err(Refusal::new(
                403,
                "blocked-pattern",
                format!("request body matches blocked pattern {pattern:?}"),
            )),
            (None, Some(pattern)) => Err(Refusal::new(
                403,
                "blocked-pattern",
                format!("request trailers match blocked pattern {pattern:?}"),
            )),
            (None, None) => Err(upstream_failure(&route.dest, &e)),
        },
        Err(_) => Err(Refusal::new(
            504,
            "upstream-timeout",
            format!("{} did not answer within {}s", route.dest, config.proxy.timeout.as_secs()),
        )),
    }
}

/// Invariant 1: a request inside a tunnel names the tunnel's host or nothing.
fn check_route(route: &Route, parts: &Parts, h2_websocket: bool) -> Result<(), Refusal> {
    if let Some(why) = &route.misdirected {
        return Err(misdirected(why.clone()));
    }
    if parts.headers.contains_key(super::framing::SMUGGLED) {
        return Err(Refusal::new(
            400,
            "smuggling",
            "Content-Length together with Transfer-Encoding is refused (request smuggling)",
        ));
    }
    if parts.method == Method::CONNECT && !h2_websocket {
        return Err(bad_request("CONNECT inside a tunnel is refused"));
    }
    // Inside a tunnel a Host without a port means the tunnel's port (SPEC 3.1): plain
    // HTTP written into `CONNECT host:443` is that host's, and meets invariant 6.
    let default_port = match (route.tunnel, route.tls) {
        (true, _) => route.dest.port,
        (false, true) => 443,
        (false, false) => 80,
    };
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
            return Err(misdirected(format!("request names {named} but this tunnel goes to {}", route.dest)));
        }
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(bad_request("more than one Host header"));
    }
    if let Some(value) = host.filter(|v| !route.is_exactly(v.as_bytes(), default_port)) {
        let text = value.to_str().map_err(|_| bad_request("Host header is not text"))?;
        let named = Destination::parse_authority(text, Some(default_port))
            .map_err(|e| bad_request(format!("bad Host header {text:?}: {e}")))?;
        if named != route.dest {
            return Err(misdirected(format!("Host {named} differs from the destination {}", route.dest)));
        }
    }
    Ok(())
}

/// Rewrite the request for the upstream: absolute URI built from the destination
/// (never from a client-written host), hop-by-hop headers removed, HTTP/1.1.
fn prepare_upstream(parts: &mut Parts, route: &Route) -> Result<(), Refusal> {
    // `te: trailers` is the one TE value that crosses hops (gRPC needs it).
    let trailers =
        parts.headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    strip_hop_by_hop(&mut parts.headers);
    if trailers {
        parts.headers.insert(header::TE, header::HeaderValue::from_static("trailers"));
    }
    parts.headers.remove(header::HOST);
    let pq = parts.uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
    let slash = if pq.starts_with('/') { "" } else { "/" };
    parts.uri = format!("{}{slash}{pq}", route.origin)
        .parse()
        .map_err(|_| bad_request("cannot rebuild the request URI"))?;
    parts.version = Version::HTTP_11;
    Ok(())
}

/// Append latchkey to `Via` (RFC 9110 7.6.3), keeping what earlier hops wrote.
fn add_via(headers: &mut HeaderMap) {
    const US: &str = "1.1 latchkey";
    let value = match headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {US}"),
        None => US.to_string(),
    };
    if let Ok(v) = header::HeaderValue::from_str(&value) {
        headers.insert(header::VIA, v);
    }
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
        if let Some(c) = err.downcast_ref::<ClientBodyError>() {
            return bad_request(c.to_string());
        }
        source = err.source();
    }
    let cause = std::error::Error::source(e).map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
    Refusal::new(502, "upstream-reset", format!("{dest} failed: {cause}"))
}

/// The client's request body failed (bad chunking, early close): its fault, not the
/// upstream's, so it is answered with 400 rather than 502.
#[derive(Debug)]
struct ClientBodyError(hyper::Error);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "reading the request body failed: {}", self.0)
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

fn client_body_error(e: hyper::Error) -> super::BoxError {
    Box::new(ClientBodyError(e))
}

fn box_error(e: hyper::Error) -> super::BoxError {
    Box::new(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_canonical_host_skips_parsing() {
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let route = |a: &str| {
            Route::new(Destination::parse_authority(a, Some(443)).unwrap(), true, true, None, peer, None)
        };
        let r = route("api.example.com:443");
        assert!(r.is_exactly(b"api.example.com", 443));
        assert!(r.is_exactly(b"api.example.com:443", 443));
        for other in
            ["api.example.co", "api.example.com.", "API.example.com", "api.example.com:4430", "", ":443"]
        {
            assert!(!r.is_exactly(other.as_bytes(), 443), "{other}");
        }
        let r = route("127.0.0.1:8443");
        assert!(r.is_exactly(b"127.0.0.1:8443", 443));
        assert!(!r.is_exactly(b"127.0.0.1", 443), "the default port is not this one");
    }
}
