//! Fuzz entry points (the `fuzz/` harnesses call these; `cargo test` runs them over a
//! small corpus and random input). Each asserts invariants, so a fuzzer finds violations
//! as panics, not only crashes.

use crate::policy::{Destination, Host, Pattern, RequestHead};

/// Host normalisation and pattern matching: never panics; normalisation is idempotent;
/// a suffix pattern matches only hosts inside its labels.
pub fn host(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (left, right) = text.split_once('\n').unwrap_or((text, "example.com"));
    if let Ok(dest) = Destination::parse_authority(left, Some(443)) {
        let again =
            Destination::parse_authority(&dest.authority(), Some(443)).expect("normalised form parses");
        assert_eq!(again, dest, "normalisation is idempotent");
    }
    if let (Ok(p), Ok(h)) = (Pattern::parse(right), Host::parse(left)) {
        let matched = p.matches_host(&h).is_some();
        if let (crate::policy::pattern::HostPattern::Suffix(d), Host::Domain(name)) = (&p.host, &h) {
            let inside = name == d || name.ends_with(&format!(".{d}"));
            assert_eq!(matched, inside, "suffix {d} vs {name}");
        }
        if h.is_ip() && matched {
            assert!(
                matches!(
                    p.host,
                    crate::policy::pattern::HostPattern::Ip(_)
                        | crate::policy::pattern::HostPattern::Cidr(_)
                        | crate::policy::pattern::HostPattern::Any
                ),
                "an IP matched a name rule"
            );
        }
    }
}

/// Config parsing never panics, whatever the text.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = crate::config::compile(text, None, &|_| Some("v".into()), &[]);
}

/// A client byte stream through the framing guard, split at the points the first bytes
/// choose (the first bit says whether requests that may switch protocols do): it never
/// panics and changes nothing but the `Content-Length` names it renames, except that it
/// may stop releasing (after CL+TE) or end with a marker head in place of a head it
/// refuses.
pub fn framing(data: &[u8]) {
    use crate::proxy::framing::{SMUGGLED, Scanner};
    let (cuts, input) = data.split_at(data.len().min(4));
    let switched = cuts.first().is_some_and(|c| c & 1 == 1);
    let cuts: Vec<usize> = cuts.iter().map(|&c| usize::from(c)).collect();
    let mut scanner = Scanner::new(1024, 16);
    let mut out = scanner.scan_split(input, &cuts, switched);
    if let Some(at) = scanner.marker_at() {
        let marker = out.split_off(usize::try_from(at).expect("in memory"));
        assert!(marker.starts_with(b"GET / HTTP/1.1\r\n"), "a marker head");
        assert_eq!(marker.windows(4).filter(|w| w == b"\r\n\r\n").count(), 1, "one head");
        assert!(marker.ends_with(b"\r\nconnection: close\r\n\r\n"));
    }
    if scanner.refused() {
        assert!(out.len() <= input.len(), "no byte added");
    } else {
        assert_eq!(out.len(), input.len(), "no byte lost or added");
    }
    let mut i = 0;
    while i < out.len() {
        if out[i] != input[i] {
            assert!(out[i..].starts_with(SMUGGLED.as_bytes()), "only renames at {i}");
            assert!(input[i..].to_ascii_lowercase().starts_with(b"content-length"));
            i += SMUGGLED.len();
        } else {
            i += 1;
        }
    }
}

/// A request head through policy and injection: never panics, and an injected request
/// carries exactly one credential header.
pub fn request(data: &[u8]) {
    use std::sync::OnceLock;
    static CONFIG: OnceLock<crate::config::Config> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let src = "[credentials.a]\nheader = [\"x-api-key\", \"Authorization: Bearer\"]\nvalue = \"secret-a\"\ndomains = [\".example.com\"]\npaths = [\"/v1\"]\n[credentials.q]\nauth_type = \"query\"\nparam = \"key\"\nvalue = \"secret-q\"\ndomains = [\"q.example.com\"]\n";
        crate::config::compile(src, None, &|_| None, &[]).expect("fuzz config")
    });
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("");
    let mut words = first.split(' ');
    let (method, target, host) =
        (words.next().unwrap_or("GET"), words.next().unwrap_or("/"), words.next().unwrap_or("a.example.com"));
    let Ok(dest) = Destination::parse_authority(host, Some(443)) else { return };
    let mut builder = http::Request::builder().method(method).uri(target);
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            builder = builder.header(k.trim(), v.trim());
        }
    }
    let Ok(req) = builder.body(()) else { return };
    let (mut parts, _) = req.into_parts();
    let target = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    let head = RequestHead {
        method: parts.method.as_str(),
        target: &target,
        path: parts.uri.path(),
        headers: &parts.headers,
        tls: true,
    };
    let decision = config.decide(&crate::policy::Question::now(None, &dest, Some(&head)));
    if let crate::policy::Decision::Inject { credential, captures, .. } = decision {
        let cred = &config.credentials[credential];
        if cred.injector.inject(&mut parts, &captures, None).is_ok() && cred.name == "a" {
            let n = parts.headers.get_all("x-api-key").iter().count()
                + parts.headers.get_all("authorization").iter().count();
            assert_eq!(n, 1, "exactly one credential header");
        }
    }
}

/// The jail's DNS: never panics; an answer keeps the query's ID, and every address it
/// hands out is in the jail's range and maps back to a name that normalises to itself.
pub fn dns(data: &[u8]) {
    let mut map = crate::jail::dns::FakeAddrs::with_capacity(4);
    let Some(resp) = crate::jail::dns::answer(data, &mut map) else { return };
    assert!(resp.len() >= 12 && resp[..2] == data[..2], "answer keeps the ID");
    let answers = u16::from_be_bytes([resp[6], resp[7]]);
    if answers == 1 {
        let o = &resp[resp.len() - 4..];
        let ip = std::net::Ipv4Addr::new(o[0], o[1], o[2], o[3]);
        if !ip.is_loopback() {
            assert!(crate::jail::dns::FakeAddrs::in_range(ip), "{ip} outside the jail range");
            let name = map.name_of(ip).expect("a handed-out address maps back");
            assert_eq!(Host::parse(&name), Ok(Host::Domain(name.clone())), "names are stored normalised");
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    #[test]
    fn corpus() {
        for input in [
            &b"API.example.COM.:443\n.example.com"[..],
            b"127.1\n10.0.0.0/8",
            b"[::ffff:7f00:1]:80\n~.*",
            b"[proxy]\nport = 1\n[credentials.x]\nheader = \"k\"\nvalue = \"${V}\"\ndomains = [\"~(\"]",
            b"GET /v1/x a.example.com\r\nX-Api-Key: a\r\nx-api-key: b\r\nAuthorization: Bearer c",
            b"POST /?key=1&key=2 q.example.com\r\n",
            include_bytes!("../fuzz/corpus/framing/upgrade-not-switched"),
            include_bytes!("../fuzz/corpus/framing/bad-connect-target"),
        ] {
            super::host(input);
            super::config(input);
            super::request(input);
            super::framing(input);
        }
    }

    proptest! {
        #[test]
        fn random_bytes(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            super::host(&data);
            super::config(&data);
            super::request(&data);
            super::framing(&data);
        }

        #[test]
        fn random_pipelines(parts in proptest::collection::vec(
            "(POST / HTTP/1.1\r\n|CONNECT a:1 HTTP/1.1\r\n|GET /\t HTTP/1.1\r\n|Content-Length: [0-9]{1,2}\r\n|Transfer-Encoding: chunked\r\n|Upgrade: x\r\n|\r\n|[0-9a-f]{1,2}\r\n|[a-z]{0,9}|\n)", 0..30), switched in any::<bool>()) {
            let first = if switched { '\x01' } else { '\x02' };
            super::framing(format!("{first}\x07\x13\x30{}", parts.concat()).as_bytes());
        }

        #[test]
        fn random_requests(method in "(GET|POST|TRACE|[A-Z]{1,6})", path in "/[ -~]{0,40}",
                           headers in proptest::collection::vec(("(x-api-key|X-API-KEY|authorization|[a-z-]{1,10})", "[ -~]{0,20}"), 0..6)) {
            let mut text = format!("{method} {path} a.example.com");
            for (k, v) in headers {
                text.push_str(&format!("\r\n{k}: {v}"));
            }
            super::request(text.as_bytes());
        }
    }
}
