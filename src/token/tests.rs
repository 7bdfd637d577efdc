//! Tokens: the scope a token grants is exactly what its checks say, on the fast path
//! and in Biscuit's own authorizer alike; attenuation only narrows; damaged, forged and
//! foreign tokens are refused with the check that failed named.

use proptest::prelude::*;

use super::scope::{HostRule, allows};
use super::*;

const NOW: u64 = 1_800_000_000;

fn root() -> KeyPair {
    KeyPair::new()
}

fn req<'a>(host: &'a str, path: &'a str, method: &'a str) -> Request<'a> {
    Request { host, port: 443, path: Some(path), method: Some(method), agent: None, now: NOW }
}

fn target(name: &str) -> Target<'_> {
    Target { name, shares_placeholder_with: &[] }
}

fn check(token: &str, key: &KeyPair, r: &Request<'_>) -> Result<(), TokenRefusal> {
    verify(token, &key.public(), &Revoked::default(), &target("api"), r).map(|_| ())
}

/// The same token, decided by Biscuit's authorizer instead of the compiled checks.
fn datalog(token: &str, key: &KeyPair, r: &Request<'_>) -> Result<(), TokenRefusal> {
    let biscuit = Biscuit::from_base64(token, key.public()).unwrap();
    run_authorizer(&biscuit, r)
}

fn scoped(paths: &[&str], methods: &[&str], ttl: Option<u64>) -> Restriction {
    Restriction {
        hosts: vec![HostRule::parse("api.example.com").unwrap(), HostRule::parse(".example.org").unwrap()],
        paths: paths.iter().map(|p| crate::policy::canonical_prefix(p).unwrap()).collect(),
        methods: methods.iter().map(|m| m.to_string()).collect(),
        not_after: ttl.map(|t| NOW + t),
        ..Default::default()
    }
}

#[test]
fn a_token_allows_its_scope_and_names_the_check_that_refuses() {
    let key = root();
    let token = mint(&key, "api", &scoped(&["/v1"], &["POST"], Some(60))).unwrap();
    assert!(parse(&token, &key.public()).unwrap().is_compiled());
    assert_eq!(check(&token, &key, &req("api.example.com", "/v1/messages", "POST")), Ok(()));
    assert_eq!(check(&token, &key, &req("a.b.example.org", "/v1", "POST")), Ok(()));
    let subject = |r: Result<(), TokenRefusal>| r.unwrap_err().check();
    assert_eq!(subject(check(&token, &key, &req("evil.example.net", "/v1", "POST"))), "host");
    assert_eq!(subject(check(&token, &key, &req("api.example.com", "/v1beta", "POST"))), "path");
    assert_eq!(subject(check(&token, &key, &req("api.example.com", "/v1", "GET"))), "method");
    let late = Request { now: NOW + 61, ..req("api.example.com", "/v1", "POST") };
    assert_eq!(subject(check(&token, &key, &late)), "expiry");
    let ambiguous = Request { path: None, ..req("api.example.com", "/v1", "POST") };
    assert_eq!(subject(check(&token, &key, &ambiguous)), "path", "a path servers read differently");
    let overridden = Request { method: None, ..req("api.example.com", "/v1", "POST") };
    assert_eq!(subject(check(&token, &key, &overridden)), "method");
    let message = check(&token, &key, &req("api.example.com", "/v2", "POST")).unwrap_err().to_string();
    assert!(message.starts_with("path: ") && message.contains("block 0"), "{message}");
}

/// No leeway: valid through the second it names, refused the second after. latchkey's
/// own clock is the only one that counts (minted and checked by the same key holder).
#[test]
fn expiry_is_exact_to_the_second() {
    let key = root();
    let token = mint(&key, "api", &Restriction { not_after: Some(NOW), ..Default::default() }).unwrap();
    let at = |now| check(&token, &key, &Request { now, ..req("h", "/", "GET") });
    assert_eq!(at(NOW), Ok(()));
    assert_eq!(at(NOW + 1).unwrap_err().check(), "expiry");
    assert_eq!(parse(&token, &key.public()).unwrap().expires, Some(NOW));
}

#[test]
fn attenuation_narrows_and_cannot_widen() {
    let key = root();
    let parent = mint(&key, "api", &scoped(&["/v1"], &[], None)).unwrap();
    // An attenuation that names a wider path and another host adds checks: the
    // parent's stay, so nothing outside both is allowed.
    let wider = Restriction {
        hosts: vec![HostRule::parse("evil.example.net").unwrap()],
        paths: vec!["".into()],
        ..Default::default()
    };
    let child = attenuate(&parent, &wider).unwrap();
    assert_eq!(check(&child, &key, &req("evil.example.net", "/v1", "GET")).unwrap_err().check(), "host");
    let refused = check(&child, &key, &req("api.example.com", "/v2", "GET")).unwrap_err();
    assert!(matches!(refused, TokenRefusal::Check { block: 0, subject: "path", .. }), "{refused:?}");
    let narrower = attenuate(&parent, &scoped(&["/v1/messages"], &["POST"], None)).unwrap();
    assert_eq!(check(&narrower, &key, &req("api.example.com", "/v1/messages", "POST")), Ok(()));
    let refused = check(&narrower, &key, &req("api.example.com", "/v1/models", "POST")).unwrap_err();
    assert!(matches!(refused, TokenRefusal::Check { block: 1, subject: "path", .. }), "{refused:?}");
    assert!(attenuate(&parent, &Restriction::default()).is_err(), "an empty attenuation says nothing");
}

/// A block written by hand (as another Biscuit library would) may declare facts: they
/// are its own, and can neither satisfy the minted block's checks nor rename the
/// credential. Such a token takes Biscuit's authorizer (the slow path).
#[test]
fn facts_in_an_attenuation_prove_nothing() {
    let key = root();
    let parent = mint(&key, "api", &scoped(&["/v1"], &[], None)).unwrap();
    let bytes = decode(&parent).unwrap();
    let forged = UnverifiedBiscuit::from(&bytes)
        .unwrap()
        .append(
            BlockBuilder::new()
                .code(r#"credential("admin"); path("/v1"); host("api.example.com"); check if true;"#)
                .unwrap(),
        )
        .unwrap()
        .to_base64()
        .unwrap();
    let v = parse(&forged, &key.public()).unwrap();
    assert!(!v.is_compiled());
    assert_eq!(v.credential, "api");
    assert_eq!(check(&forged, &key, &req("api.example.com", "/v2", "GET")).unwrap_err().check(), "path");
    assert_eq!(check(&forged, &key, &req("api.example.com", "/v1/x", "GET")), Ok(()));
    let admin =
        verify(&forged, &key.public(), &Revoked::default(), &target("admin"), &req("h", "/v1", "GET"));
    assert_eq!(admin.unwrap_err().check(), "credential");
    // A block whose own fact satisfies its own check restricts nothing (Datalog's
    // meaning): such a block must not be read as a plain path check.
    let open = mint(&key, "api", &Restriction::default()).unwrap();
    let bytes = decode(&open).unwrap();
    let self_satisfied = UnverifiedBiscuit::from(&bytes)
        .unwrap()
        .append(BlockBuilder::new().code(r#"path("/v1"); check if path($path), $path == "/v1";"#).unwrap())
        .unwrap()
        .to_base64()
        .unwrap();
    assert!(!parse(&self_satisfied, &key.public()).unwrap().is_compiled());
    assert_eq!(check(&self_satisfied, &key, &req("api.example.com", "/v2", "GET")), Ok(()));
}

#[test]
fn a_token_is_for_its_credential_only() {
    let key = root();
    let token = mint(&key, "openai", &Restriction::default()).unwrap();
    let r = req("api.example.com", "/", "GET");
    let on = |t: Target<'_>| verify(&token, &key.public(), &Revoked::default(), &t, &r).map(|_| ());
    let refused = on(target("anthropic")).unwrap_err();
    assert_eq!(refused, TokenRefusal::WrongCredential { token: "openai".into(), here: "anthropic".into() });
    assert_eq!(on(target("openai")), Ok(()));
    assert_eq!(on(Target { name: "codex", shares_placeholder_with: &["openai".to_string()] }), Ok(()));
}

#[test]
fn revoking_a_token_revokes_what_was_attenuated_from_it() {
    let key = root();
    let parent = mint(&key, "api", &Restriction::default()).unwrap();
    let child = attenuate(&parent, &scoped(&["/v1"], &[], None)).unwrap();
    let r = req("api.example.com", "/v1", "GET");
    let parent_id = inspect(&parent).unwrap().id;
    let child_id = inspect(&child).unwrap().id;
    assert_ne!(parent_id, child_id);
    let revoked = |ids: &[&str]| Revoked(ids.iter().map(|s| s.to_string()).collect());
    let with = |t: &str, rv: &Revoked| verify(t, &key.public(), rv, &target("api"), &r).map(|_| ());
    assert_eq!(with(&child, &revoked(&[&parent_id])).unwrap_err().check(), "revocation");
    assert_eq!(with(&parent, &revoked(&[&child_id])), Ok(()));
    assert_eq!(with(&child, &revoked(&[&child_id])), Err(TokenRefusal::Revoked(child_id.clone())));
}

#[test]
fn damaged_forged_and_foreign_tokens_are_refused() {
    let key = root();
    let token = mint(&key, "api", &scoped(&["/v1"], &[], Some(600))).unwrap();
    let child = attenuate(&token, &scoped(&["/v1/messages"], &[], None)).unwrap();
    let r = req("api.example.com", "/v1/messages", "GET");
    assert_eq!(check(&child, &key, &r), Ok(()));
    // Another root key: "re-signed" with a key the attacker holds.
    let other = root();
    let forged = mint(&other, "api", &Restriction::default()).unwrap();
    assert_eq!(check(&forged, &key, &r).unwrap_err().check(), "signature");
    assert_eq!(check(&token, &other, &r).unwrap_err().check(), "signature", "wrong root");
    // Truncated anywhere.
    for cut in (0..child.len()).step_by(7) {
        assert!(check(&child[..cut], &key, &r).is_err(), "truncated at {cut}");
    }
    // Every byte with one bit flipped.
    let bytes = decode(&child).unwrap();
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 1 << (i % 8);
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&b);
        assert!(check(&text, &key, &r).is_err(), "bit flip in byte {i} accepted");
    }
    // Oversized: refused before it is decoded.
    let big = format!("{child}{}", "A".repeat(MAX_TOKEN_LEN));
    assert_eq!(check(&big, &key, &r), Err(TokenRefusal::TooLarge(big.len())));
    for junk in ["", "Eg", "not a token", "E=====", &"E".repeat(100)] {
        assert!(check(junk, &key, &r).is_err(), "{junk}");
    }
}

#[test]
fn what_looks_like_a_token() {
    let key = root();
    let token = mint(&key, "api", &Restriction::default()).unwrap();
    assert!(looks_like_token(&token));
    assert!(looks_like_token(&token[..80]), "a truncated token is still refused as one");
    for not in [
        "latchkey-anthropic",
        "sk-ant-api03-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "ghp_0123456789abcdef0123456789abcdef0123",
    ] {
        assert!(!looks_like_token(not), "{not}");
    }
}

#[test]
fn durations() {
    assert_eq!(parse_duration("30m"), Ok(1800));
    assert_eq!(parse_duration("45"), Ok(45));
    assert_eq!(parse_duration("1d"), Ok(86400));
    for bad in ["", "m", "5w", "0s", "-1m", "99999999999999999999d"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}

// --- properties ------------------------------------------------------------------------

const HOSTS: [&str; 8] = [
    "api.example.com",
    "example.com",
    "a.example.com",
    "b.a.example.com",
    "badexample.com",
    "example.com.evil.net",
    "evil.example.net",
    "127.0.0.1",
];
const PATHS: [&str; 7] = ["/", "/v1", "/v1/messages", "/v1beta", "/v1/messages/x", "/v2", "/v1/"];
const METHODS: [&str; 4] = ["GET", "POST", "DELETE", "get"];

fn restriction() -> impl Strategy<Value = Restriction> {
    let host = prop::sample::select(vec![
        "api.example.com",
        ".example.com",
        "*.example.com",
        "*.a.example.com",
        "example.com",
        "127.0.0.1",
        "evil.example.net",
    ]);
    let path = prop::sample::select(vec!["", "/v1", "/v1/messages", "/v2", "/v1beta"]);
    let method = prop::sample::select(vec!["GET", "POST", "DELETE"]);
    let agent = prop::sample::select(vec!["claude", "codex"]);
    (
        prop::collection::vec(host, 0..3),
        prop::collection::vec(prop::sample::select(vec![443u16, 8443]), 0..2),
        prop::collection::vec(path, 0..3),
        prop::collection::vec(method, 0..2),
        prop::collection::vec(agent, 0..2),
        prop::option::of(0u64..20),
    )
        .prop_map(|(hosts, ports, paths, methods, agents, ttl)| Restriction {
            hosts: hosts.into_iter().map(|h| HostRule::parse(h).unwrap()).collect(),
            ports,
            paths: paths.into_iter().map(String::from).collect(),
            methods: methods.into_iter().map(String::from).collect(),
            agents: agents.into_iter().map(String::from).collect(),
            not_after: ttl.map(|t| NOW + t),
        })
}

#[derive(Clone, Debug)]
struct Asked {
    host: &'static str,
    port: u16,
    path: Option<&'static str>,
    method: Option<&'static str>,
    agent: Option<&'static str>,
    now: u64,
}

impl Asked {
    fn request(&self) -> Request<'static> {
        Request {
            host: self.host,
            port: self.port,
            path: self.path,
            method: self.method,
            agent: self.agent,
            now: self.now,
        }
    }
}

fn asked() -> impl Strategy<Value = Asked> {
    (
        prop::sample::select(HOSTS.to_vec()),
        prop::sample::select(vec![443u16, 8443, 80]),
        prop::option::weighted(0.9, prop::sample::select(PATHS.to_vec())),
        prop::option::weighted(0.9, prop::sample::select(METHODS.to_vec())),
        prop::option::of(prop::sample::select(vec!["claude", "codex"])),
        0u64..25,
    )
        .prop_map(|(host, port, path, method, agent, t)| Asked {
            host,
            port,
            path,
            method,
            agent,
            now: NOW + t,
        })
}

fn token_of(key: &KeyPair, stack: &[Restriction]) -> String {
    let mut token = mint(key, "api", &stack[0]).unwrap();
    for r in &stack[1..] {
        if !r.is_empty() {
            token = attenuate(&token, r).unwrap();
        }
    }
    token
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A token accepts exactly the requests its restrictions allow: on the compiled
    /// path the proxy uses, and in Biscuit's own authorizer.
    #[test]
    fn acceptance_is_the_scope(stack in prop::collection::vec(restriction(), 1..4),
                               asks in prop::collection::vec(asked(), 1..12)) {
        let key = root();
        let token = token_of(&key, &stack);
        let verified = parse(&token, &key.public()).unwrap();
        prop_assert!(verified.is_compiled());
        let biscuit = Biscuit::from_base64(&token, key.public()).unwrap();
        for a in asks {
            let r = a.request();
            let want = allows(&stack, &r);
            let fast = authorize(&verified, &Revoked::default(), &target("api"), &r).is_ok();
            let slow = run_authorizer(&biscuit, &r);
            prop_assert_eq!(fast, want, "compiled path, {:?} for {:?}", a, stack);
            prop_assert_eq!(slow.is_ok(), want, "authorizer, {:?} for {:?}: {:?}", a, stack, slow);
        }
    }

    /// Whatever block is added, the child never accepts a request its parent refused.
    #[test]
    fn attenuation_never_widens(parent in prop::collection::vec(restriction(), 1..3),
                                extra in restriction(),
                                asks in prop::collection::vec(asked(), 1..12)) {
        prop_assume!(!extra.is_empty());
        let key = root();
        let parent_token = token_of(&key, &parent);
        let child_token = attenuate(&parent_token, &extra).unwrap();
        let (parent_v, child_v) = (parse(&parent_token, &key.public()).unwrap(), parse(&child_token, &key.public()).unwrap());
        let child_b = Biscuit::from_base64(&child_token, key.public()).unwrap();
        for a in asks {
            let r = a.request();
            let ok = |v: &Verified| authorize(v, &Revoked::default(), &target("api"), &r).is_ok();
            if ok(&child_v) || run_authorizer(&child_b, &r).is_ok() {
                prop_assert!(ok(&parent_v), "child accepted {:?}", a);
            }
        }
    }

    /// Random bytes and random text are refused, never a panic.
    #[test]
    fn junk_is_refused(data in prop::collection::vec(any::<u8>(), 0..400)) {
        let key = root();
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&data);
        prop_assert!(check(&text, &key, &req("h", "/", "GET")).is_err());
        let _ = inspect(&text);
        let _ = attenuate(&text, &scoped(&["/v1"], &[], None));
    }
}

/// The fast path and the authorizer agree for a request the compiled checks could get
/// wrong if they were sloppy: the same suffix as a whole label and as part of one.
#[test]
fn suffix_rules_respect_label_boundaries() {
    let key = root();
    let token = mint(
        &key,
        "api",
        &Restriction { hosts: vec![HostRule::parse(".example.com").unwrap()], ..Default::default() },
    )
    .unwrap();
    for (host, ok) in [
        ("example.com", true),
        ("a.example.com", true),
        ("badexample.com", false),
        ("example.com.evil.net", false),
    ] {
        let r = req(host, "/", "GET");
        assert_eq!(check(&token, &key, &r).is_ok(), ok, "{host}");
        assert_eq!(datalog(&token, &key, &r).is_ok(), ok, "{host} (authorizer)");
    }
}
