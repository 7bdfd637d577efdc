//! Domain patterns shared by credentials and filters: exact, `.suffix`, `*.glob`,
//! `~regex`, IPs and CIDRs, each with an optional `:port`.

use std::net::IpAddr;

use ipnet::IpNet;
use regex::Regex;

use super::RuleError;
use super::host::{Host, canonical_ip, split_host_port};

#[derive(Clone, Debug)]
pub enum HostPattern {
    /// `api.github.com`
    Exact(String),
    /// `.openai.com`: the domain itself and every subdomain.
    Suffix(String),
    /// `*.openai.com`: one or more labels before the domain.
    Glob(String),
    /// `~regex`: must match the whole host.
    Regex(Regex),
    Ip(IpAddr),
    Cidr(IpNet),
    /// `*` (filters only): every host.
    Any,
}

#[derive(Clone, Debug)]
pub struct Pattern {
    pub source: String,
    pub host: HostPattern,
    pub port: Option<u16>,
}

/// How specific a match is; compared lexicographically, larger wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Specificity {
    pub kind: u8,
    pub len: usize,
}

impl Pattern {
    pub fn parse(raw: &str) -> Result<Pattern, RuleError> {
        let source = raw.to_string();
        let raw = raw.trim();
        if raw.is_empty() {
            return Err("empty pattern".into());
        }
        if let Some(re) = raw.strip_prefix('~') {
            let (re, port) = split_regex_port(re)?;
            let anchored = format!("^(?:{re})$");
            let regex = Regex::new(&anchored).map_err(|e| format!("bad regex: {e}"))?;
            return Ok(Pattern { source, host: HostPattern::Regex(regex), port });
        }
        if raw == "*" {
            return Ok(Pattern { source, host: HostPattern::Any, port: None });
        }
        if let Ok(net) = raw.parse::<IpNet>() {
            let net = match canonical_ip(net.addr()) {
                IpAddr::V4(v4) if net.addr().is_ipv6() => {
                    IpNet::new(IpAddr::V4(v4), net.prefix_len().saturating_sub(96))
                        .map_err(|e| e.to_string())?
                }
                _ => net,
            };
            return Ok(Pattern { source, host: HostPattern::Cidr(net.trunc()), port: None });
        }
        if let Ok(ip) = raw.parse::<IpAddr>() {
            return Ok(Pattern { source, host: HostPattern::Ip(canonical_ip(ip)), port: None });
        }
        let (host, port) = split_host_port(raw).map_err(|e| e.to_string())?;
        if let Some(rest) = host.strip_prefix("*.") {
            let domain = normalise_domain(rest)?;
            return Ok(Pattern { source, host: HostPattern::Glob(domain), port });
        }
        if host.contains('*') {
            return Err("`*` is allowed only as a leading `*.` label".into());
        }
        if let Some(rest) = host.strip_prefix('.') {
            let domain = normalise_domain(rest)?;
            return Ok(Pattern { source, host: HostPattern::Suffix(domain), port });
        }
        let host = match Host::parse(host).map_err(|e| e.to_string())? {
            Host::Domain(d) => HostPattern::Exact(d),
            Host::Ip(ip) => HostPattern::Ip(ip),
        };
        Ok(Pattern { source, host, port })
    }

    /// Does the pattern cover this host? Ports are checked separately by the caller,
    /// because the default port rule differs between credentials and blocklists.
    pub fn matches_host(&self, host: &Host) -> Option<Specificity> {
        let spec = |kind, len| Some(Specificity { kind, len });
        match (&self.host, host) {
            (HostPattern::Any, _) => spec(0, 0),
            (HostPattern::Exact(p), Host::Domain(h)) if p == h => spec(5, p.len()),
            (HostPattern::Suffix(p), Host::Domain(h)) if h == p || is_subdomain(h, p) => spec(3, p.len()),
            (HostPattern::Glob(p), Host::Domain(h)) if is_subdomain(h, p) => spec(2, p.len()),
            (HostPattern::Regex(re), Host::Domain(h)) if re.is_match(h) => spec(1, 0),
            (HostPattern::Ip(p), Host::Ip(h)) if p == h => spec(5, 128),
            (HostPattern::Cidr(net), Host::Ip(h)) if net.contains(h) => spec(3, net.prefix_len() as usize),
            _ => None,
        }
    }

    /// Named regex captures for `${...{name}...}` templates.
    pub fn captures(&self, host: &Host) -> Vec<(String, String)> {
        let (HostPattern::Regex(re), Host::Domain(h)) = (&self.host, host) else {
            return Vec::new();
        };
        let Some(caps) = re.captures(h) else {
            return Vec::new();
        };
        re.capture_names()
            .flatten()
            .filter_map(|n| caps.name(n).map(|m| (n.to_string(), m.as_str().to_string())))
            .collect()
    }

    /// True when the pattern names no host at all (credentials must name one).
    pub fn matches_everything(&self) -> bool {
        match &self.host {
            HostPattern::Any => true,
            HostPattern::Regex(re) => {
                ["a", "latchkey-probe-q7.invalid", "x.y.z.example"].iter().filter(|h| re.is_match(h)).count()
                    >= 2
            }
            HostPattern::Cidr(net) => net.prefix_len() == 0,
            _ => false,
        }
    }

    /// A host this pattern covers, for overlap checks (none for regexes and CIDRs).
    pub fn example_host(&self) -> Option<String> {
        match &self.host {
            HostPattern::Exact(d) | HostPattern::Suffix(d) => Some(d.clone()),
            HostPattern::Glob(d) => Some(format!("x.{d}")),
            HostPattern::Ip(ip) => Some(Host::Ip(*ip).to_string()),
            _ => None,
        }
    }

    pub fn is_regex(&self) -> bool {
        matches!(self.host, HostPattern::Regex(_))
    }
}

fn is_subdomain(host: &str, domain: &str) -> bool {
    host.len() > domain.len()
        && host.ends_with(domain)
        && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
}

fn normalise_domain(raw: &str) -> Result<String, RuleError> {
    match Host::parse(raw).map_err(|e| e.to_string())? {
        Host::Domain(d) => Ok(d),
        Host::Ip(_) => Err("a suffix or glob needs a domain name, not an IP".into()),
    }
}

/// A trailing `:PORT` on a regex is its port (hosts never contain `:`).
fn split_regex_port(re: &str) -> Result<(&str, Option<u16>), RuleError> {
    if let Some(i) = re.rfind(':') {
        let port = &re[i + 1..];
        if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
            let n: u16 = port.parse().map_err(|_| "bad port".to_string())?;
            if n == 0 {
                return Err("bad port".into());
            }
            return Ok((&re[..i], Some(n)));
        }
    }
    Ok((re, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, h: &str) -> bool {
        Pattern::parse(p).unwrap().matches_host(&Host::parse(h).unwrap()).is_some()
    }

    #[test]
    fn suffix_is_label_bounded() {
        assert!(m(".openai.com", "openai.com"));
        assert!(m(".openai.com", "a.b.openai.com"));
        assert!(!m(".openai.com", "evil-openai.com"));
        assert!(!m(".openai.com", "openai.com.evil.net"));
        assert!(!m(".openai.com", "xopenai.com"));
    }

    #[test]
    fn glob_needs_a_label() {
        assert!(m("*.openai.com", "api.openai.com"));
        assert!(m("*.openai.com", "a.b.openai.com"));
        assert!(!m("*.openai.com", "openai.com"));
        assert!(!m("*.openai.com", "evilopenai.com"));
    }

    #[test]
    fn exact_normalises() {
        assert!(m("API.github.com.", "api.github.com"));
        assert!(m("api.github.com", "API.GITHUB.COM."));
        assert!(!m("api.github.com", "api.github.com.evil"));
    }

    #[test]
    fn regex_is_anchored_and_has_port() {
        let p = Pattern::parse(r"~^(?P<cluster>[a-z]+)\.k8s\.example\.com$:6443").unwrap();
        assert_eq!(p.port, Some(6443));
        let h = Host::parse("prod.k8s.example.com").unwrap();
        assert!(p.matches_host(&h).is_some());
        assert_eq!(p.captures(&h), vec![("cluster".into(), "prod".into())]);
        assert!(!m(r"~api\.example\.com", "api.example.com.evil.net"));
        assert!(!m(r"~api\.example\.com", "xapi.example.com"));
    }

    #[test]
    fn ips_match_only_ip_rules() {
        assert!(m("10.0.0.0/8", "10.1.2.3"));
        assert!(!m("10.0.0.0/8", "11.1.2.3"));
        assert!(m("127.0.0.1", "127.1"));
        assert!(Pattern::parse(".0.1").is_err(), "a suffix of an IP is meaningless");
        assert!(!m(r"~.*", "127.0.0.1"));
        assert!(m("::ffff:127.0.0.1", "127.0.0.1"));
    }

    #[test]
    fn ports_parse() {
        assert_eq!(Pattern::parse("api.x.com:8443").unwrap().port, Some(8443));
        assert!(Pattern::parse("api.x.com:0").is_err());
        assert!(Pattern::parse("api.*.com").is_err());
    }

    #[test]
    fn match_everything_detected() {
        for p in ["*", "~.*", "~.+", "0.0.0.0/0", "~[a-z.0-9-]+"] {
            assert!(Pattern::parse(p).unwrap().matches_everything(), "{p}");
        }
        assert!(!Pattern::parse(r"~[a-z]+\.k8s\.local").unwrap().matches_everything());
    }

    #[test]
    fn specificity_order() {
        let h = Host::parse("api.openai.com").unwrap();
        let s = |p: &str| Pattern::parse(p).unwrap().matches_host(&h).unwrap();
        assert!(s("api.openai.com") > s(".api.openai.com"));
        assert!(s(".api.openai.com") > s(".openai.com"));
        assert!(s(".openai.com") > s("*.openai.com"));
        assert!(s("*.openai.com") > s(r"~.*\.openai\.com"));
    }
}
