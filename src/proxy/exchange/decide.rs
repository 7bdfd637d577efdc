//! Phase "decide": ask the one decision (`Config::decide`) about this request. Pure of
//! waiting: the exchange then admits it under the budgets the decision named (the
//! limiter's state is the runtime's).

use http::request::Parts;
use http::{Response, header};

use super::super::route::Route;
use super::super::{Body, respond};
use crate::config::Config;
use crate::policy::{Budgets, Decision, Question, Refusal, RefusalKind, RequestHead, Verdict};
use crate::telemetry::{Record, Telemetry};
use crate::token::state::TokenState;

/// The credential a request gets: its index and the regex captures of its host.
pub struct Chosen {
    pub index: usize,
    pub captures: Vec<(String, String)>,
}

pub enum Decided {
    /// Goes upstream, with this credential or none, once admitted under the budgets.
    Forward(Option<Chosen>, Budgets),
    /// latchkey answers with this credential's stand-in token.
    Vend(usize),
    /// Unlisted (`on_unlisted = "ask"`): hold it for a person, then decide again.
    Ask,
}

pub fn decide(
    telemetry: &Telemetry,
    tokens: &TokenState,
    config: &Config,
    route: &Route,
    parts: &Parts,
    person: Verdict,
    record: &mut Record,
) -> Result<Decided, Refusal> {
    telemetry.log_ready()?;
    let head = head(route, parts);
    let q = Question::now(route.agent, &route.dest, Some(&head)).answered(person);
    match config.decide(&q, tokens) {
        Decision::Block(r) => {
            if names_credential(r.kind) {
                // Refused although a credential would apply: the record names it.
                record.credential =
                    config.policy.winner(&route.dest, &head).map(|i| config.credentials[i].label.clone());
            }
            Err(r)
        }
        Decision::Pass { reason, budgets } => {
            record.decision = "passed";
            record.reason = Some(reason);
            Ok(Decided::Forward(None, budgets))
        }
        Decision::Inject { credential, captures, budgets, token } => {
            record.credential = Some(config.credentials[credential].label.clone());
            if let Some(id) = token {
                // The scoped token the decision accepted, by id (never the token).
                record.reason = Some(format!("token {id}").into());
            }
            Ok(Decided::Forward(Some(Chosen { index: credential, captures }), budgets))
        }
        Decision::Vend { credential } => Ok(Decided::Vend(credential)),
        Decision::Ask if person == Verdict::Unasked => Ok(Decided::Ask),
        Decision::Ask => Err(Refusal::new(
            RefusalKind::Internal,
            "a request a person answered about was asked about again",
        )),
        // Only a question without a request head is answered with a tunnel.
        Decision::Tunnel | Decision::Intercept => {
            Err(Refusal::new(RefusalKind::Internal, "a request was decided as a tunnel"))
        }
    }
}

/// What the policy sees of a request.
pub fn head<'a>(route: &Route, parts: &'a Parts) -> RequestHead<'a> {
    RequestHead {
        method: parts.method.as_str(),
        target: parts.uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/"),
        path: parts.uri.path(),
        headers: &parts.headers,
        tls: route.tls,
    }
}

/// Refusals of a request that had a credential: the agent may not use it, the method
/// would echo it, the host would mint with it, the token in its slot does not allow it.
fn names_credential(kind: RefusalKind) -> bool {
    matches!(
        kind,
        RefusalKind::AgentCredential
            | RefusalKind::TraceRefused
            | RefusalKind::MintingEndpoint
            | RefusalKind::Token
    )
}

/// latchkey's own answer to a client library's token request (the decision `Vend`).
pub fn vended(config: &Config, credential: usize, record: &mut Record) -> Result<Response<Body>, Refusal> {
    let vended = config.credentials[credential]
        .injector
        .vend()
        .ok_or_else(|| Refusal::new(RefusalKind::Internal, "this credential vends no token"))?;
    record.decision = "injected";
    record.reason = Some("token vended by latchkey (stub credentials)".into());
    let mut resp = Response::new(respond::full(vended.body));
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(vended.content_type));
    Ok(resp)
}

/// What a person is shown about a held request: its destination, agent, method, path
/// (without query) and the credential it would get.
pub fn asking(config: &Config, route: &Route, parts: &Parts) -> crate::approvals::Asking {
    let credential = config.policy.winner(&route.dest, &head(route, parts));
    super::super::held::asking(
        config,
        &route.dest,
        route.agent,
        parts.method.as_str(),
        Some(parts.uri.path()),
        credential,
    )
}
