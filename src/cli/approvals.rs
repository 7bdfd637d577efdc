//! `latchkey approvals [list | allow ID | deny ID] [--scope once|run|always]` (through
//! the running instance's admin API, with the admin token) and `latchkey allowlist
//! suggest [--log FILE]` (an `allowed_domains` snippet from the request log).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use crate::approvals::{Pending, Scope};

#[derive(Subcommand, Debug)]
pub enum ApprovalsAction {
    /// The pending approvals (the default).
    List,
    /// Allow a pending approval.
    Allow { id: String },
    /// Deny a pending approval.
    Deny { id: String },
}

#[derive(Subcommand, Debug)]
pub enum AllowlistAction {
    /// Print an `allowed_domains` snippet from the hosts the request log saw.
    Suggest {
        /// The request log (default: [proxy.logging] log_file).
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
    },
}

pub fn approvals(config: Option<PathBuf>, action: Option<ApprovalsAction>, scope: Scope) -> ExitCode {
    let config = match super::load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(addr) = config.admin.map(super::health::local) else {
        eprintln!("latchkey: approvals are answered on the admin listener: set [admin] listen");
        return ExitCode::from(2);
    };
    let token = match crate::admin::auth::read_for_cli(&config.admin_access.token_file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("latchkey: {e}");
            return ExitCode::from(2);
        }
    };
    let (method, path, body) = match &action {
        None | Some(ApprovalsAction::List) => ("GET", "/api/approvals".to_string(), None),
        Some(ApprovalsAction::Allow { id }) => {
            ("POST", format!("/api/approvals/{id}"), Some(("allow", scope)))
        }
        Some(ApprovalsAction::Deny { id }) => ("POST", format!("/api/approvals/{id}"), Some(("deny", scope))),
    };
    let body = body.map(|(d, s)| serde_json::json!({ "decision": d, "scope": s }).to_string());
    let (status, text) = match call(addr, &token, method, &path, body.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("latchkey: no latchkey admin listener answers at {addr}: {e}");
            return ExitCode::from(1);
        }
    };
    if status != 200 {
        eprintln!("{}", text.trim());
        return ExitCode::from(1);
    }
    match action {
        None | Some(ApprovalsAction::List) => list(&text),
        Some(_) => {
            let p: Option<Pending> = serde_json::from_str(&text).ok();
            let host = p.map(|p| format!("{}:{}", p.host, p.port)).unwrap_or_default();
            println!("{host}: answered");
            ExitCode::SUCCESS
        }
    }
}

fn list(text: &str) -> ExitCode {
    let pending: Vec<Pending> = serde_json::from_str(text).unwrap_or_default();
    if pending.is_empty() {
        println!("no pending approvals");
    }
    for p in pending {
        let who = p.agent.map(|a| format!(" agent {a}")).unwrap_or_default();
        let what = p.path.map(|x| format!(" {} {x}", p.method)).unwrap_or_else(|| format!(" {}", p.method));
        println!("{}  {}:{}{what}{who}  since {} ({} waiting)", p.id, p.host, p.port, p.since, p.waiting);
    }
    ExitCode::SUCCESS
}

/// One request to the admin listener (plain HTTP/1.1, the token as Bearer, no Origin).
fn call(
    addr: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

pub fn allowlist(config: Option<PathBuf>, action: AllowlistAction) -> ExitCode {
    let AllowlistAction::Suggest { log } = action;
    let log = match log {
        Some(l) => l,
        None => match super::load_config(config) {
            Ok(c) => c.proxy.log_file,
            Err(code) => return code,
        },
    };
    let text = match std::fs::read_to_string(&log) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "latchkey: request log {}: {e} (set [proxy.logging] log_requests = true, or pass --log)",
                log.display()
            );
            return ExitCode::from(2);
        }
    };
    print!("{}", suggestion(&text));
    ExitCode::SUCCESS
}

/// The snippet: every host a request went to (warned, passed, injected, tunnelled),
/// not the ones latchkey refused.
fn suggestion(log: &str) -> String {
    let mut hosts = BTreeSet::new();
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["decision"].as_str().is_none_or(|d| d == "blocked") {
            continue;
        }
        let (Some(host), Some(port)) = (v["host"].as_str(), v["port"].as_u64()) else { continue };
        let Ok(dest) = crate::policy::Destination::parse_authority(&format!("{host}:{port}"), None) else {
            continue;
        };
        hosts.insert(crate::approvals::file::pattern_for(&dest));
    }
    let mut out = String::from("# From the request log: the hosts requests went to. Review before use.\n");
    out.push_str("[proxy.filters]\nallowlist_only = true\nallowed_domains = [\n");
    for h in hosts {
        out.push_str(&format!("  {},\n", toml::Value::String(h)));
    }
    out.push_str("]\n");
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_snippet_lists_hosts_that_went_out() {
        let log = r#"{"host":"api.example.com","port":443,"decision":"warned"}
{"host":"evil.example","port":443,"decision":"blocked"}
{"host":"odd.example","port":8443,"decision":"tunnelled"}
not json
"#;
        let s = super::suggestion(log);
        assert!(s.contains("\"api.example.com\",") && s.contains("\"odd.example:8443\","), "{s}");
        assert!(!s.contains("evil"), "{s}");
    }
}
