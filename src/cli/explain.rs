//! `latchkey explain`: what latchkey would do with one request, without sending it.

use std::path::PathBuf;
use std::process::ExitCode;

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use serde_json::json;

use super::load_config;
use crate::config::Config;
use crate::policy::{ConnectDecision, Decision, Destination, RequestHead};

pub fn explain(config: Option<PathBuf>, method: &str, headers: &[String], json: bool, url: &str) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut map = HeaderMap::new();
    for h in headers {
        let Some((k, v)) = h.split_once(':') else {
            eprintln!("latchkey: --header wants 'Name: value', got {h:?}");
            return ExitCode::from(2);
        };
        match (HeaderName::from_bytes(k.trim().as_bytes()), HeaderValue::from_str(v.trim())) {
            (Ok(k), Ok(v)) => {
                map.append(k, v);
            }
            _ => {
                eprintln!("latchkey: bad header {h:?}");
                return ExitCode::from(2);
            }
        }
    }
    let outcome = match decide(&config, &method.to_ascii_uppercase(), &map, url) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("latchkey: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        println!("{}", outcome.to_json());
    } else {
        println!("{}", outcome.sentence(url));
    }
    ExitCode::SUCCESS
}

pub struct Outcome<'a> {
    pub decision: &'static str,
    pub credential: Option<usize>,
    pub reason: String,
    config: &'a Config,
}

impl Outcome<'_> {
    fn cred(&self) -> Option<&crate::config::Credential> {
        self.credential.map(|i| &self.config.credentials[i])
    }

    fn to_json(&self) -> serde_json::Value {
        let inject = self.cred().map(|c| c.injector.slots()).unwrap_or_default();
        json!({
            "decision": self.decision,
            "credential": self.cred().map(|c| c.name.clone()),
            "inject": if self.decision == "inject" { serde_json::to_value(inject).unwrap_or_default() } else { json!([]) },
            "reason": self.reason,
        })
    }

    fn sentence(&self, url: &str) -> String {
        match (self.decision, self.cred()) {
            ("inject", Some(c)) => {
                let slots: Vec<String> = c
                    .injector
                    .slots()
                    .iter()
                    .map(|s| match s {
                        crate::inject::Slot::Header { header } => format!("header {header}"),
                        crate::inject::Slot::Query { query } => format!("query parameter {query}"),
                    })
                    .collect();
                format!(
                    "inject: {url} gets credential {} ({}) in {} — secret from {}; {}",
                    c.name,
                    c.auth_type,
                    slots.join(" or "),
                    c.source,
                    self.reason
                )
            }
            ("block", _) => format!("block: {url} is refused: {}", self.reason),
            ("tunnel", _) => format!("tunnel: {url} passes through a blind TLS tunnel: {}", self.reason),
            _ => format!("pass: {url} is forwarded without a credential: {}", self.reason),
        }
    }
}

fn decide<'a>(
    config: &'a Config,
    method: &str,
    headers: &HeaderMap,
    url: &str,
) -> Result<Outcome<'a>, String> {
    let uri: Uri = url.parse().map_err(|e| format!("bad URL {url:?}: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{url:?}: give an http:// or https:// URL")),
    };
    let authority = uri.authority().ok_or_else(|| format!("{url:?} has no host"))?;
    let dest = Destination::parse_authority(authority.as_str(), Some(if tls { 443 } else { 80 }))
        .map_err(|e| format!("bad host in {url:?}: {e}"))?;
    let target = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let owned = |decision, credential, reason: String| Outcome { decision, credential, reason, config };
    if tls {
        match config.policy.decide_connect(&dest) {
            ConnectDecision::Block(r) => return Ok(owned("block", None, r.message)),
            ConnectDecision::Tunnel => {
                return Ok(owned("tunnel", None, "no credential or filter applies to this host".into()));
            }
            ConnectDecision::Intercept => {}
        }
    }
    let parts = {
        let mut b = http::Request::builder().method(method).uri(&uri);
        for (k, v) in headers {
            b = b.header(k, v);
        }
        b.body(()).map_err(|e| e.to_string())?.into_parts().0
    };
    let head = RequestHead { method, target, path: uri.path(), headers, tls };
    let d = config.policy.decide(&dest, &head, |i| {
        let c = &config.credentials[i];
        c.injector.carries_placeholder(&parts, &c.placeholder)
    });
    Ok(match d {
        Decision::Block(r) => owned("block", None, r.message),
        Decision::Pass(reason) => owned("pass", None, reason),
        Decision::Inject { credential, .. } => {
            let reason = format!("most specific credential for {dest}");
            owned("inject", Some(credential), reason)
        }
    })
}
