//! Which addresses latchkey refuses to connect to unless the config allows them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Why an address is not public, or `None` when it is.
pub fn non_public_reason(ip: IpAddr) -> Option<&'static str> {
    match super::host::canonical_ip(ip) {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_link_local() {
        Some("link-local (cloud metadata)")
    } else if ip.is_private() {
        Some("private")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("carrier-grade NAT")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if ip.is_multicast() || ip.is_broadcast() || o[0] >= 240 {
        Some("multicast or reserved")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        // RFC 2544, not routed on the internet; `exec --jail` hands these out as names.
        Some("benchmarking range (latchkey's jail addresses)")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignment")
    } else {
        None
    }
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_loopback() {
        return Some("loopback");
    }
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_multicast() {
        return Some("multicast");
    }
    if (s[0] & 0xffc0) == 0xfe80 {
        return Some("link-local");
    }
    if (s[0] & 0xfe00) == 0xfc00 {
        return Some("unique local (includes fd00:ec2::254 metadata)");
    }
    // Embedded IPv4: 6to4, NAT64 (well-known and local-use), IPv4-compatible.
    let embedded = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    let inner = if s[0] == 0x2002 {
        Some(embedded(s[1], s[2]))
    } else if (s[0] == 0x64 && s[1] == 0xff9b) || s[..6] == [0; 6] {
        // NAT64 (64:ff9b::/96, 64:ff9b:1::/48) and IPv4-compatible: IPv4 in the low bits.
        Some(embedded(s[6], s[7]))
    } else {
        None
    };
    match inner {
        Some(v4) => v4_reason(v4).map(|_| "IPv4 embedded in IPv6 that is not public"),
        None => None,
    }
}

/// Is `ip` refused, given the configured exemptions?
pub fn refused(ip: IpAddr, allow_private: &[IpNet]) -> Option<&'static str> {
    let ip = super::host::canonical_ip(ip);
    let reason = non_public_reason(ip)?;
    if allow_private.iter().any(|n| n.contains(&ip)) { None } else { Some(reason) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Option<&'static str> {
        non_public_reason(s.parse().unwrap())
    }

    #[test]
    fn refuses_the_usual_suspects() {
        for a in [
            "127.0.0.1",
            "127.9.9.9",
            "169.254.169.254",
            "10.1.1.1",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "fc00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "2002:7f00:1::",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
            "ff02::1",
            // The jail's name addresses: one it no longer knows must go nowhere.
            "198.18.0.1",
            "198.19.255.254",
        ] {
            assert!(r(a).is_some(), "{a} must be refused");
        }
    }

    #[test]
    fn public_passes() {
        for a in ["1.1.1.1", "93.184.216.34", "2606:4700::1111", "2002:0101:0101::", "100.128.0.1"] {
            assert!(r(a).is_none(), "{a} is public");
        }
    }

    #[test]
    fn allow_private_exempts() {
        let allow: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        assert!(refused("127.0.0.1".parse().unwrap(), &allow).is_none());
        assert!(refused("::ffff:127.0.0.1".parse().unwrap(), &allow).is_none());
        assert!(refused("169.254.169.254".parse().unwrap(), &allow).is_some());
    }
}
