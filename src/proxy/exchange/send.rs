//! Phase "send": the request goes upstream within `timeout` — its body counted, scanned
//! for `blocked_patterns`, its trailers cleaned — on the pool its credential selects;
//! an upgrade is relayed on a connection of its own. A credential the upstream refuses
//! with 401 gets one renewal and one replay, when its injector asks for that.

use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::Either;
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;

use super::super::answered;
use super::super::body::{Counted, ScanBody};
use super::super::linger::Lingering;
use super::super::pool::{Pool, SendError};
use super::super::route::Route;
use super::super::trailers::{GuardedTrailers, TrailerRules};
use super::super::upgrade::{self, Upgrade};
use super::super::upstream::{Dialer, UpstreamError};
use super::super::{Body, BoxError, Generation, respond};
use super::inject::{Replay, write};
use super::log::UpCount;
use crate::config::{Config, Credential};
use crate::inject::TokenHttp;
use crate::policy::{Refusal, RefusalKind};

/// A blocked pattern a body scan met, set when it stopped the body.
type Hit = Arc<std::sync::OnceLock<String>>;

/// Where a request goes and what it is sent with.
pub struct Upstream<'a> {
    config: &'a Arc<Config>,
    route: &'a Route,
    dialer: &'a Arc<Dialer>,
    client: &'a Pool,
    credential: Option<&'a Credential>,
}

impl<'a> Upstream<'a> {
    /// The dialer and pool for a request of `version` that selected `index` (or none).
    pub fn new(
        generation: &'a Generation,
        route: &'a Route,
        index: Option<usize>,
        version: http::Version,
        credential: Option<&'a Credential>,
    ) -> Self {
        let (dialer, client) = generation.upstream(index, version);
        let config = &generation.config;
        Upstream { config, route, dialer, client, credential }
    }

    /// Send, and on a 401 to a renewable credential send once more with a new one
    /// (a second 401 goes back to the client).
    pub fn send(
        &self,
        parts: Parts,
        body: Body,
        replay: Option<Box<Replay>>,
        http: &dyn TokenHttp,
        up: &UpCount,
    ) -> impl Future<Output = Result<Response<Body>, Refusal>> + Send {
        // A combinator, not an async block: awaiting the first send in a block would
        // keep its future twice (captured, and moved in to be awaited).
        self.send_once(parts, body, up).then(move |sent| match (sent, self.credential, replay) {
            // Boxed: a renewal and its replay are rare; inline, they would size every send.
            (Ok(resp), Some(cred), Some(again)) if resp.status() == StatusCode::UNAUTHORIZED => {
                Either::Left(Box::pin(self.renewed(cred, resp, *again, http, up)))
            }
            (sent, ..) => Either::Right(std::future::ready(sent)),
        })
    }

    /// `refused` (a 401) again with a renewed credential, or as it is when the
    /// credential does not renew.
    async fn renewed(
        &self,
        cred: &Credential,
        refused: Response<Body>,
        mut again: Replay,
        http: &dyn TokenHttp,
        up: &UpCount,
    ) -> Result<Response<Body>, Refusal> {
        if !cred.injector.renew(http).await {
            return Ok(refused);
        }
        // Its connection goes back to the pool before the replay asks for one.
        drop(refused);
        let body = write(cred, &again.captures, &mut again.parts, respond::full(again.body), http).await?;
        self.send_once(again.parts, body, up).await
    }

    /// An upgrade (WebSocket) relayed on a dedicated upstream connection.
    pub async fn relay(
        &self,
        mut parts: Parts,
        kind: Upgrade,
        redact: bool,
    ) -> Result<Response<Body>, Refusal> {
        let client = upgrade::ClientSide::take(&mut parts.extensions)
            .ok_or_else(|| Refusal::bad_request("cannot upgrade here"))?;
        let redactors =
            redact.then(|| crate::redact::for_credentials(self.config, &self.route.naming)).flatten();
        let scans = upgrade::Scans { redactors, screen: super::dlp::ws_screen(self.config, self.route) };
        let resp = upgrade::relay(self.config, self.dialer, self.route, parts, kind, client, scans).await?;
        Ok(resp.map(|b| b.map_err(box_error).boxed()))
    }

    /// Send upstream within `timeout`, scanning the body (and cleaning and scanning its
    /// trailers) when the trailer rules or content filters ask for it.
    ///
    /// The request is handed to the pool before the future is made: the future holds the
    /// pool's (boxed) send, not the request's head as well.
    fn send_once(
        &self,
        parts: Parts,
        body: Body,
        up: &UpCount,
    ) -> impl Future<Output = Result<Response<Body>, Refusal>> + Send + use<'_, 'a> {
        let config = self.config;
        // An empty body (most requests) has nothing to count or scan, and no trailers to
        // guard: sent as it is, without the boxes.
        let empty = http_body::Body::is_end_stream(&body);
        let rules = (!empty).then(|| TrailerRules::new(self.credential, config)).filter(|r| !r.is_empty());
        let (body, trailer_hit) = match rules {
            None => (body, None),
            Some(rules) => {
                let hit = Hit::default();
                (GuardedTrailers::new(body, rules, hit.clone()).boxed(), Some(hit))
            }
        };
        let up = || up.get_or_init(Arc::default).clone();
        let (body, hit): (Body, _) = if empty {
            (body, None)
        } else if config.policy.filters.content.is_empty() {
            (Counted::new(body, up()).boxed(), None)
        } else {
            let scan = ScanBody::new(Counted::new(body, up()), config.clone());
            let hit = scan.filter.hit.clone();
            (scan.boxed(), Some(hit))
        };
        // An upload outliving its answer gets `timeout` after the answer's end.
        let (body, answered) = match empty {
            true => (body, None),
            false => {
                let (bounded, answered) = answered::bounded(body, config.proxy.timeout);
                (bounded.boxed(), Some(answered))
            }
        };
        let request = self.client.request(Request::from_parts(parts, body));
        async move {
            match tokio::time::timeout(config.proxy.timeout, request).await {
                Ok(Ok(resp)) => Ok(match answered {
                    Some(answered) => resp.map(|body| answered(body).boxed()),
                    None => resp,
                }),
                Ok(Err(e)) => Err(self.failure(&e, hit.as_ref(), trailer_hit.as_ref())),
                Err(_) => Err(Refusal::new(
                    RefusalKind::UpstreamTimeout,
                    format!("{} did not answer within {}s", self.route.dest, config.proxy.timeout.as_secs()),
                )),
            }
        }
    }

    /// Why a send failed: a blocked pattern in the body or its trailers (the scan
    /// stopped it), or the upstream's or the client body's own failure.
    fn failure(&self, e: &SendError, hit: Option<&Hit>, trailer_hit: Option<&Hit>) -> Refusal {
        match (hit.and_then(|h| h.get()), trailer_hit.and_then(|h| h.get())) {
            (Some(pattern), _) => Refusal::new(
                RefusalKind::BlockedPattern,
                format!("request body matches blocked pattern {pattern:?}"),
            ),
            (None, Some(pattern)) => Refusal::new(
                RefusalKind::BlockedPattern,
                format!("request trailers match blocked pattern {pattern:?}"),
            ),
            (None, None) => upstream_failure(self.route, e),
        }
    }
}

/// The client's request body, its read errors told apart from the upstream's.
pub fn request_body(body: Lingering) -> Body {
    body.map_err(|e| -> BoxError { Box::new(ClientBodyError(e)) }).boxed()
}

fn upstream_failure(route: &Route, e: &SendError) -> Refusal {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(u) = err.downcast_ref::<UpstreamError>() {
            return respond::upstream_refusal(u);
        }
        if let Some(c) = err.downcast_ref::<ClientBodyError>() {
            return Refusal::bad_request(c.to_string());
        }
        if let Some(b) = err.downcast_ref::<super::dlp::BlockedSecret>() {
            return b.0.clone();
        }
        source = err.source();
    }
    let cause = std::error::Error::source(e).map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
    Refusal::new(RefusalKind::UpstreamReset, format!("{} failed: {cause}", route.dest))
}

/// The client's request body failed (bad chunking, early close): its fault, not the
/// upstream's, so it is answered with 400 rather than 502.
#[derive(Debug, thiserror::Error)]
#[error("reading the request body failed: {0}")]
struct ClientBodyError(#[source] BoxError);

fn box_error(e: hyper::Error) -> BoxError {
    Box::new(e)
}
