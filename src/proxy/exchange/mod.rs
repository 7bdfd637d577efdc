//! One request to a known destination, in named phases — one phase per file, in the
//! manner of pingora's `ProxyHttp` hooks and linkerd2-proxy's one-layer-per-file stack:
//!
//! 1. admit           (`log`)              counted in flight; its record and span begun
//! 2. check route     (`super::route`)     the request names the connection's destination
//! 3. decide          (`decide`)           the one decision, then admission under its budgets
//! 4. prepare         (`upstream_request`) the upstream request: URI from the destination
//! 5. screen          (`dlp`)              `[proxy.dlp]`: secrets in what the client sends
//! 6. inject          (`inject`)           the credential written, through its injector's hooks
//! 7. send            (`send`)             upstream within the timeout; one replay after a 401
//! 8. filter response (`response`)         redaction, hop-by-hop headers, cookies
//! 9. log             (`log`)              usage read as the body streams; one record at its end
//!
//! This file names no credential scheme: what one needs (a token refreshed, a body
//! hashed, a replay) it asks for through the `Injector` hooks.

mod decide;
mod dlp;
mod inject;
mod log;
mod response;
mod send;
mod upstream_request;
pub(super) use upstream_request::strip_hop_by_hop;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;

use http::{Method, Request, Response};

use super::linger::{ClientBody, Lingering};
use super::route::Route;
use super::token_client::ClientHttp;
use super::upgrade::{self, Upgrade};
use super::{Body, Generation, Proxy};
use crate::policy::{Refusal, RefusalKind};
use decide::Decided;

/// What an exchange ends in, besides a refusal.
enum Answer {
    /// The upstream's response, on its way to the client.
    Forwarded(Response<Body>),
    /// latchkey answered itself (a vended token).
    Local(Response<Body>),
}

/// The exchange for one request, boxed: hyper keeps a slot sized for its service's
/// future on every connection, busy or not, so that future holds only this box, and
/// the exchange's state is allocated while a request is in flight.
///
/// Boxed by plain functions, not inside an `async fn`: a future built in an async body
/// can take room in that body's own state as well as in its box. hyper moves its
/// service's future into that slot on every request: `Conn::request`'s future measured
/// 1,768 bytes with the exchange's admission inline, 712 with it boxed (callgrind: 2.5%
/// fewer instructions per keep-alive request).
///
/// Phase "admit" runs here, before the box is made, and the box holds an async block,
/// not an `async fn`'s future: such a future keeps every argument twice (as passed, and
/// moved into its body), so taking the request whole kept its 280 bytes beside its parts
/// and the record — 1,072 bytes in all, past the 1,032 that glibc's per-thread cache
/// serves; a larger block takes malloc's slow path, ~500 instructions a request.
pub fn handle(
    proxy: Arc<Proxy>,
    generation: Arc<Generation>,
    route: Arc<Route>,
    req: Request<ClientBody>,
) -> Pin<Box<impl Future<Output = Result<Response<Body>, Infallible>> + Send>> {
    let (parts, body) = req.into_parts();
    let body = Lingering::new(body);
    let mut x = log::Exchange::admit(&proxy, &generation, &route, &parts);
    Box::pin(async move {
        let answered = exchange(&proxy, &generation, &route, parts, body, &mut x).await;
        Ok(x.end(answered, &generation.config, &route))
    })
}

/// The exchange's phases in a box of their own: `handle`'s box keeps the record while
/// they run. An async block, not an `async fn`: the block holds `parts` and `body` once,
/// where an `async fn`'s future would keep them as passed and again as moved into its
/// body.
fn exchange<'a>(
    proxy: &'a Proxy,
    generation: &'a Generation,
    route: &'a Route,
    mut parts: http::request::Parts,
    body: Lingering,
    x: &'a mut log::Exchange,
) -> Pin<Box<impl Future<Output = Result<Answer, Refusal>> + Send + 'a>> {
    Box::pin(async move {
        let config = &generation.config;
        if proxy.exchanges.closing() {
            return Err(Refusal::new(
                RefusalKind::ShuttingDown,
                "latchkey is shutting down; send the request again on a new connection",
            ));
        }
        let upgrade = upgrade::requested(&parts);
        let h2_websocket = matches!(upgrade, Some(Upgrade::H2WebSocket));
        super::route::check(route, &parts, h2_websocket)?;
        if h2_websocket {
            // Policy, injection and the log see the WebSocket handshake as what it is: a GET.
            parts.method = Method::GET;
        }
        let mut decided = decide::decide(
            &proxy.telemetry,
            &proxy.tokens,
            config,
            route,
            &parts,
            route.person,
            &mut x.record,
        )?;
        if let Decided::Ask = decided {
            // Held before anything goes upstream, until a person answers.
            // Boxed: a held request is rare, and its wait would size every exchange.
            let holding = Box::pin(proxy.held(config, decide::asking(config, route, &parts)));
            let person = holding.await?;
            decided = decide::decide(
                &proxy.telemetry,
                &proxy.tokens,
                config,
                route,
                &parts,
                person,
                &mut x.record,
            )?;
        }
        let chosen = match decided {
            Decided::Vend(credential) => {
                return decide::vended(config, credential, &mut x.record).map(Answer::Local);
            }
            Decided::Forward(chosen, budgets) => {
                proxy.telemetry.admit(&config.policy, budgets).await?;
                chosen
            }
            Decided::Ask => return Err(Refusal::new(crate::policy::RefusalKind::Internal, "asked twice")),
        };
        let credential = chosen.as_ref().map(|c| &config.credentials[c.index]);
        // The pool follows the client's protocol; the request itself goes as HTTP/1.1.
        let version = parts.version;
        let redact = upstream_request::prepare(&mut parts, route, config)?;
        let tokens = ClientHttp { client: &generation.client, timeout: config.proxy.timeout };
        let body = send::request_body(body);
        let screened = match config.dlp {
            None => dlp::Screened { body, warned: false },
            // Boxed: a body held for the scan would size every exchange.
            Some(_) => {
                Box::pin(dlp::screen(
                    config,
                    route,
                    &mut parts,
                    body,
                    credential,
                    upgrade.is_some(),
                    &mut x.record,
                ))
                .await?
            }
        };
        let (body, warned) = (screened.body, screened.warned);
        let (body, replay) = match (&chosen, credential) {
            (Some(chosen), Some(cred)) => {
                let injected =
                    inject::inject(cred, &chosen.captures, &mut parts, body, &tokens, upgrade.is_none())
                        .await?;
                x.record.decision = "injected";
                injected
            }
            _ => (body, None),
        };
        if warned {
            x.record.decision = "warned";
        }
        // Made once the waits before it are over: the future does not carry it through them.
        let to =
            send::Upstream::new(generation, route, chosen.as_ref().map(|c| c.index), version, credential);
        let resp = match upgrade {
            // Boxed: an upgrade's handshake state would size every exchange.
            Some(kind) => {
                let relaying = Box::pin(to.relay(parts, kind, redact));
                relaying.await?
            }
            None => to.send(parts, body, replay, &tokens, &x.up).await?,
        };
        response::filter(resp, config, route, credential, redact).map(Answer::Forwarded)
    })
}
