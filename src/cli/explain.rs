//! `latchkey explain`: what latchkey would do with one request, without sending it.
//! When a latchkey with this config's CA answers at the configured address, its answer
//! (it holds the secrets; this shell may not); otherwise this shell's config.

use std::path::PathBuf;
use std::process::ExitCode;

use http::HeaderMap;
use serde_json::json;

use super::load_config;
use crate::explain::{Explanation, Question};
use crate::token::state::TokenState;

/// Which latchkey an answer describes.
pub enum Described {
    /// The instance running at this address (same CA).
    Running(std::net::SocketAddr),
    /// This process's view of the config; `None` when `--local` asked for it.
    Config(Option<std::net::SocketAddr>),
}

impl Described {
    fn note(&self) -> String {
        match self {
            Described::Running(addr) => format!("(decided by the latchkey running at {addr})"),
            Described::Config(Some(addr)) => format!(
                "(decided from this shell's config: no latchkey with this CA answers at {addr}; credentials whose secrets are absent here count as inactive)"
            ),
            Described::Config(None) => "(decided from this shell's config, as asked with --local)".into(),
        }
    }

    fn json(&self) -> (serde_json::Value, serde_json::Value) {
        match self {
            Described::Running(addr) => (json!("running"), json!(addr.to_string())),
            Described::Config(_) => (json!("config"), serde_json::Value::Null),
        }
    }
}

pub struct Args {
    pub method: String,
    pub headers: Vec<String>,
    pub agent: Option<String>,
    pub json: bool,
    pub local: bool,
    pub url: String,
}

pub fn explain(config: Option<PathBuf>, args: Args) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut headers = HeaderMap::new();
    for h in &args.headers {
        match crate::explain::parse_header(h) {
            Ok((k, v)) => {
                headers.append(k, v);
            }
            Err(e) => {
                eprintln!("latchkey: --header: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let q =
        Question { method: &args.method, headers: &headers, url: &args.url, agent: args.agent.as_deref() };
    let running = if args.local { None } else { super::running_instance(&config) };
    let answer = match running {
        Some(addr) => ask(addr, &q).map(|e| (e, Described::Running(addr))),
        // This shell's view: tokens are verified with the key in ca_dir when it can
        // read it (else every token is refused, and the reason says why).
        None => crate::explain::explain(&config, &TokenState::new(&config.proxy.ca_dir), &q)
            .map(|e| (e, Described::Config((!args.local).then(|| config.client_proxy_addr()))))
            .map_err(AskError::from),
    };
    let (outcome, described) = match answer {
        Ok(a) => a,
        Err(e) => {
            eprintln!("latchkey: {e}");
            return ExitCode::from(2);
        }
    };
    if args.json {
        let mut v = serde_json::to_value(&outcome).unwrap_or_default();
        let (kind, instance) = described.json();
        v["described"] = kind;
        v["instance"] = instance;
        println!("{v}");
    } else {
        println!("{}\n{}", sentence(&outcome, &args.url), described.note());
    }
    ExitCode::SUCCESS
}

/// Why no decision could be had.
#[derive(Debug, thiserror::Error)]
enum AskError {
    #[error("{0}")]
    Question(#[from] crate::explain::ExplainError),
    #[error("{addr} answered oddly: {why}")]
    Odd { addr: std::net::SocketAddr, why: serde_json::Error },
    /// The instance refused the question, in its own words.
    #[error("{0}")]
    Refused(String),
    #[error("the latchkey at {0} stopped answering; try again or use --local")]
    Gone(std::net::SocketAddr),
}

/// The running instance's decision, from `/latchkey/explain`.
fn ask(addr: std::net::SocketAddr, q: &Question<'_>) -> Result<Explanation, AskError> {
    let path = format!("/latchkey/explain?{}", crate::explain::explain_query_string(q));
    match super::fetch_local_status(addr, &path) {
        Some((200, body)) => serde_json::from_str(&body).map_err(|why| AskError::Odd { addr, why }),
        Some((_, body)) => Err(AskError::Refused(body.trim().trim_start_matches("latchkey: ").to_string())),
        None => Err(AskError::Gone(addr)),
    }
}

fn sentence(o: &Explanation, url: &str) -> String {
    match (o.decision.as_str(), &o.credential) {
        ("inject", Some(name)) => {
            let slots: Vec<String> = o
                .inject
                .iter()
                .map(|s| match s {
                    crate::inject::Slot::Header { header } => format!("header {header}"),
                    crate::inject::Slot::Query { query } => format!("query parameter {query}"),
                })
                .collect();
            let slots =
                if slots.is_empty() { "the connection (no header)".into() } else { slots.join(" or ") };
            format!(
                "inject: {url} gets credential {name} ({}) in {slots} — secret from {}; {}",
                o.auth_type.as_deref().unwrap_or("?"),
                o.source.as_deref().unwrap_or("?"),
                o.reason
            )
        }
        ("block", _) => format!("block: {url} is refused: {}", o.reason),
        ("tunnel", _) => format!("tunnel: {url} passes through a blind TLS tunnel: {}", o.reason),
        _ => format!("pass: {url} is forwarded without a credential: {}", o.reason),
    }
}
