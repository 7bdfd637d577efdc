//! What latchkey would do with one request, without sending it: the decision `explain`
//! prints and the running proxy answers on its local endpoints (`/latchkey/explain`,
//! `/latchkey/credentials`, `/latchkey/active`), so that `explain` and `check` in the
//! agent's shell, where the secrets are absent, describe the instance that has them.
//! Names and decisions only, never a secret value.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::inject::Slot;
use crate::policy::{CredState, Decision, Destination, Question as Ask, Refusal, RefusalKind, RequestHead};
use crate::token::state::TokenState;

/// The decision for one request (SPEC 4, `explain --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// `inject`, `pass`, `tunnel` or `block`.
    pub decision: String,
    pub credential: Option<String>,
    /// Where the secret would be written (slots), when injected.
    pub inject: Vec<Slot>,
    pub reason: String,
    /// The credential's auth type and where its secret comes from (names only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// A request to explain: method, headers, absolute URL, and the agent asking.
pub struct Question<'a> {
    pub method: &'a str,
    pub headers: &'a HeaderMap,
    pub url: &'a str,
    pub agent: Option<&'a str>,
}

/// A question `explain` cannot ask.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("bad URL {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("{0:?}: give an http:// or https:// URL")]
    NotHttp(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("bad host in {url:?}: {why}")]
    BadHost { url: String, why: String },
    #[error("no [agents.{0}]")]
    NoAgent(String),
    #[error("{0:?} is not an HTTP method")]
    BadMethod(String),
}

/// Decide exactly as the proxy does: `Config::decide`, asked first without a request
/// head for an https URL (the CONNECT), then with one (each request in the tunnel, or
/// the absolute-form request for http). A scoped token among the headers is verified
/// with `tokens` — the running proxy's own state when it answers `/latchkey/explain`.
pub fn explain(config: &Config, tokens: &TokenState, q: &Question<'_>) -> Result<Explanation, ExplainError> {
    let url = || q.url.to_string();
    let uri: Uri = q
        .url
        .parse()
        .map_err(|e: http::uri::InvalidUri| ExplainError::BadUrl { url: url(), why: e.to_string() })?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(ExplainError::NotHttp(url())),
    };
    let authority = uri.authority().ok_or_else(|| ExplainError::NoHost(url()))?;
    let dest = Destination::parse_authority(authority.as_str(), Some(if tls { 443 } else { 80 }))
        .map_err(|e| ExplainError::BadHost { url: url(), why: e.to_string() })?;
    let agent = match q.agent {
        None => None,
        Some(name) => Some(
            config
                .agents
                .iter()
                .position(|a| a.name == name)
                .ok_or_else(|| ExplainError::NoAgent(name.into()))?,
        ),
    };
    // Methods are case-sensitive, as the proxy reads them (`get` is not GET).
    let method = http::Method::from_bytes(q.method.as_bytes())
        .map_err(|_| ExplainError::BadMethod(q.method.into()))?;
    if agent.is_none() && !config.agents.is_empty() {
        let why = "with [agents] configured, every client names itself (Proxy-Authorization); ask with --agent NAME";
        return Ok(outcome("block", why.into()));
    }
    if tls {
        match config.decide(&Ask::now(agent, &dest, None), tokens) {
            Decision::Intercept => {}
            Decision::Tunnel => {
                return Ok(outcome("tunnel", "no credential or filter applies to this host".into()));
            }
            other => return Ok(described(config, &dest, other)),
        }
    }
    let target = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let head = RequestHead { method: method.as_str(), target, path: uri.path(), headers: q.headers, tls };
    Ok(described(config, &dest, config.decide(&Ask::now(agent, &dest, Some(&head)), tokens)))
}

fn outcome(decision: &str, reason: String) -> Explanation {
    Explanation {
        decision: decision.into(),
        credential: None,
        inject: vec![],
        reason,
        auth_type: None,
        source: None,
    }
}

/// A decision in `explain`'s words (SPEC 4).
fn described(config: &Config, dest: &Destination, decision: Decision) -> Explanation {
    let credential = |i: usize, reason: String| {
        let c = &config.credentials[i];
        Explanation {
            decision: "inject".into(),
            credential: Some(c.name.clone()),
            inject: c.injector.slots(),
            reason,
            auth_type: Some(c.auth_type.clone()),
            source: Some(c.source.clone()),
        }
    };
    match decision {
        Decision::Block(r) => outcome("block", r.message),
        Decision::Pass { reason, .. } => outcome("pass", reason.into_owned()),
        Decision::Inject { credential: i, token: None, .. } => {
            credential(i, format!("most specific credential for {dest}"))
        }
        Decision::Inject { credential: i, token: Some(id), .. } => credential(
            i,
            format!("most specific credential for {dest}; scoped token {id} allows this request"),
        ),
        Decision::Vend { credential: i } => Explanation {
            inject: vec![],
            ..credential(
                i,
                "latchkey answers this token request itself, with a stand-in token (never a real one)".into(),
            )
        },
        Decision::Tunnel => outcome("tunnel", "no credential or filter applies to this host".into()),
        Decision::Intercept => {
            outcome("pass", "latchkey opens this tunnel and decides each request in it".into())
        }
        Decision::Ask => outcome(
            "ask",
            format!(
                "{} is not in allowed_domains: latchkey holds it until a person answers (on_unlisted = \"ask\")",
                dest.host
            ),
        ),
    }
}

/// One credential's state, as `/latchkey/credentials` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialState {
    pub name: String,
    /// `active`, `inactive` or `failed`.
    pub state: String,
    /// Why not active (variable or file names, never values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

pub fn credential_states(config: &Config) -> Vec<CredentialState> {
    config
        .policy
        .credentials
        .iter()
        .map(|r| {
            let (state, reason) = match &r.state {
                CredState::Active => ("active", None),
                CredState::Inactive(why) => ("inactive", Some(why.clone())),
                CredState::Failed(why) => ("failed", Some(why.clone())),
            };
            CredentialState { name: r.name.clone(), state: state.into(), reason }
        })
        .collect()
}

/// The proxy port's local resources besides `/ca.crt`: `(body, content type)`, or a
/// refusal. Only loopback clients and those in `allowed_clients` may ask.
pub fn local_endpoint(
    config: &Config,
    tokens: &TokenState,
    peer: SocketAddr,
    path: &str,
    query: Option<&str>,
) -> Option<Result<(String, &'static str), Refusal>> {
    let answer = match path {
        "/latchkey/active" => Ok((active(config), "text/plain")),
        "/latchkey/credentials" => json(&credential_states(config)),
        "/latchkey/explain" => explain_query(config, tokens, query.unwrap_or("")),
        _ => return None,
    };
    Some(local_client_refusal(config, peer).map_or(answer, Err))
}

fn active(config: &Config) -> String {
    let names = config.policy.credentials.iter().filter(|c| c.state == CredState::Active);
    names.map(|c| format!("{}\n", c.name)).collect()
}

fn json<T: Serialize>(v: &T) -> Result<(String, &'static str), Refusal> {
    serde_json::to_string(v)
        .map(|s| (s, "application/json"))
        .map_err(|e| Refusal::new(RefusalKind::Internal, e.to_string()))
}

/// Loopback, or a client `allowed_clients` names; anyone else may use neither the proxy
/// nor these descriptions of it.
fn local_client_refusal(config: &Config, peer: SocketAddr) -> Option<Refusal> {
    let ip = crate::policy::host::canonical_ip(peer.ip());
    let allowed = ip.is_loopback() || config.proxy.allowed_clients.iter().any(|n| n.contains(&ip));
    (!allowed).then(|| {
        Refusal::new(
            RefusalKind::ClientNotAllowed,
            format!("client {ip} may not ask this latchkey about its policy"),
        )
    })
}

/// `/latchkey/explain?url=U&method=M&agent=A&header=K%3A%20V...`.
fn explain_query(
    config: &Config,
    tokens: &TokenState,
    query: &str,
) -> Result<(String, &'static str), Refusal> {
    let bad = |m: String| Refusal::new(RefusalKind::BadRequest, m);
    let (mut url, mut method, mut agent, mut headers) = (None, "GET".to_string(), None, HeaderMap::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = String::from_utf8(crate::policy::percent_decode(v.replace('+', " ").as_bytes()))
            .map_err(|_| bad(format!("{k}: not UTF-8")))?;
        match k {
            "url" => url = Some(v),
            "method" => method = v,
            "agent" => agent = Some(v),
            "header" => {
                let (name, value) = parse_header(&v).map_err(|e| bad(e.to_string()))?;
                headers.append(name, value);
            }
            _ => return Err(bad(format!("unknown parameter {k:?}"))),
        }
    }
    let url = url.ok_or_else(|| bad("url= is required".into()))?;
    let q = Question { method: &method, headers: &headers, url: &url, agent: agent.as_deref() };
    json(&explain(config, tokens, &q).map_err(|e| bad(e.to_string()))?)
}

/// A `--header` that is not `Name: value`.
#[derive(Debug, thiserror::Error)]
pub enum HeaderArgError {
    #[error("a header is 'Name: value', not {0:?}")]
    NoColon(String),
    #[error("bad header {0:?}")]
    Bad(String),
}

/// `Name: value`, as `explain --header` takes it.
pub fn parse_header(h: &str) -> Result<(HeaderName, HeaderValue), HeaderArgError> {
    let (k, v) = h.split_once(':').ok_or_else(|| HeaderArgError::NoColon(h.into()))?;
    match (HeaderName::from_bytes(k.trim().as_bytes()), HeaderValue::from_str(v.trim())) {
        (Ok(k), Ok(v)) => Ok((k, v)),
        _ => Err(HeaderArgError::Bad(h.into())),
    }
}

/// The query string for `/latchkey/explain`.
pub fn explain_query_string(q: &Question<'_>) -> String {
    let enc = crate::inject::encode_component;
    let mut out = format!("url={}&method={}", enc(q.url), enc(q.method));
    if let Some(a) = q.agent {
        out.push_str(&format!("&agent={}", enc(a)));
    }
    for (k, v) in q.headers {
        out.push_str(&format!("&header={}", enc(&format!("{k}: {}", v.to_str().unwrap_or("")))));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(src: &str) -> Config {
        let env = |k: &str| (k == "ANTHROPIC_API_KEY").then(|| "sk-ant-REAL".to_string());
        crate::config::compile(src, None, &env, &[]).unwrap()
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 40000)
    }

    #[test]
    fn only_loopback_and_allowed_clients_may_ask() {
        let c = config("");
        let q = Some("url=https%3A%2F%2Fapi.anthropic.com%2Fv1%2Fmessages");
        for ip in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            assert!(
                local_endpoint(&c, &TokenState::keyless(), peer(ip), "/latchkey/explain", q).unwrap().is_ok(),
                "{ip}"
            );
        }
        let refused = local_endpoint(&c, &TokenState::keyless(), peer("10.1.2.3"), "/latchkey/explain", q)
            .unwrap()
            .unwrap_err();
        assert_eq!((refused.status(), refused.token()), (403, "client-not-allowed"));
        let c = config("[proxy]\nbind = \"0.0.0.0\"\nallowed_clients = [\"10.0.0.0/8\"]\n");
        assert!(
            local_endpoint(&c, &TokenState::keyless(), peer("10.1.2.3"), "/latchkey/credentials", None)
                .unwrap()
                .is_ok()
        );
        assert!(
            local_endpoint(&c, &TokenState::keyless(), peer("192.168.1.1"), "/latchkey/active", None)
                .unwrap()
                .is_err()
        );
        assert!(
            local_endpoint(&c, &TokenState::keyless(), peer("127.0.0.1"), "/latchkey/other", None).is_none()
        );
    }

    #[test]
    fn the_endpoint_answers_names_never_values() {
        let c = config("");
        let ask = |q: &str| {
            local_endpoint(&c, &TokenState::keyless(), peer("127.0.0.1"), "/latchkey/explain", Some(q))
                .unwrap()
        };
        let headers = HeaderMap::new();
        let q = Question {
            method: "post",
            headers: &headers,
            url: "https://api.anthropic.com/v1/messages",
            agent: None,
        };
        let (body, kind) = ask(&explain_query_string(&q)).unwrap();
        assert_eq!(kind, "application/json");
        assert!(!body.contains("sk-ant-REAL"), "{body}");
        let e: Explanation = serde_json::from_str(&body).unwrap();
        assert_eq!((e.decision.as_str(), e.credential.as_deref()), ("inject", Some("anthropic")));
        assert_eq!(e.source.as_deref(), Some("env ANTHROPIC_API_KEY"));
        assert_eq!(ask("method=GET").unwrap_err().status(), 400);
        assert_eq!(ask("url=ftp%3A%2F%2Fx").unwrap_err().status(), 400);
        assert_eq!(ask("url=https%3A%2F%2Fx&agent=nobody").unwrap_err().status(), 400);
        let (body, _) =
            local_endpoint(&c, &TokenState::keyless(), peer("127.0.0.1"), "/latchkey/credentials", None)
                .unwrap()
                .unwrap();
        let states: Vec<CredentialState> = serde_json::from_str(&body).unwrap();
        let anthropic = states.iter().find(|s| s.name == "anthropic").unwrap();
        assert_eq!(anthropic.state, "active");
        assert!(
            states
                .iter()
                .any(|s| s.state == "inactive"
                    && s.reason.as_deref().is_some_and(|r| r.contains("is not set")))
        );
    }
}
