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

/// A request head through latchkey's own HTTP/1.1 codec (`proxy/h1/codec.rs`): it
/// never panics; a head it takes is taken the same from its own bytes alone, every
/// shorter prefix of it is incomplete, its request holds none of the input's bytes, and
/// it carries none of the headers that send a request to hyper, with `Content-Length`
/// read exactly as the header says. The server's parse over shared bytes
/// (`parse_shared`, no copy) reads everything exactly as the copying one.
pub fn h1(data: &[u8]) {
    use crate::proxy::h1::codec::{self, Parsed};
    use http::header;
    let parsed = codec::parse(data, 16);
    let shared = codec::parse_shared(&bytes::Bytes::copy_from_slice(data), 16);
    assert_eq!(format!("{parsed:?}"), format!("{shared:?}"), "read alike from shared bytes");
    let Parsed::Simple(head) = parsed else { return };
    let own = &data[..head.len];
    assert!(matches!(codec::parse(own, 16), Parsed::Simple(ref h) if h.len == head.len), "taken alone");
    for cut in 0..head.len {
        assert!(matches!(codec::parse(&data[..cut], 16), Parsed::Partial), "a prefix of {cut} bytes");
    }
    let r = &head.request;
    assert_eq!(r.version(), http::Version::HTTP_11);
    assert_ne!(r.method(), http::Method::CONNECT);
    for name in [header::TRANSFER_ENCODING, header::UPGRADE, header::EXPECT, header::TE] {
        assert!(!r.headers().contains_key(&name), "{name} goes to hyper");
    }
    let lengths: Vec<u64> = r
        .headers()
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .map(|v| v.to_str().unwrap().parse().unwrap())
        .collect();
    assert!(lengths.iter().all(|&n| n == head.body), "one length: {lengths:?} vs {}", head.body);
    assert!(!lengths.is_empty() || head.body == 0);
    let input = data.as_ptr_range();
    for v in r.headers().values().filter(|v| !v.is_empty()) {
        assert!(!input.contains(&v.as_bytes().as_ptr()), "a value borrows the input");
    }
}

/// An upstream's response stream through latchkey's own HTTP/1.1 client codec
/// (`proxy/client/codec.rs`). The first byte: bit 0, the request was `HEAD`; bit 1, also
/// feed the stream a byte at a time (short streams); the rest scales the cut points the
/// next three bytes give. It never panics; the stream read whole, at those cuts and a
/// byte at a time is read the same (head, body bytes, trailers, error, what is left); a
/// `Length` body is exactly its length, and a finished body leaves exactly the bytes
/// after it in the buffer.
pub fn client(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (cuts, stream) = rest.split_at(rest.len().min(3));
    let head_request = mode & 1 == 1;
    let scale = usize::from(mode >> 2) + 1;
    let cuts: Vec<usize> = cuts.iter().map(|&c| usize::from(c) * scale).collect();
    let whole = client_read(stream, head_request, &[]);
    assert_eq!(client_read(stream, head_request, &cuts), whole, "cut at {cuts:?}");
    if mode & 2 == 2 && stream.len() <= 2048 {
        let every: Vec<usize> = (1..stream.len()).collect();
        assert_eq!(client_read(stream, head_request, &every), whole, "a byte at a time");
    }
}

/// How reading a response stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientEnd {
    /// The body ended; what the stream holds after it (nothing for a body read to the
    /// close).
    Done {
        left: Vec<u8>,
    },
    /// The stream ended before a final head.
    Closed,
    Failed(crate::proxy::client::codec::Malformed),
}

/// What the codec made of a response stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientRead {
    /// 1xx heads skipped.
    pub interim: usize,
    /// Status, version, reason phrase (when not the canonical one), fields in order.
    pub head: Option<ClientHead>,
    pub body: Vec<u8>,
    pub trailers: Option<Vec<(String, Vec<u8>)>>,
    pub end: ClientEnd,
}

/// A final head, comparable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientHead {
    pub status: u16,
    pub version: http::Version,
    pub reason: Option<Vec<u8>>,
    pub fields: Vec<(String, Vec<u8>)>,
    pub framing: crate::proxy::client::codec::Framing,
    pub reusable: bool,
}

pub(crate) fn fields_of(map: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    map.iter().map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec())).collect()
}

/// Read `stream` as the own client does (`proxy/client/mod.rs`), handing it to the
/// codec in pieces that end at `cuts`, checking the invariants that hold whatever the
/// cuts.
pub(crate) fn client_read(stream: &[u8], head_request: bool, cuts: &[usize]) -> ClientRead {
    use crate::proxy::client::codec::{Decoder, Framing, Parsed, Step, parse_head};
    let mut ends: Vec<usize> = cuts.iter().map(|&c| c.min(stream.len())).filter(|&c| c > 0).collect();
    ends.push(stream.len());
    ends.sort_unstable();
    ends.dedup();
    let mut ends = ends.into_iter();
    let mut fed = 0;
    let mut buf = bytes::BytesMut::new();
    // The next piece; false at the stream's end.
    let mut feed = |buf: &mut bytes::BytesMut, fed: &mut usize| match ends.next() {
        Some(end) => {
            buf.extend_from_slice(&stream[*fed..end]);
            *fed = end;
            true
        }
        None => false,
    };
    let mut read =
        ClientRead { interim: 0, head: None, body: Vec::new(), trailers: None, end: ClientEnd::Closed };
    let head = loop {
        let before = buf.len();
        match parse_head(&mut buf, head_request) {
            Ok(Parsed::Final(head)) => break head,
            Ok(Parsed::Interim) => {
                assert!(buf.len() < before, "a 1xx head is taken off");
                read.interim += 1;
            }
            Ok(Parsed::Partial) => {
                assert_eq!(buf.len(), before, "nothing taken from a partial head");
                if !feed(&mut buf, &mut fed) {
                    return read;
                }
            }
            Err(e) => {
                read.end = ClientEnd::Failed(e);
                return read;
            }
        }
    };
    let (framing, reusable) = (head.framing, head.reusable);
    let r = &head.response;
    read.head = Some(ClientHead {
        status: r.status().as_u16(),
        version: r.version(),
        reason: r.extensions().get::<hyper::ext::ReasonPhrase>().map(|p| p.as_bytes().to_vec()),
        fields: fields_of(r.headers()),
        framing,
        reusable,
    });
    assert!(!reusable || framing != Framing::Close, "a body read to the close leaves no connection");
    // Where the body starts in the stream.
    let start = fed - buf.len();
    let mut decoder = Decoder::new(framing);
    loop {
        match decoder.step(&mut buf) {
            Ok(Step::Data(data)) => {
                assert!(!data.is_empty(), "no empty data frame");
                read.body.extend_from_slice(&data);
                if let Framing::Length(n) = framing {
                    assert!(read.body.len() as u64 <= n, "past the length");
                    assert_eq!(decoder.remaining(), Some(n - read.body.len() as u64));
                }
            }
            Ok(Step::Trailers(map)) => {
                assert!(decoder.is_done(), "trailers end the body");
                read.trailers = Some(fields_of(&map));
            }
            Ok(Step::Done) => break,
            Ok(Step::More) => {
                if !feed(&mut buf, &mut fed) {
                    match decoder.eof() {
                        Ok(()) => {
                            assert_eq!(framing, Framing::Close, "only a body read to the close ends so");
                            assert_eq!(read.body, &stream[start..], "the rest of the stream");
                            assert!(decoder.is_done());
                            read.end = ClientEnd::Done { left: Vec::new() };
                        }
                        Err(e) => read.end = ClientEnd::Failed(e),
                    }
                    return read;
                }
            }
            Err(e) => {
                read.end = ClientEnd::Failed(e);
                return read;
            }
        }
    }
    assert!(decoder.is_done());
    let at_done = buf.clone();
    assert!(matches!(decoder.step(&mut buf), Ok(Step::Done)), "done stays done");
    assert_eq!(buf, at_done, "a done body takes nothing more");
    let end = fed - buf.len();
    match framing {
        Framing::Empty => assert_eq!(end, start, "no body"),
        Framing::Length(n) => {
            assert_eq!(read.body.len() as u64, n, "the whole length");
            assert_eq!(&stream[start..end], &read.body[..], "the body is the bytes after the head");
        }
        Framing::Chunked => assert!(stream[..end].ends_with(b"\r\n"), "a chunked body ends with its CRLF"),
        Framing::Close => unreachable!("a body read to the close ends at the close"),
    }
    let mut left = buf.to_vec();
    left.extend_from_slice(&stream[fed..]);
    read.end = ClientEnd::Done { left };
    read
}

/// A client's HTTP/2 byte stream through the frame-rate guard, split at the points the
/// first bytes choose: it never panics, and however the stream is cut it stops at the
/// same frame for the same reason (up to a header's bytes later when that header was
/// cut: its first bytes went to hyper already), with the clock standing still.
pub fn h2_frames(data: &[u8]) {
    use crate::proxy::h2guard::watch_split;
    let (cuts, input) = data.split_at(data.len().min(4));
    let cuts: Vec<usize> = cuts.iter().map(|&c| usize::from(c)).collect();
    let still = std::time::Duration::ZERO;
    let whole = watch_split(input, &[], still);
    let split = watch_split(input, &cuts, still);
    assert_eq!(whole.map(|w| w.1), split.map(|s| s.1), "the same verdict");
    if let (Some((w, _)), Some((s, _))) = (whole, split) {
        assert!(w <= s && s - w < 9, "stopped at the same frame: {w} vs {s}");
        assert!(matches!(input[w + 3], 0x4 | 0x6) && input[w + 4] & 1 == 0, "a SETTINGS or PING");
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
    static TOKENS: std::sync::OnceLock<crate::token::state::TokenState> = std::sync::OnceLock::new();
    let tokens = TOKENS.get_or_init(crate::token::state::TokenState::keyless);
    let decision = config.decide(&crate::policy::Question::now(None, &dest, Some(&head)), tokens);
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

/// The fuzzers' fixed token root key, so seeds minted with it verify.
pub fn fuzz_token_root() -> biscuit_auth::KeyPair {
    let key = biscuit_auth::PrivateKey::from_bytes(&[7u8; 32], biscuit_auth::builder::Algorithm::Ed25519)
        .expect("32 bytes are an Ed25519 key");
    biscuit_auth::KeyPair::from(&key)
}

/// The fuzzers' fixed seal key.
pub fn fuzz_seal_key() -> crate::seal::SealKey {
    crate::seal::SealKey::from_text(&format!("x25519-private/{}", "09".repeat(32))).expect("a valid key")
}

/// Requests every token is checked against: in and out of typical scopes.
fn token_requests() -> Vec<crate::token::Request<'static>> {
    let base = crate::token::Request {
        host: "api.example.com",
        port: 443,
        path: Some("/v1/messages"),
        method: Some("POST"),
        agent: None,
        now: 1_800_000_000,
    };
    vec![
        base,
        crate::token::Request { host: "evil.example.net", port: 8443, ..base },
        crate::token::Request { path: Some("/v1beta"), method: Some("GET"), agent: Some("claude"), ..base },
        crate::token::Request { path: None, method: None, now: 2_000_000_000, ..base },
        crate::token::Request { host: "127.0.0.1", path: Some("/"), now: 0, ..base },
    ]
}

/// Scoped tokens. First byte even: the rest is a token's bytes (as the slot's base64
/// would carry them): parsing, inspecting and attenuating never panic, and whatever
/// verifies is decided the same by the compiled checks and by Biscuit's authorizer.
/// Odd: the rest is the Datalog source of an attenuation block appended to a fixed
/// token: the compiled checks (when latchkey compiles the block) decide every request
/// exactly as Biscuit's authorizer does, and the child never accepts what the parent
/// refused.
pub fn token(data: &[u8]) {
    use crate::token::{Revoked, Target};
    use base64::Engine;
    let Some((&mode, rest)) = data.split_first() else { return };
    let root = fuzz_token_root();
    let text = if mode % 2 == 0 {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rest)
    } else {
        let Ok(source) = std::str::from_utf8(rest) else { return };
        let Ok(block) = biscuit_auth::builder::BlockBuilder::new().code(source) else { return };
        let parent = crate::token::mint(&root, "api", &crate::token::Restriction::default()).expect("mint");
        let Ok(unverified) = biscuit_auth::UnverifiedBiscuit::from_base64(&parent) else { return };
        let Ok(child) = unverified.append(block).and_then(|c| c.to_base64()) else { return };
        child
    };
    let _ = crate::token::looks_like_token(&text);
    let _ = crate::token::inspect(&text);
    let _ =
        crate::token::attenuate(&text, &crate::token::Restriction { ports: vec![443], ..Default::default() });
    let Ok(verified) = crate::token::parse(&text, &root.public()) else { return };
    let Ok(biscuit) = biscuit_auth::Biscuit::from_base64(&text, root.public()) else {
        panic!("latchkey verified a token Biscuit does not");
    };
    let target = Target { name: &verified.credential, shares_placeholder_with: &[] };
    for req in token_requests() {
        let ours = crate::token::authorize(&verified, &Revoked::default(), &target, &req);
        match crate::token::run_authorizer(&biscuit, &req) {
            Err(crate::token::TokenRefusal::TooCostly(_)) => {}
            theirs => assert_eq!(ours.is_ok(), theirs.is_ok(), "{req:?}: {ours:?} vs {theirs:?}"),
        }
    }
}

/// Sealed values: parsing and opening never panic, whatever the text (raw, or `lks1:`
/// with the input's bytes); what opens was sealed to the fuzz key for the hosts it
/// shows, and says nothing when altered.
pub fn sealed(data: &[u8]) {
    use base64::Engine;
    let key = fuzz_seal_key();
    let texts = [
        String::from_utf8_lossy(data).into_owned(),
        format!("lks1:{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)),
    ];
    for text in texts {
        let Ok(sealed) = crate::seal::parse(&text) else { continue };
        assert!(!sealed.hosts.is_empty(), "a sealed value names its hosts");
        let domains: Vec<crate::policy::Pattern> = ["api.example.com", ".example.org"]
            .iter()
            .filter_map(|p| crate::policy::Pattern::parse(p).ok())
            .collect();
        let _ = sealed.uncovered(&domains, &[443]);
        if let Ok(secret) = sealed.open(&key) {
            assert!(!secret.expose().is_empty(), "an opened secret is never empty");
        }
    }
}

/// Outbound scanning (`[proxy.dlp]`): the first byte cuts the rest into two chunks.
/// Scanning never panics; every match lies inside the buffer; masking keeps the
/// length and leaves no match behind; streaming in two chunks releases every byte once.
pub fn dlp(data: &[u8]) {
    use std::sync::OnceLock;
    static SCANNER: OnceLock<crate::dlp::Scanner> = OnceLock::new();
    let scanner = SCANNER.get_or_init(|| crate::dlp::Scanner::new(true, vec![]).expect("bundled rules"));
    let Some((&cut, body)) = data.split_first() else { return };
    let found = scanner.scan(body, None);
    for h in &found.hits {
        for r in std::iter::once(&h.range).chain(h.also.as_ref()) {
            assert!(r.start < r.end && r.end <= body.len(), "{r:?} in {}", body.len());
        }
    }
    let mut masked = body.to_vec();
    scanner.mask_all(&mut masked, &found.hits.iter().collect::<Vec<_>>(), |_| true);
    assert_eq!(masked.len(), body.len());
    let again = scanner.scan(&masked, None);
    assert!(again.hits.is_empty(), "left after masking: {:?}", again.hits);
    let cut = usize::from(cut).min(body.len());
    let mut stream = crate::dlp::stream::Stream::new(0, false);
    let mut out = Vec::new();
    for (i, part) in [&body[..cut], &body[cut..]].into_iter().enumerate() {
        stream.feed(part, scanner, None, i == 1);
        out.extend_from_slice(&stream.release(None, i == 1));
    }
    assert_eq!(out, body, "released once, unchanged (nothing masked here)");
    dlp_quick(scanner, cut, body);
}

/// The quick pass over a held body in pieces (`dlp::quick`) clears only what a whole
/// scan finds nothing in, with an own secret in force, the body cut in pieces of
/// `cut % 40 + 1` bytes.
fn dlp_quick(scanner: &crate::dlp::Scanner, cut: usize, body: &[u8]) {
    use std::sync::{Arc, OnceLock};
    static OWN: OnceLock<crate::redact::Set> = OnceLock::new();
    let own = OWN.get_or_init(|| {
        let secret = crate::secrets::Secret::new(DLP_OWN_SECRET.into());
        let redactor = crate::redact::Redactor::new(&[secret]).expect("a redactor");
        crate::redact::Set::new(vec![Arc::new(redactor)]).expect("a set")
    });
    crate::dlp::quick::assert_passes_agree(body);
    let quick = crate::dlp::quick::Cache::default().get(scanner, Some(own)).expect("no user regexes");
    let pieces: Vec<bytes::Bytes> = body.chunks(cut % 40 + 1).map(bytes::Bytes::copy_from_slice).collect();
    let whole = scanner.scan(body, Some(own));
    let quick_found = scanner.scan_pieces(&pieces, Some(own), Some(&quick));
    assert_eq!(quick_found.own, whole.own, "own secrets");
    assert_eq!(quick_found.hits, whole.hits, "rule matches");
}

/// The own secret the DLP fuzz target holds (its forms are in the proptests' alphabet).
pub const DLP_OWN_SECRET: &str = "own-live-secret-0123456789";

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
            include_bytes!("../fuzz/corpus/h1/post-with-length"),
            include_bytes!("../fuzz/corpus/h1/get-then-head-pipelined"),
            include_bytes!("../fuzz/corpus/h1/two-lengths-and-chunked"),
            include_bytes!("../fuzz/corpus/h2_frames/settings-flood"),
            include_bytes!("../fuzz/corpus/client/interim-chunked-trailers"),
            include_bytes!("../fuzz/corpus/client/chunked-and-length"),
        ] {
            super::host(input);
            super::config(input);
            super::request(input);
            super::framing(input);
            super::h1(input);
            super::client(input);
            super::h2_frames(input);
            super::token(input);
            super::sealed(input);
        }
    }

    /// The client seeds are read to their end, each as its name says.
    #[test]
    fn client_seeds() {
        use super::{ClientEnd, client_read};
        use crate::proxy::client::codec::Framing;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/client");
        for (name, framing, reusable, body, left) in [
            ("length-then-next", Framing::Length(5), true, &b"hello"[..], &b"HTTP/1.1 200 OK\r\n"[..]),
            ("interim-chunked-trailers", Framing::Chunked, true, b"hello0123456789", b"rest"),
            ("head-request-with-body", Framing::Empty, true, b"", b"hello"),
            ("http10-to-the-close", Framing::Close, false, b"read to the close", b""),
            ("chunked-and-length", Framing::Chunked, false, b"abc", b""),
        ] {
            let seed = std::fs::read(dir.join(name)).unwrap();
            super::client(&seed);
            let read = client_read(&seed[4..], seed[0] & 1 == 1, &[]);
            let head = read.head.expect(name);
            assert_eq!((head.framing, head.reusable, &read.body[..]), (framing, reusable, body), "{name}");
            assert_eq!(read.end, ClientEnd::Done { left: left.to_vec() }, "{name}");
        }
    }

    /// The h2 seed is a flood: the guard stops it.
    #[test]
    fn h2_seed_floods() {
        let seed = include_bytes!("../fuzz/corpus/h2_frames/settings-flood");
        let stopped = crate::proxy::h2guard::watch_split(&seed[4..], &[], std::time::Duration::ZERO);
        assert_eq!(stopped.map(|s| s.1), Some(crate::proxy::h2guard::Flood::Settings));
    }

    /// The committed seeds are what they claim: a token the fuzz key verifies, a block
    /// the compiler takes, a sealed value the fuzz key opens.
    #[test]
    fn token_and_sealed_seeds() {
        use base64::Engine;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let raw = std::fs::read(dir.join("token/minted")).unwrap();
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw[1..]);
        assert!(crate::token::parse(&text, &super::fuzz_token_root().public()).unwrap().is_compiled());
        for name in ["minted", "block", "block-datalog"] {
            super::token(&std::fs::read(dir.join("token").join(name)).unwrap());
        }
        let blob = std::fs::read_to_string(dir.join("sealed/seed")).unwrap();
        let opened = crate::seal::parse(&blob).unwrap().open(&super::fuzz_seal_key()).unwrap();
        assert_eq!(opened.expose(), "fuzz-secret");
        super::sealed(blob.as_bytes());
    }

    proptest! {
        #[test]
        fn random_bytes(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            super::host(&data);
            super::config(&data);
            super::request(&data);
            super::framing(&data);
            super::h1(&data);
            super::client(&data);
            super::h2_frames(&data);
            super::token(&data);
            super::sealed(&data);
            super::dlp(&data);
        }

        #[test]
        fn random_dlp_texts(cut in any::<u8>(), parts in proptest::collection::vec(
            "(AKIAZ7QWERTY2UIOPLKJ|Zx9Qp2Lm7Vb4Nc8Rt1Yw6Ks3Hd5Gf0Ja2Ue7IoPq|ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5|eyJ|sk-|\\\\u00|\\\\u|\\\\/|%2|%|QUtJQVo3|own-live-secret-0123456789|b3duLWxpdmUtc2VjcmV0LTAxMjM0NTY3ODk|own%2Dlive|-----BEGIN PRIVATE KEY-----|[A-Za-z0-9+/_-]{0,30}|[ -~]{0,12}|\n)", 0..24)) {
            let mut data = vec![cut];
            data.extend_from_slice(parts.concat().as_bytes());
            super::dlp(&data);
        }

        #[test]
        fn random_pipelines(parts in proptest::collection::vec(
            "(POST / HTTP/1.1\r\n|CONNECT a:1 HTTP/1.1\r\n|GET /\t HTTP/1.1\r\n|Content-Length: [0-9]{1,2}\r\n|Transfer-Encoding: chunked\r\n|Upgrade: x\r\n|\r\n|[0-9a-f]{1,2}\r\n|[a-z]{0,9}|\n)", 0..30), switched in any::<bool>()) {
            let first = if switched { '\x01' } else { '\x02' };
            super::framing(format!("{first}\x07\x13\x30{}", parts.concat()).as_bytes());
        }

        #[test]
        fn random_h1_heads(parts in proptest::collection::vec(
            "(GET|POST|HEAD|CONNECT|G T) (/|/a b|\\*|http://h/x) HTTP/1\\.[01]\r\n|Content-Length: [0-9]{1,3}\r\n|content-length: 0[0-9]\r\n|Transfer-Encoding: chunked\r\n|Upgrade: x\r\n|Expect: 100-continue\r\n|TE: trailers\r\n|Connection: (close|keep-alive)\r\n|X-[a-z]{1,3}: [ -~]{0,8}\r\n|\r\n|\n|[a-z]{0,4}", 0..12)) {
            super::h1(parts.concat().as_bytes());
        }

        #[test]
        fn random_responses(mode in any::<u8>(), cuts in proptest::collection::vec(any::<u8>(), 3..4), parts in proptest::collection::vec(
            "(HTTP/1\\.[01] (200|204|304|100|101) OK\r\n|Content-Length: [0-9]{1,2}(, ?[0-9])?\r\n|Transfer-Encoding: (gzip, )?chunked\r\n|Connection: (close|keep-alive)\r\n|X-[a-z]: [ -~]{0,4}\r\n|\r\n|[0-9a-fA-F]{1,3}(;x|;[ -~]{0,3})?\r\n|0\r\n|T: v\r\n|[a-z]{0,9}|\n|\r)", 0..24)) {
            let mut data = vec![mode];
            data.extend_from_slice(&cuts);
            data.extend_from_slice(parts.concat().as_bytes());
            super::client(&data);
        }

        #[test]
        fn random_h2_streams(cuts in proptest::collection::vec(any::<u8>(), 4..5), frames in proptest::collection::vec(
            (0u8..10, 0u8..2, 0usize..40, 1usize..60), 0..400)) {
            // Frames of any type (SETTINGS and PING often, with and without ACK), in
            // runs, so that floods and near-floods both occur.
            let mut data = cuts;
            data.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
            for (kind, flags, len, run) in frames {
                let kind = if kind > 6 { 0x4 } else { kind };
                for _ in 0..run {
                    data.extend_from_slice(&[0, 0, len as u8, kind, flags, 0, 0, 0, 1]);
                    data.extend(std::iter::repeat_n(0u8, len));
                }
            }
            super::h2_frames(&data);
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
