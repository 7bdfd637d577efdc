//! Host normalisation: the one place where a client-written host becomes a value the
//! policy can compare. Everything here is pure and rejects rather than guesses.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A normalised host: a lowercase ASCII (punycode) domain without trailing dot, or an IP.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    Domain(String),
    Ip(IpAddr),
}

/// A normalised destination: host plus effective port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    pub host: Host,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostError(pub &'static str);

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for HostError {}

impl Host {
    /// Normalise a bare host (no port). IPv6 may come bracketed or not.
    pub fn parse(raw: &str) -> Result<Host, HostError> {
        if raw.is_empty() {
            return Err(HostError("empty host"));
        }
        if raw.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(HostError("whitespace or control character in host"));
        }
        if raw.contains('@') {
            return Err(HostError("userinfo in host"));
        }
        if raw.contains('%') {
            return Err(HostError("percent-escape or zone id in host"));
        }
        if let Some(inner) = raw.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or(HostError("unclosed IPv6 bracket"))?;
            let ip: Ipv6Addr = inner.parse().map_err(|_| HostError("bad IPv6 literal"))?;
            return Ok(Host::Ip(canonical_ip(IpAddr::V6(ip))));
        }
        if raw.contains(':') {
            let ip: Ipv6Addr = raw.parse().map_err(|_| HostError("bad host"))?;
            return Ok(Host::Ip(canonical_ip(IpAddr::V6(ip))));
        }
        let ascii = if raw.is_ascii() {
            raw.to_ascii_lowercase()
        } else {
            idna::domain_to_ascii(raw).map_err(|_| HostError("invalid internationalised name"))?
        };
        let name = ascii.strip_suffix('.').unwrap_or(&ascii);
        if name.is_empty() || name.split('.').any(str::is_empty) {
            return Err(HostError("empty label in host"));
        }
        if name.len() > 253 {
            return Err(HostError("host name too long"));
        }
        let ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_';
        if !name.bytes().all(|b| b == b'.' || ok(b)) {
            return Err(HostError("invalid character in host"));
        }
        // WHATWG rule: a name whose last label is numeric is an IPv4 address in one of
        // the legacy forms (127.1, 0x7f.0.0.1, 2130706433) and must be read as one.
        let last = name.rsplit('.').next().unwrap_or(name);
        if is_numeric_label(last) {
            return parse_legacy_ipv4(name)
                .map(|ip| Host::Ip(IpAddr::V4(ip)))
                .ok_or(HostError("malformed IPv4 address"));
        }
        Ok(Host::Domain(name.to_string()))
    }

    pub fn is_ip(&self) -> bool {
        matches!(self, Host::Ip(_))
    }

    pub fn as_domain(&self) -> Option<&str> {
        match self {
            Host::Domain(d) => Some(d),
            Host::Ip(_) => None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Domain(d) => f.write_str(d),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

impl Destination {
    /// Parse `host[:port]` (an authority without userinfo), with `default_port` when absent.
    pub fn parse_authority(raw: &str, default_port: Option<u16>) -> Result<Self, HostError> {
        let (host, port) = split_host_port(raw)?;
        let port = match port {
            Some(p) => p,
            None => default_port.ok_or(HostError("port missing"))?,
        };
        Ok(Destination { host: Host::parse(host)?, port })
    }

    /// `host:port` as written on the wire (IPv6 bracketed).
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Split an authority into host and optional port. Rejects userinfo and bad ports.
pub fn split_host_port(raw: &str) -> Result<(&str, Option<u16>), HostError> {
    if raw.contains('@') {
        return Err(HostError("userinfo in authority"));
    }
    let (host, port) = if raw.starts_with('[') {
        match raw.find(']') {
            Some(end) => {
                let rest = &raw[end + 1..];
                match rest.strip_prefix(':') {
                    Some(p) => (&raw[..=end], Some(p)),
                    None if rest.is_empty() => (raw, None),
                    None => return Err(HostError("junk after IPv6 literal")),
                }
            }
            None => return Err(HostError("unclosed IPv6 bracket")),
        }
    } else {
        match raw.rfind(':') {
            Some(i) if raw[..i].contains(':') => return Err(HostError("unbracketed IPv6")),
            Some(i) => (&raw[..i], Some(&raw[i + 1..])),
            None => (raw, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(parse_port(p)?),
    };
    Ok((host, port))
}

fn parse_port(p: &str) -> Result<u16, HostError> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HostError("bad port"));
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(HostError("bad port")),
        Ok(n) => Ok(n),
    }
}

/// IPv4-mapped IPv6 addresses are the IPv4 address for every decision.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn is_numeric_label(label: &str) -> bool {
    let digits = label.strip_prefix("0x").map(|h| h.bytes().all(|b| b.is_ascii_hexdigit())).unwrap_or(false);
    digits || (!label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()))
}

/// inet_aton-style parsing: 1 to 4 parts, each decimal, octal (leading 0) or hex (0x).
fn parse_legacy_ipv4(name: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let nums: Vec<u64> = parts.iter().map(|p| parse_ipv4_part(p)).collect::<Option<_>>()?;
    let (last, init) = nums.split_last()?;
    if init.iter().any(|&n| n > 255) {
        return None;
    }
    let last_bits = 8 * (4 - init.len() as u32);
    if *last >= 1u64 << last_bits {
        return None;
    }
    let mut value: u64 = *last;
    for (i, n) in init.iter().enumerate() {
        value |= n << (24 - 8 * i as u32);
    }
    Some(Ipv4Addr::from(value as u32))
}

fn parse_ipv4_part(p: &str) -> Option<u64> {
    if p.is_empty() || p.len() > 12 {
        return None;
    }
    if let Some(hex) = p.strip_prefix("0x") {
        return if hex.is_empty() { Some(0) } else { u64::from_str_radix(hex, 16).ok() };
    }
    if p.len() > 1 && p.starts_with('0') {
        return u64::from_str_radix(&p[1..], 8).ok();
    }
    p.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Host {
        Host::Domain(s.into())
    }
    fn ip(s: &str) -> Host {
        Host::Ip(s.parse().unwrap())
    }

    #[test]
    fn lowercases_and_strips_one_trailing_dot() {
        assert_eq!(Host::parse("API.OpenAI.com.").unwrap(), d("api.openai.com"));
        assert!(Host::parse("api.openai.com..").is_err());
    }

    #[test]
    fn rejects_hostile_forms() {
        for bad in [
            "",
            ".",
            "a..b",
            ".a.com",
            "user@a.com",
            "a%2ecom",
            "a .com",
            "a\t.com",
            "fe80::1%eth0",
            "a/b",
            "a\\b",
            "a,b",
            "[::1",
            "256.1.1.1",
            "1.2.3.4.5",
            "0x1g.0.0.1",
        ] {
            assert!(Host::parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn legacy_ipv4_forms_are_addresses() {
        for form in ["127.1", "0x7f.0.0.1", "2130706433", "0177.0.0.1", "127.0.1"] {
            assert_eq!(Host::parse(form).unwrap(), ip("127.0.0.1"), "{form}");
        }
        assert_eq!(Host::parse("169.254.169.254").unwrap(), ip("169.254.169.254"));
    }

    #[test]
    fn ipv6_and_mapped() {
        assert_eq!(Host::parse("[::1]").unwrap(), ip("::1"));
        assert_eq!(Host::parse("[::ffff:127.0.0.1]").unwrap(), ip("127.0.0.1"));
        assert_eq!(Host::parse("[::FFFF:7f00:1]").unwrap(), ip("127.0.0.1"));
    }

    #[test]
    fn idn_to_punycode() {
        assert_eq!(Host::parse("bücher.example").unwrap(), d("xn--bcher-kva.example"));
    }

    #[test]
    fn authority_parsing() {
        let dst = Destination::parse_authority("Example.com:8443", Some(443)).unwrap();
        assert_eq!(dst.authority(), "example.com:8443");
        let dst = Destination::parse_authority("[::1]:443", None).unwrap();
        assert_eq!(dst.authority(), "[::1]:443");
        assert!(Destination::parse_authority("a.com", None).is_err());
        assert!(Destination::parse_authority("a.com:0", None).is_err());
        assert!(Destination::parse_authority("a.com:99999", None).is_err());
        assert!(Destination::parse_authority("a.com:+1", None).is_err());
        assert!(Destination::parse_authority("u:p@a.com:443", None).is_err());
        assert!(Destination::parse_authority("::1:443", None).is_err());
    }
}
