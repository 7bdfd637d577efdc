//! The request path's one call into tokens, made once the policy has chosen the
//! credential: a token in that credential's slot is verified against the request's real
//! destination, canonical path, method, time and agent before the secret replaces it;
//! `require_token` refuses a request whose slot holds none.

use super::state::TokenState;
use super::{Request, Target, TokenRefusal};
use crate::config::{Config, Credential};
use crate::inject::Slot;
use crate::policy::{Destination, Refusal, RefusalKind, RequestHead};

/// `Ok(Some(id))`: the slot held a valid token (its id, for the log). `Ok(None)`: no
/// token, and none required. `Err`: 403 `token`, nothing is forwarded.
pub fn check(
    state: &TokenState,
    config: &Config,
    credential: usize,
    dest: &Destination,
    head: &RequestHead<'_>,
    agent: Option<usize>,
) -> Result<Option<String>, Refusal> {
    let cred = &config.credentials[credential];
    let presented = cred.injector.presented(dest, head).filter(|v| super::looks_like_token(v));
    let Some(text) = presented else {
        return match cred.require_token {
            true => Err(refusal(format!(
                "credential {} requires a scoped token in {}; mint one with `latchkey token mint --credential {}`",
                cred.name,
                describe_slots(cred),
                cred.name
            ))),
            false => Ok(None),
        };
    };
    let mut snapshot = state.snapshot();
    if matches!(snapshot.root, Ok(None)) {
        // Created a moment ago (`latchkey token mint`, `exec --token-ttl`): look now
        // rather than at the next periodic check. Only tokens sent to a keyless proxy
        // come here.
        state.refresh(false);
        snapshot = state.snapshot();
    }
    let revoked =
        snapshot.revoked.as_ref().map_err(|e| refused(None, &TokenRefusal::RevocationUnknown(e.clone())))?;
    let token = state.verified(&text, &snapshot).map_err(|r| refused(None, &r))?;
    let host = dest.host.to_string();
    let path = crate::policy::canonical_path(head.path);
    let shared: Vec<&str> = config
        .credentials
        .iter()
        .filter(|c| c.name != cred.name && c.placeholder == cred.placeholder)
        .map(|c| c.name.as_str())
        .collect();
    let req = Request {
        host: &host,
        port: dest.port,
        path: path.as_deref(),
        method: plain_method(head),
        agent: agent.map(|i| config.agents[i].name.as_str()),
        now: super::now(),
    };
    let target = Target { name: &cred.name, shares_placeholder_with: &shared };
    super::authorize(&token, revoked, &target, &req).map_err(|r| refused(Some(token.id()), &r))?;
    Ok(Some(token.id().to_string()))
}

/// For `require_placeholder`: a token in the slot stands where the placeholder goes.
pub fn holds_placeholder_or_token(cred: &Credential, dest: &Destination, head: &RequestHead<'_>) -> bool {
    cred.injector.carries_placeholder(dest, head, &cred.placeholder)
        || cred.injector.presented(dest, head).is_some_and(|v| super::looks_like_token(&v))
}

/// The request method, unless a method override claims another one: then no `method`
/// fact at all, so a method-scoped token refuses the request (a server honouring the
/// override would run a method the token does not allow).
fn plain_method<'a>(head: &RequestHead<'a>) -> Option<&'a str> {
    let overrides = crate::policy::override_methods(head);
    overrides.iter().all(|m| m == head.method).then_some(head.method)
}

fn describe_slots(cred: &Credential) -> String {
    let slots: Vec<String> = cred
        .injector
        .slots()
        .into_iter()
        .map(|s| match s {
            Slot::Header { header } => header,
            Slot::Query { query } => format!("query parameter {query}"),
        })
        .collect();
    if slots.is_empty() { "its slot".into() } else { slots.join(" or ") }
}

fn refused(id: Option<&str>, why: &TokenRefusal) -> Refusal {
    match id {
        Some(id) => refusal(format!("token {id} refused: {why}")),
        None => refusal(format!("token refused: {why}")),
    }
}

fn refusal(message: String) -> Refusal {
    Refusal::new(RefusalKind::Token, message)
}
