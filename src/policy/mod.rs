//! The policy: the routing part of the config, compiled once at load — credentials'
//! hosts and paths, filters, agents — and the one decision every path asks
//! (`decision`). Pure: no I/O, no clock, no secrets.

pub mod agents;
mod decision;
pub mod dlp;
pub mod except;
pub mod host;
pub mod pattern;
mod refusal;
mod scoped;
pub mod ssrf;

use aho_corasick::AhoCorasick;
use http::HeaderMap;

pub use agents::AgentRule;
pub use decision::{Budgets, Decision, Question, Verdict};
pub use dlp::{DlpAction, DlpPolicy, DlpVerdict};
pub use except::PathPattern;
pub use host::{Destination, Host, HostError};
pub use pattern::{Pattern, Specificity};
pub use refusal::{Refusal, RefusalKind};
pub use scoped::InSlot;

message_error! {
    /// A rule in the config (host pattern, path, blocked pattern) that does not parse: why.
    pub RuleError
}

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
    /// `require_token`: refused unless its slot holds a scoped token that allows the
    /// request.
    pub require_token: bool,
    /// Credentials sharing its placeholder (one credential to the client, SPEC 5): a
    /// token naming any of them is accepted too.
    pub shares_placeholder_with: Vec<String>,
    /// Where its slot is, in words, for the `require_token` refusal ("x-api-key or
    /// authorization").
    pub token_slot: String,
    /// Paths where this credential is never injected, even though `paths` match.
    pub except_paths: Vec<PathPattern>,
    pub state: CredState,
    /// `${PREFIX{capture}SUFFIX}` references in the credential's secret templates: a
    /// host matches only when each names a variable present at load (SPEC 5).
    pub captures: Vec<CaptureRef>,
    /// Hosts this credential is never written to, because they would turn it into new
    /// credentials (requests there are refused rather than passed).
    pub never_to: Vec<Host>,
    /// A token endpoint latchkey answers itself for this credential's client libraries.
    pub vends: Option<Endpoint>,
    /// `requests_per_minute` / `tokens_per_day` (state kept by the runtime).
    pub limits: crate::limits::Limits,
}

/// One endpoint: destination, method, path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub dest: Destination,
    pub method: &'static str,
    pub path: &'static str,
}

/// One `${PREFIX{capture}SUFFIX}` reference: the variable it names for a host is
/// `PREFIX` + the capture's value upper-cased + `SUFFIX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureRef {
    pub prefix: String,
    pub capture: String,
    pub suffix: String,
}

#[derive(Debug, Default)]
pub struct Filters {
    pub blocked: Vec<Pattern>,
    pub allowlist_only: bool,
    pub allowed: Vec<Pattern>,
    pub content: ContentFilter,
    /// What happens to a host outside `allowed_domains` (SPEC 10).
    pub on_unlisted: OnUnlisted,
    /// `ask_timeout`: how long a held connection waits for a person; named in the
    /// refusal of one nobody answered.
    pub ask_timeout: std::time::Duration,
}

/// `on_unlisted`: a host outside `allowed_domains` is refused (`deny`, the default,
/// only with `allowlist_only`), held until a person decides (`ask`), or let through and
/// logged as `warned` (`warn`). `ask` and `warn` imply an allowlist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnUnlisted {
    #[default]
    Deny,
    Ask,
    Warn,
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
    /// `[agents]`, in config order (an agent index is a position here and in
    /// `config.agents`).
    pub agents: Vec<AgentRule>,
    pub filters: Filters,
    /// `[proxy.dlp]`: what outbound scanning's findings mean.
    pub dlp: DlpPolicy,
    pub intercept_all: bool,
    /// Variables present at load that capture references may name (`capture_variables`).
    pub capture_variables: std::collections::BTreeSet<String>,
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

    pub fn new(patterns: &[String]) -> Result<Self, RuleError> {
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
    /// The most specific usable credential for this request, if any.
    pub fn winner(&self, dest: &Destination, head: &RequestHead<'_>) -> Option<usize> {
        // The last of `ranked`: `max_by_key` returns the last of equal maxima, so
        // the last declared wins a tie here too. No list is built per request.
        self.candidates(dest, head).max_by_key(|(_, r)| *r).map(|(i, _)| i)
    }

    /// Candidates sorted from least to most specific (ties keep declaration order,
    /// so the last declared wins).
    pub fn ranked(&self, dest: &Destination, head: &RequestHead<'_>) -> Vec<(usize, Rank)> {
        let mut v: Vec<(usize, Rank)> = self.candidates(dest, head).collect();
        v.sort_by_key(|(_, r)| *r);
        v
    }

    /// The active credentials that apply to this request, in declaration order.
    fn candidates<'a>(
        &'a self,
        dest: &'a Destination,
        head: &'a RequestHead<'_>,
    ) -> impl Iterator<Item = (usize, Rank)> + 'a {
        self.credentials
            .iter()
            .enumerate()
            .filter(|(_, c)| !matches!(c.state, CredState::Inactive(_)))
            .filter_map(|(i, c)| self.rule_rank(c, dest, head).map(|r| (i, r)))
    }

    /// Why a request that no credential takes passes without one.
    fn pass_reason(&self, dest: &Destination, head: &RequestHead<'_>) -> std::borrow::Cow<'static, str> {
        let inactive = self
            .credentials
            .iter()
            .find(|c| matches!(c.state, CredState::Inactive(_)) && self.rule_rank(c, dest, head).is_some());
        if let Some(c) = inactive {
            return format!("credential {} is inactive", c.name).into();
        }
        match self.credentials.iter().find_map(|c| Some((c, self.missing_variable(c, dest)?))) {
            Some((c, var)) => {
                format!("credential {} does not apply to this host: {var} is not set", c.name).into()
            }
            None => "no credential matches".into(),
        }
    }

    /// Rank of a credential for a request (`None`: it does not apply).
    fn rule_rank(&self, c: &CredentialRule, dest: &Destination, head: &RequestHead<'_>) -> Option<Rank> {
        let spec = c
            .patterns
            .iter()
            .filter(|p| self.usable(c, p, dest))
            .filter_map(|p| p.matches_host(&dest.host))
            .max()?;
        if !c.methods.is_empty() && !methods_allow(&c.methods, head) {
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

    /// Does pattern `p` of credential `c` take `dest`: host and port match, and every
    /// capture reference names a variable present at load (SPEC 5)? A host whose capture
    /// names no such variable is not this credential's: no other variable is ever tried.
    fn usable(&self, c: &CredentialRule, p: &Pattern, dest: &Destination) -> bool {
        default_port_ok(p.port, &c.ports, dest.port)
            && p.matches_host(&dest.host).is_some()
            && (c.captures.is_empty() || self.unnamed_capture(c, p, &dest.host).is_none())
    }

    /// The variable a capture reference of `c` names for `host` through `p`, when it is
    /// not among those present at load (or the capture is not `[A-Za-z0-9_]+`).
    fn unnamed_capture(&self, c: &CredentialRule, p: &Pattern, host: &Host) -> Option<String> {
        let captures = p.captures(host);
        c.captures.iter().find_map(|r| {
            let value = captures
                .iter()
                .find(|(n, _)| *n == r.capture)
                .map(|(_, v)| v.as_str())
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
            match value {
                Some(v) => {
                    let name = format!("{}{}{}", r.prefix, v.to_ascii_uppercase(), r.suffix);
                    (!self.capture_variables.contains(&name)).then_some(name)
                }
                None => Some(format!("{}{{{}}}{}", r.prefix, r.capture, r.suffix)),
            }
        })
    }

    /// For `pass_reason`: the variable an active credential would need for `dest`, when
    /// its host pattern matches but its capture names no variable present at load.
    fn missing_variable(&self, c: &CredentialRule, dest: &Destination) -> Option<String> {
        if c.captures.is_empty() || matches!(c.state, CredState::Inactive(_)) {
            return None;
        }
        c.patterns
            .iter()
            .filter(|p| default_port_ok(p.port, &c.ports, dest.port) && p.matches_host(&dest.host).is_some())
            .find_map(|p| self.unnamed_capture(c, p, &dest.host))
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
                RefusalKind::BlockedDomain,
                format!("{} is blocked by blocked_domains pattern {:?}", dest.host, p.source),
            ));
        }
        if f.allowlist_only && f.on_unlisted == OnUnlisted::Deny && self.unlisted(dest) {
            return Some(Refusal::new(
                RefusalKind::NotAllowlisted,
                format!("{} is not in allowed_domains (allowlist_only = true)", dest),
            ));
        }
        None
    }

    /// Outside `allowed_domains`, when there is an allowlist (`allowlist_only`, or
    /// `on_unlisted` asking or warning about what is outside it).
    pub fn unlisted(&self, dest: &Destination) -> bool {
        let f = &self.filters;
        (f.allowlist_only || f.on_unlisted != OnUnlisted::Deny)
            && !f
                .allowed
                .iter()
                .any(|p| p.matches_host(&dest.host).is_some() && default_port_ok(p.port, &[], dest.port))
    }

    /// Let through although unlisted (`on_unlisted = "warn"`): logged as `warned`.
    pub fn warned(&self, dest: &Destination) -> bool {
        self.filters.on_unlisted == OnUnlisted::Warn && self.unlisted(dest)
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

pub(crate) fn host_rank(c: &CredentialRule, dest: &Destination) -> Option<Specificity> {
    c.patterns
        .iter()
        .filter(|p| default_port_ok(p.port, &c.ports, dest.port))
        .filter_map(|p| p.matches_host(&dest.host))
        .max()
}

/// Port rule for credentials and allowlists: without any port, 443 and 80.
pub(crate) fn default_port_ok(pattern_port: Option<u16>, ports: &[u16], port: u16) -> bool {
    match (pattern_port, ports.is_empty()) {
        (Some(p), true) => p == port,
        (Some(p), false) => p == port && ports.contains(&port),
        (None, false) => ports.contains(&port),
        (None, true) => port == 443 || port == 80,
    }
}

/// Whole-segment prefix match of a canonical path (`""` is the root).
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    prefix.is_empty() || path == prefix || (path.starts_with(prefix) && path.as_bytes()[prefix.len()] == b'/')
}

/// Headers through which web frameworks let a request stand for another method.
/// Names, not strings: asked on every request, a name is hashed and found without being
/// parsed first.
pub const METHOD_OVERRIDE_HEADERS: [http::HeaderName; 3] = [
    http::HeaderName::from_static("x-http-method-override"),
    http::HeaderName::from_static("x-http-method"),
    http::HeaderName::from_static("x-method-override"),
];

/// The methods a request claims besides its request line's: method-override headers
/// (every instance, comma lists split) and the `_method` query parameter, upper-cased as
/// the frameworks that honour them read them.
pub fn override_methods(head: &RequestHead<'_>) -> Vec<String> {
    let mut out = Vec::new();
    // One pass over the headers, comparing names: three lookups hashed three names on
    // every credentialed request, and almost none carries an override.
    let overrides = head.headers.iter().filter(|(name, _)| METHOD_OVERRIDE_HEADERS.contains(name));
    for (_, value) in overrides {
        let text = String::from_utf8_lossy(value.as_bytes());
        out.extend(text.split(',').map(|m| m.trim().to_ascii_uppercase()).filter(|m| !m.is_empty()));
    }
    let query = head.target.split_once('?').map(|(_, q)| q).unwrap_or("");
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        // Only a name with an escape can decode to something else: no copy for the rest.
        let is_method = if name.contains('%') {
            percent_decode(name.as_bytes()) == b"_method"
        } else {
            name == "_method"
        };
        if is_method {
            let value =
                String::from_utf8_lossy(&percent_decode(value.replace('+', " ").as_bytes())).into_owned();
            out.push(value.trim().to_ascii_uppercase());
        }
    }
    out
}

/// Whether the upstream may read this request as TRACE or TRACK, which echo the request
/// (credential included) back: in any case, or through a method override.
pub fn is_trace(head: &RequestHead<'_>) -> bool {
    let trace = |m: &str| m.eq_ignore_ascii_case("TRACE") || m.eq_ignore_ascii_case("TRACK");
    trace(head.method) || override_methods(head).iter().any(|m| trace(m))
}

/// `methods` (upper case) against the request. Methods are case-sensitive (RFC 9110
/// 9.1): a server may read `get` as GET or as an unknown method, so only the exact name
/// matches; every method an override claims must be listed too.
fn methods_allow(methods: &[String], head: &RequestHead<'_>) -> bool {
    methods.iter().any(|m| m == head.method) && override_methods(head).iter().all(|o| methods.contains(o))
}

/// Canonical form of a request path for matching: dot segments resolved. `None` for a
/// path servers may read differently (it never matches a path-scoped credential):
/// - an escape that decodes to `/`, `\`, `.`, NUL or `%` (a second decoding would read
///   on: `%252e` is `.` to a server that decodes twice), or a `%` that starts no escape;
/// - a backslash;
/// - a dot segment together with a `;` (or `%3b`) anywhere, or with an empty segment:
///   servers that drop `;params` (`/v1/..;/admin`) or merge slashes (`/v1//../admin`)
///   resolve those dot segments against other segments than latchkey would.
pub fn canonical_path(path: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !path.starts_with('/') || path.contains('\\') || has_ambiguous_escape(path.as_bytes()) {
        return None;
    }
    // Every dot segment (`.`, `..`, `.;x`) starts right after a slash: without one the
    // path is its own canonical form (the common case, answered without a copy).
    if !path.contains("/.") {
        return Some(std::borrow::Cow::Borrowed(path));
    }
    let segments: Vec<&str> = path[1..].split('/').collect();
    if segments.iter().any(|s| matches!(before_params(s), "." | ".."))
        && (path.contains(';') || path.contains("//") || path.to_ascii_lowercase().contains("%3b"))
    {
        return None;
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in segments {
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
    Some(s.into())
}

/// A segment without its `;params` (as Tomcat and Spring read it), `%3b` counted as `;`.
fn before_params(seg: &str) -> &str {
    let semi = seg.find(';').unwrap_or(seg.len());
    let encoded = seg.to_ascii_lowercase().find("%3b").unwrap_or(seg.len());
    &seg[..semi.min(encoded)]
}

/// An escape of `/`, `\`, `.`, NUL or `%`, or a `%` that starts no escape.
fn has_ambiguous_escape(path: &[u8]) -> bool {
    let hex = |b: u8| (b as char).to_digit(16);
    path.iter().enumerate().filter(|(_, b)| **b == b'%').any(|(i, _)| {
        match (path.get(i + 1).and_then(|b| hex(*b)), path.get(i + 2).and_then(|b| hex(*b))) {
            (Some(h), Some(l)) => matches!((h * 16 + l) as u8, b'/' | b'\\' | b'.' | 0 | b'%'),
            _ => true,
        }
    })
}

/// Config `paths` entry → canonical prefix without trailing slash.
pub fn canonical_prefix(raw: &str) -> Result<String, RuleError> {
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
