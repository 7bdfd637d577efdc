//! Who is asking: `[agents]` proxy authentication — which agent a client is. What an
//! agent may reach and use is the policy's (`policy::agents`).

use base64::Engine;
use http::HeaderMap;
use http::header::PROXY_AUTHORIZATION;

use crate::config::{Agent, Config};
use crate::policy::{Refusal, RefusalKind};

/// The agent behind a request's `Proxy-Authorization`. `Ok(None)` when no agents are
/// configured (anyone allowed in may use the proxy); 407 when they are and the request
/// does not name one with its token.
pub fn authenticate(config: &Config, headers: &HeaderMap) -> Result<Option<usize>, Refusal> {
    if config.agents.is_empty() {
        return Ok(None);
    }
    let refuse = |why: &str| {
        Refusal::new(
            RefusalKind::ProxyAuth,
            format!("{why}; send Proxy-Authorization (see `latchkey env --agent NAME`)"),
        )
    };
    let value = headers
        .get(PROXY_AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| refuse("proxy authentication required"))?;
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    let found = if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()
            .and_then(|d| String::from_utf8(d).ok())
            .unwrap_or_default();
        let (name, token) = decoded.split_once(':').unwrap_or(("", ""));
        config.agents.iter().position(|a| a.name == name && token_matches(a, token))
    } else if scheme.eq_ignore_ascii_case("bearer") {
        config.agents.iter().position(|a| token_matches(a, rest))
    } else {
        None
    };
    found.map(Some).ok_or_else(|| refuse("unknown agent or wrong token"))
}

/// Constant-time comparison, so response timing says nothing about the token.
fn token_matches(agent: &Agent, presented: &str) -> bool {
    agent.token.as_ref().is_some_and(|t| {
        aws_lc_rs::constant_time::verify_slices_are_equal(t.expose().as_bytes(), presented.as_bytes()).is_ok()
    })
}
