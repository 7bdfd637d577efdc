//! Minting for `exec --token-ttl` where the key is not readable: the running proxy
//! answers `GET /latchkey/token?credential=NAME&ttl=SECONDS` on its port, for loopback
//! clients (and those `allowed_clients` names). It mints nothing its caller could not
//! already do without a token: with `[agents]`, only for an authenticated agent
//! (Proxy-Authorization), only for credentials that agent may use, bound to it; without
//! agents, never for a `require_token` credential (anyone who can reach the port could
//! otherwise have one).

use http::HeaderMap;

use super::{HostRule, Restriction};
use crate::config::Config;
use crate::policy::{CredState, Refusal, RefusalKind};

/// Longest lifetime a token minted over the proxy port may have.
pub const MAX_TTL: u64 = 24 * 3600;

/// Where the proxy port answers.
pub const PATH: &str = "/latchkey/token";

/// `mint` off the runtime threads (it reads or creates the key file); the proxy's own
/// view of the key is refreshed at once, so the token works on the next request.
pub async fn answer(
    state: &std::sync::Arc<super::state::TokenState>,
    config: &std::sync::Arc<Config>,
    peer: std::net::SocketAddr,
    headers: &HeaderMap,
    cert: Option<&crate::proxy::agent_auth::ClientCert>,
    query: Option<&str>,
) -> Result<String, Refusal> {
    let (state, config, headers, cert) = (state.clone(), config.clone(), headers.clone(), cert.cloned());
    let query = query.unwrap_or("").to_string();
    tokio::task::spawn_blocking(move || {
        let minted = mint(&config, peer, &headers, cert.as_ref(), &query);
        if minted.is_ok() {
            state.refresh(false);
        }
        minted
    })
    .await
    .unwrap_or_else(|_| Err(Refusal::new(RefusalKind::Internal, "minting failed")))
}

/// The token, or the refusal. Reads (or creates) `token.key` in the CA directory.
pub fn mint(
    config: &Config,
    peer: std::net::SocketAddr,
    headers: &HeaderMap,
    cert: Option<&crate::proxy::agent_auth::ClientCert>,
    query: &str,
) -> Result<String, Refusal> {
    let bad = |m: String| Refusal::bad_request(m);
    let ip = crate::policy::host::canonical_ip(peer.ip());
    if !ip.is_loopback() && !config.proxy.allowed_clients.iter().any(|n| n.contains(&ip)) {
        return Err(Refusal::new(RefusalKind::ClientNotAllowed, format!("client {ip} may not mint tokens")));
    }
    let (mut name, mut ttl) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = String::from_utf8(crate::policy::percent_decode(v.as_bytes()))
            .map_err(|_| bad(format!("{k}: not UTF-8")))?;
        match k {
            "credential" => name = Some(v),
            "ttl" => ttl = Some(super::parse_duration(&v).map_err(bad)?),
            _ => return Err(bad(format!("unknown parameter {k:?}"))),
        }
    }
    let name = name.ok_or_else(|| bad("credential= is required".into()))?;
    let ttl = ttl.ok_or_else(|| bad("ttl= is required".into()))?;
    if ttl > MAX_TTL {
        return Err(bad(format!("ttl is at most {MAX_TTL} seconds over the proxy port")));
    }
    let index = config
        .credentials
        .iter()
        .position(|c| c.name == name)
        .filter(|i| config.policy.credentials[*i].state == CredState::Active)
        .ok_or_else(|| bad(format!("no active credential {name:?}")))?;
    if !super::takes_token(&config.credentials[index]) {
        return Err(bad(format!("credential {name} has no slot a token could go in")));
    }
    let agent = crate::proxy::agent_auth::authenticate(config, headers, cert)?;
    if let Some(r) = agent.and_then(|a| config.policy.agents[a].credential_refusal(index, &name)) {
        return Err(r);
    }
    if agent.is_none() && config.policy.credentials[index].require_token {
        return Err(Refusal::new(
            RefusalKind::Token,
            format!(
                "credential {name} requires a token: tokens for it are minted over the proxy port only for an [agents] identity (or with `latchkey token mint` where token.key is readable)"
            ),
        ));
    }
    let r = Restriction {
        hosts: credential_hosts(config, index),
        agents: agent.map(|i| config.agents[i].name.clone()).into_iter().collect(),
        not_after: Some(super::now() + ttl),
        ..Default::default()
    };
    let dir = &config.proxy.ca_dir;
    let root = super::keys::token_root(dir, true).ok().flatten().ok_or_else(|| {
        Refusal::new(RefusalKind::Internal, "this latchkey cannot read or create its token key")
    })?;
    super::mint(&root, &config.credentials[index].name, &r)
        .map_err(|e| Refusal::new(RefusalKind::Internal, e))
}

/// The hosts of a credential and of those sharing its placeholder, when a token can
/// express them all; empty (no host check: the token is still bound to the credential,
/// which applies only to its own hosts) when one is a regex or a CIDR.
pub fn credential_hosts(config: &Config, index: usize) -> Vec<HostRule> {
    let placeholder = &config.credentials[index].placeholder;
    let patterns = config
        .credentials
        .iter()
        .zip(&config.policy.credentials)
        .filter(|(c, _)| &c.placeholder == placeholder)
        .flat_map(|(_, rule)| &rule.patterns);
    let hosts: Option<Vec<HostRule>> = patterns.map(HostRule::from_pattern).collect();
    hosts.map(|h| super::scope::sorted(&h)).unwrap_or_default()
}
