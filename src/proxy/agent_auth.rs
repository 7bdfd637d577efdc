//! Who is asking: `[agents]` proxy authentication, and what each agent may use.

use base64::Engine;
use http::HeaderMap;
use http::header::PROXY_AUTHORIZATION;

use crate::config::{Agent, Config};
use crate::policy::{Destination, Refusal};

/// The agent behind a request's `Proxy-Authorization`. `Ok(None)` when no agents are
/// configured (anyone allowed in may use the proxy); 407 when they are and the request
/// does not name one with its token.
pub fn authenticate(config: &Config, headers: &HeaderMap) -> Result<Option<usize>, Refusal> {
    if config.agents.is_empty() {
        return Ok(None);
    }
    let refuse = |why: &str| {
        Refusal::new(
            407,
            "proxy-auth",
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

/// The agent's own allowlist, layered on the global policy.
pub fn destination_refusal(config: &Config, agent: Option<usize>, dest: &Destination) -> Option<Refusal> {
    let agent = &config.agents[agent?];
    if agent.allowed.is_empty() {
        return None;
    }
    let port_ok = |p: Option<u16>| p.map_or(dest.port == 443 || dest.port == 80, |p| p == dest.port);
    let allowed = agent.allowed.iter().any(|p| p.matches_host(&dest.host).is_some() && port_ok(p.port));
    (!allowed).then(|| {
        Refusal::new(
            403,
            "not-allowlisted",
            format!("agent {} may not reach {dest} (its allowed_domains)", agent.name),
        )
    })
}

/// May this agent use credential `index`?
pub fn credential_refusal(config: &Config, agent: Option<usize>, index: usize) -> Option<Refusal> {
    let agent = &config.agents[agent?];
    let allowed = agent.credentials.as_ref().is_none_or(|list| list.contains(&index));
    (!allowed).then(|| {
        let cred = &config.credentials[index].name;
        Refusal::new(403, "agent-credential", format!("agent {} may not use credential {cred}", agent.name))
    })
}

pub fn agent_name(config: &Config, agent: Option<usize>) -> Option<String> {
    agent.map(|i| config.agents[i].name.clone())
}
