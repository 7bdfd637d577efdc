//! The admin API (SPEC 10): the view's login, approvals, credentials and usage. Names,
//! states and counts — never a secret value.

use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Token;
use super::{Reply, json_reply, refused};
use crate::approvals::{Choice, DecideError, Scope};
use crate::config::Config;
use crate::limits;
use crate::policy::CredState;
use crate::proxy::Proxy;

/// The most of a request body read (a login, a decision).
const MAX_BODY: usize = 16 * 1024;

async fn body_json<T: for<'de> Deserialize<'de>>(req: Request<Incoming>) -> Result<T, Reply> {
    let bytes = http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| refused(StatusCode::PAYLOAD_TOO_LARGE, "request body too large or broken"))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| refused(StatusCode::BAD_REQUEST, &format!("bad JSON body: {e}")))
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

/// `POST /login` `{"token": ...}`: the view's login; sets the session cookie.
pub async fn login(token: &Token, req: Request<Incoming>) -> Reply {
    let login: Login = match body_json(req).await {
        Ok(l) => l,
        Err(r) => return r,
    };
    if !token.is(&login.token) {
        return refused(StatusCode::UNAUTHORIZED, "wrong admin token");
    }
    let mut r = json_reply(StatusCode::OK, &json!({ "csrf": token.csrf() }));
    if let Ok(v) = HeaderValue::from_str(&token.set_cookie()) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[derive(Deserialize)]
struct Decision {
    decision: Choice,
    #[serde(default = "once")]
    scope: Scope,
}

fn once() -> Scope {
    Scope::Once
}

/// `POST /api/approvals/{id}` `{"decision": "allow|deny", "scope": "once|run|always"}`.
pub async fn decide(proxy: &Proxy, id: &str, req: Request<Incoming>) -> Reply {
    let d: Decision = match body_json(req).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    match proxy.approvals.decide(id, d.decision, d.scope).await {
        Ok(p) => json_reply(StatusCode::OK, &json!(p)),
        Err(e @ DecideError::Unknown(_)) => refused(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e @ DecideError::DenyRun) => refused(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e @ DecideError::File(_)) => refused(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        Err(e @ DecideError::Shared(_)) => refused(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// `GET /api/credentials`: name, hosts, state and limits of each credential (no value,
/// no source).
pub fn credentials(config: &Config) -> Value {
    let list: Vec<Value> = config
        .policy
        .credentials
        .iter()
        .zip(&config.credentials)
        .filter(|(rule, c)| !(c.builtin && matches!(rule.state, CredState::Inactive(_))))
        .map(|(rule, c)| {
            let state = match &rule.state {
                CredState::Active => "active",
                CredState::Inactive(_) => "inactive",
                CredState::Failed(_) => "failed",
            };
            json!({
                "name": c.name,
                "auth_type": c.auth_type,
                "hosts": rule.patterns.iter().map(|p| p.source.clone()).collect::<Vec<_>>(),
                "state": state,
                "requests_per_minute": rule.limits.requests_per_minute,
                "tokens_per_day": rule.limits.tokens_per_day,
            })
        })
        .collect();
    json!(list)
}

/// `GET /api/usage`: LLM tokens spent today per credential and agent, beside their
/// `tokens_per_day` and `requests_per_minute`.
pub fn usage(proxy: &Proxy) -> Value {
    let config = proxy.generation().config.clone();
    let spent = |scope, name: &str| proxy.telemetry.limits.tokens_today(scope, name);
    let credentials: Vec<Value> = config
        .policy
        .credentials
        .iter()
        .filter(|r| r.state == CredState::Active)
        .map(|r| {
            json!({
                "name": r.name,
                "tokens_today": spent(limits::Scope::Credential, &r.name),
                "tokens_per_day": r.limits.tokens_per_day,
                "requests_per_minute": r.limits.requests_per_minute,
            })
        })
        .collect();
    let agents: Vec<Value> = config
        .policy
        .agents
        .iter()
        .map(|a| {
            json!({
                "name": a.name,
                "tokens_today": spent(limits::Scope::Agent, &a.name),
                "tokens_per_day": a.limits.tokens_per_day,
                "requests_per_minute": a.limits.requests_per_minute,
            })
        })
        .collect();
    json!({ "credentials": credentials, "agents": agents, "watchers": proxy.telemetry.live.watchers() })
}
