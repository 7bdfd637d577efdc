//! The policy: pure functions from (destination, request head) to a decision.
//! Compiled once at load; no I/O, no clock, no secrets.

pub mod host;
pub mod pattern;
pub mod ssrf;

use aho_corasick::AhoCorasick;
use http::HeaderMap;

pub use host::{Destination, Host, HostError};
pub use pattern::{Pattern, Specificity};

/// Whether a credential can be used right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredState {
    Active,
    /// Its source is missing (variable unset, file absent): requests pass without it.
    Inactive(String),
    /// Its source failed (command error, unreadable file): its requests get 502.
    Failed(String),
}

/// The routing part of a credential: where it applies, never what it is.
#[derive(Clone, Debug)]
pub struct CredentialRule {
    pub name: String,
    pub patterns: Vec<Pattern>,
    /// Canonical path prefixes without trailing slash ("" = root).
    pub paths: Vec<String>,
    pub methods: Vec<String>,
    pub ports: Vec<u16>,
    pub allow_http: bool,
    pub allowed_origins: Vec<String>,
    pub require_placeholder: bool,
    pub state: CredState,
}

#[derive(Debug, Default)]
pub struct Filters {
    pub blocked: Vec<Pattern>,
    pub allowlist_only: bool,
    pub allowed: Vec<Pattern>,
    pub content: ContentFilter,
}

/// `blocked_patterns`: literal substrings (one automaton) and `~regex`es.
#[derive(Debug, Default)]
pub struct ContentFilter {
    literals: Vec<String>,
    automaton: Option<AhoCorasick>,
    regexes: Vec<(String, regex::bytes::Regex)>,
}

#[derive(Debug, Default)]
pub struct Policy {
    pub credentials: Vec<CredentialRule>,
    pub filters: Filters,
    pub intercept_all: bool,
}

/// A refusal latchkey answers itself (SPEC section 6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (429).
    pub retry_after: Option<u64>,
}

impl Refusal {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Refusal { status, kind, message: message.into(), retry_after: None }
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectDecision {
    Block(Refusal),
    Tunnel,
    Intercept,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Block(Refusal),
    Pass(String),
    Inject { credential: usize, captures: Vec<(String, String)> },
}

/// What the policy sees of a request.
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// The request target as the client wrote it (may carry a query string).
    pub target: &'a str,
    /// The path without query.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// True when the upstream leg is TLS.
    pub tls: bool,
}

impl ContentFilter {
    /// The patterns as written (`~` marks a regex).
    pub fn sources(&self) -> Vec<String> {
        self.literals.iter().chain(self.regexes.iter().map(|(s, _)| s)).cloned().collect()
    }

    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let mut literals = Vec::new();
        let mut regexes = Vec::new();
        for p in patterns {
            match p.strip_prefix('~') {
                Some(re) => {
                    let compiled =
                        regex::bytes::Regex::new(re).map_err(|e| format!("bad regex {p:?}: {e}"))?;
                    regexes.push((p.clone(), compiled));
                }
                None if p.is_empty() => return Err("empty blocked pattern".into()),
                None => literals.push(p.clone()),
            }
        }
        let automaton = if literals.is_empty() {
            None
        } else {
            Some(AhoCorasick::new(&literals).map_err(|e| e.to_string())?)
        };
        Ok(ContentFilter { literals, automaton, regexes })
    }

    pub fn is_empty(&self) -> bool {
        self.literals.is_empty() && self.regexes.is_empty()
    }

    /// The first pattern found in `hay`, by its source text.
    pub fn find(&self, hay: &[u8]) -> Option<&str> {
        if let Some(ac) = &self.automaton
            && let Some(m) = ac.find(hay)
        {
            return Some(&self.literals[m.pattern().as_usize()]);
        }
        self.regexes.iter().find(|(_, re)| re.is_match(hay)).map(|(s, _)| s.as_str())
    }

    /// Bytes a streaming scanner must carry between chunks so no literal is missed.
    /// Regexes are looked for within a 4 KiB overlap (documented limit).
    pub fn overlap(&self) -> usize {
        let lit = self.literals.iter().map(String::len).max().unwrap_or(1);
        let re = if self.regexes.is_empty() { 1 } else { 4096 };
        lit.max(re) - 1
    }
}

impl Policy {
    /// The decision for a CONNECT (or any tunnel) before a byte of it is read.
    pub fn decide_connect(&self, dest: &Destination) -> ConnectDecision {
        if let Some(refusal) = self.domain_refusal(dest) {
            return ConnectDecision::Block(refusal);
        }
        let needs_intercept = self.intercept_all
            || !self.filters.content.is_empty()
            || self
                .credentials
                .iter()
                .any(|c| !matches!(c.state, CredState::Inactive(_)) && host_rank(c, dest).is_some());
        if needs_intercept { ConnectDecision::Intercept } else { ConnectDecision::Tunnel }
    }

    /// The decision for one request to `dest`. `carries_placeholder(i)` tells whether
    /// the request holds credential i's placeholder in its slot (for require_placeholder).
    pub fn decide(
        &self,
        dest: &Destination,
        head: &RequestHead<'_>,
        carries_placeholder: impl Fn(usize) -> bool,
    ) -> Decision {
        if let Some(refusal) = self.domain_refusal(dest) {
            return Decision::Block(refusal);
        }
        if let Some(pattern) = self.head_pattern(head) {
            return Decision::Block(Refusal::new(
                403,
                "blocked-pattern",
                format!("request matches blocked pattern {pattern:?}"),
            ));
        }
        let Some(index) = self.winner(dest, head) else {
            let inactive = self
                .credentials
                .iter()
                .find(|c| matches!(c.state, CredState::Inactive(_)) && rule_rank(c, dest, head).is_some());
            return Decision::Pass(match inactive {
                Some(c) => format!("credential {} is inactive", c.name),
                None => "no credential matches".into(),
            });
        };
        let rule = &self.credentials[index];
        if let CredState::Failed(why) = &rule.state {
            return Decision::Block(Refusal::new(
                502,
                "credential-failed",
                format!("credential {} is unavailable ({why}); fix its source", rule.name),
            ));
        }
        if !head.tls && !rule.allow_http {
            return Decision::Block(Refusal::new(
                403,
                "plain-http",
                format!("credential {} is only sent over TLS; use https://{}", rule.name, dest.host),
            ));
        }
        if let Some(origin) = head.headers.get(http::header::ORIGIN) {
            let allowed = origin
                .to_str()
                .map(|o| rule.allowed_origins.iter().any(|a| a.eq_ignore_ascii_case(o)))
                .unwrap_or(false);
            if !allowed {
                return Decision::Pass(format!(
                    "request carries an Origin not in credential {}'s allowed_origins",
                    rule.name
                ));
            }
        }
        if rule.require_placeholder && !carries_placeholder(index) {
            return Decision::Block(Refusal::new(
                403,
                "placeholder-required",
                format!("credential {} requires its placeholder in the request", rule.name),
            ));
        }
        let captures = rule
            .patterns
            .iter()
            .find(|p| p.is_regex() && p.matches_host(&dest.host).is_some())
            .map(|p| p.captures(&dest.host))
            .unwrap_or_default();
        Decision::Inject { credential: index, captures }
    }

    /// The most specific usable credential for this request, if any.
    pub fn winner(&self, dest: &Destination, head: &RequestHead<'_>) -> Option<usize> {
        self.ranked(dest, head).last().map(|(i, _)| *i)
    }

    /// Candidates sorted from least to most specific (ties keep declaration order,
    /// so the last declared wins).
    pub fn ranked(&self, dest: &Destination, head: &RequestHead<'_>) -> Vec<(usize, Rank)> {
        let mut v: Vec<(usize, Rank)> = self
            .credentials
            .iter()
            .enumerate()
            .filter(|(_, c)| !matches!(c.state, CredState::Inactive(_)))
            .filter_map(|(i, c)| rule_rank(c, dest, head).map(|r| (i, r)))
            .collect();
        v.sort_by_key(|(_, r)| *r);
        v
    }

    /// Credentials whose host patterns name `dest`'s host, on any port and for any path:
    /// every response from that host is scanned for their secrets (invariant 5), whether
    /// or not the request carried one.
    pub fn naming_host<'a>(&'a self, dest: &'a Destination) -> impl Iterator<Item = usize> + 'a {
        self.credentials
            .iter()
            .enumerate()
            .filter(|(_, c)| c.patterns.iter().any(|p| p.matches_host(&dest.host).is_some()))
            .map(|(i, _)| i)
    }

    fn domain_refusal(&self, dest: &Destination) -> Option<Refusal> {
        let f = &self.filters;
        if let Some(p) = f
            .blocked
            .iter()
            .find(|p| p.matches_host(&dest.host).is_some() && p.port.is_none_or(|pp| pp == dest.port))
        {
            return Some(Refusal::new(
                403,
                "blocked-domain",
                format!("{} is blocked by blocked_domains pattern {:?}", dest.host, p.source),
            ));
        }
        if f.allowlist_only
            && !f
                .allowed
                .iter()
                .any(|p| p.matches_host(&dest.host).is_some() && default_port_ok(p.port, &[], dest.port))
        {
            return Some(Refusal::new(
                403,
                "not-allowlisted",
                format!("{} is not in allowed_domains (allowlist_only = true)", dest),
            ));
        }
        None
    }

    fn head_pattern(&self, head: &RequestHead<'_>) -> Option<&str> {
        let c = &self.filters.content;
        if c.is_empty() {
            return None;
        }
        let line = format!("{} {}", head.method, head.target);
        if let Some(p) = c.find(line.as_bytes()) {
            return Some(p);
        }
        if let Some(p) = c.find(&percent_decode(line.as_bytes())) {
            return Some(p);
        }
        head.headers.iter().find_map(|(name, value)| {
            let mut l = Vec::with_capacity(name.as_str().len() + 2 + value.len());
            l.extend_from_slice(name.as_str().as_bytes());
            l.extend_from_slice(b": ");
            l.extend_from_slice(value.as_bytes());
            c.find(&l)
        })
    }
}

/// Rank of a credential for a request: host specificity, path prefix length, whether it
/// narrows by method or port. Larger wins.
pub type Rank = (Specificity, usize, bool);

fn rule_rank(c: &CredentialRule, dest: &Destination, head: &RequestHead<'_>) -> Option<Rank> {
    let spec = host_rank(c, dest)?;
    if !c.methods.is_empty() && !c.methods.iter().any(|m| m.eq_ignore_ascii_case(head.method)) {
        return None;
    }
    let path_len = if c.paths.is_empty() {
        0
    } else {
        let path = canonical_path(head.path)?;
        c.paths.iter().filter(|p| path_has_prefix(&path, p)).map(|p| p.len() + 1).max()?
    };
    Some((spec, path_len, !c.methods.is_empty() || !c.ports.is_empty()))
}

fn host_rank(c: &CredentialRule, dest: &Destination) -> Option<Specificity> {
    c.patterns
        .iter()
        .filter(|p| default_port_ok(p.port, &c.ports, dest.port))
        .filter_map(|p| p.matches_host(&dest.host))
        .max()
}

/// Port rule for credentials and allowlists: without any port, 443 and 80.
fn default_port_ok(pattern_port: Option<u16>, ports: &[u16], port: u16) -> bool {
    match (pattern_port, ports.is_empty()) {
        (Some(p), true) => p == port,
        (Some(p), false) => p == port && ports.contains(&port),
        (None, false) => ports.contains(&port),
        (None, true) => port == 443 || port == 80,
    }
}

fn path_has_prefix(path: &str, prefix: &str) -> bool {
    prefix.is_empty() || path == prefix || (path.starts_with(prefix) && path.as_bytes()[prefix.len()] == b'/')
}

/// Canonical form of a request path for matching: dot segments resolved. `None` for
/// ambiguous paths (encoded `/`, `\` or `.`, backslashes), which never match a
/// path-scoped credential.
pub fn canonical_path(path: &str) -> Option<String> {
    let lower = path.to_ascii_lowercase();
    if path.contains('\\') || ["%2f", "%5c", "%2e", "%00"].iter().any(|e| lower.contains(e)) {
        return None;
    }
    if !path.starts_with('/') {
        return None;
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in path[1..].split('/') {
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let trailing_dot = path.ends_with("/.") || path.ends_with("/..");
    let mut s = format!("/{}", out.join("/"));
    if trailing_dot && !s.ends_with('/') {
        s.push('/');
    }
    Some(s)
}

/// Config `paths` entry → canonical prefix without trailing slash.
pub fn canonical_prefix(raw: &str) -> Result<String, String> {
    let p = canonical_path(raw).ok_or_else(|| format!("path {raw:?} must start with / and be plain"))?;
    Ok(p.trim_end_matches('/').to_string())
}

pub fn percent_decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' && i + 2 < input.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(input[i + 1]), hex(input[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests;
