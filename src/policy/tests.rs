use super::*;
use proptest::prelude::*;

pub(super) fn rule(name: &str, patterns: &[&str]) -> CredentialRule {
    CredentialRule {
        name: name.into(),
        patterns: patterns.iter().map(|p| Pattern::parse(p).unwrap()).collect(),
        paths: vec![],
        methods: vec![],
        ports: vec![],
        allow_http: false,
        allowed_origins: vec![],
        require_placeholder: false,
        require_token: false,
        shares_placeholder_with: vec![],
        token_slot: String::new(),
        except_paths: vec![],
        state: CredState::Active,
        captures: vec![],
        never_to: vec![],
        vends: None,
        limits: Default::default(),
    }
}

fn dest(s: &str) -> Destination {
    Destination::parse_authority(s, Some(443)).unwrap()
}

fn decide(p: &Policy, d: &str, method: &str, path: &str, tls: bool) -> Decision {
    decide_h(p, d, method, path, tls, &HeaderMap::new())
}

fn decide_h(p: &Policy, d: &str, method: &str, path: &str, tls: bool, h: &HeaderMap) -> Decision {
    let head = RequestHead { method, target: path, path, headers: h, tls };
    p.decide(&Question::now(None, &dest(d), Some(&head)), |_| InSlot::Other)
}

/// The decision for a tunnel to `d`, before a byte of it is read.
fn connect(p: &Policy, d: &str) -> Decision {
    p.decide(&Question::now(None, &dest(d), None), |_| InSlot::Other)
}

fn injected(d: Decision) -> Option<usize> {
    match d {
        Decision::Inject { credential, .. } => Some(credential),
        _ => None,
    }
}

#[test]
fn most_specific_wins() {
    let p = Policy {
        credentials: vec![
            rule("exact", &["api.openai.com"]),
            rule("suffix", &[".openai.com"]),
            rule("longer", &[".api.openai.com"]),
            rule("glob", &["*.openai.com"]),
            rule("regex", &[r"~.*\.openai\.com"]),
        ],
        ..Default::default()
    };
    assert_eq!(injected(decide(&p, "api.openai.com:443", "GET", "/", true)), Some(0));
    assert_eq!(injected(decide(&p, "x.api.openai.com:443", "GET", "/", true)), Some(2));
    assert_eq!(injected(decide(&p, "chat.openai.com:443", "GET", "/", true)), Some(1));
    assert_eq!(injected(decide(&p, "openai.com:443", "GET", "/", true)), Some(1));
    assert_eq!(injected(decide(&p, "evil-openai.com:443", "GET", "/", true)), None);
}

#[test]
fn ties_go_to_last_declared_and_narrowing_wins() {
    let mut gh = rule("github", &["api.github.com", "github.com"]);
    gh.methods = vec![];
    let basic = rule("github_basic", &["github.com"]);
    let p = Policy { credentials: vec![gh, basic], ..Default::default() };
    assert_eq!(injected(decide(&p, "github.com:443", "GET", "/", true)), Some(1));
    assert_eq!(injected(decide(&p, "api.github.com:443", "GET", "/", true)), Some(0));

    let mut post_only = rule("post", &["x.com"]);
    post_only.methods = vec!["POST".into()];
    let p = Policy { credentials: vec![post_only, rule("any", &["x.com"])], ..Default::default() };
    assert_eq!(injected(decide(&p, "x.com:443", "POST", "/", true)), Some(0));
    assert_eq!(injected(decide(&p, "x.com:443", "GET", "/", true)), Some(1));
}

#[test]
fn path_prefixes_are_segment_bounded_and_canonical() {
    let mut v1 = rule("v1", &["x.com"]);
    v1.paths = vec![canonical_prefix("/v1/").unwrap()];
    let p = Policy { credentials: vec![v1], ..Default::default() };
    assert_eq!(injected(decide(&p, "x.com:443", "GET", "/v1", true)), Some(0));
    assert_eq!(injected(decide(&p, "x.com:443", "GET", "/v1/models", true)), Some(0));
    assert_eq!(injected(decide(&p, "x.com:443", "GET", "/v1beta/models", true)), None);
    assert_eq!(injected(decide(&p, "x.com:443", "GET", "/v1/../admin", true)), None);
    assert_eq!(injected(decide(&p, "x.com:443", "GET", "/v1/%2e%2e/admin", true)), None);
    assert_eq!(injected(decide(&p, "x.com:443", "GET", "/v1%2fx", true)), None);
    assert_eq!(injected(decide(&p, "x.com:443", "GET", "/admin/../v1/x", true)), Some(0));
}

#[test]
fn ports_default_to_443_and_80() {
    let p = Policy { credentials: vec![rule("a", &["x.com"])], ..Default::default() };
    assert!(injected(decide(&p, "x.com:443", "GET", "/", true)).is_some());
    assert!(injected(decide(&p, "x.com:8443", "GET", "/", true)).is_none());
    let mut r = rule("a", &["x.com:8443"]);
    let p = Policy { credentials: vec![r.clone()], ..Default::default() };
    assert!(injected(decide(&p, "x.com:8443", "GET", "/", true)).is_some());
    assert!(injected(decide(&p, "x.com:443", "GET", "/", true)).is_none());
    r.ports = vec![9000];
    let p = Policy { credentials: vec![r], ..Default::default() };
    assert!(injected(decide(&p, "x.com:8443", "GET", "/", true)).is_none());
}

#[test]
fn plain_http_refused_unless_allowed() {
    let mut r = rule("a", &["x.com"]);
    let p = Policy { credentials: vec![r.clone()], ..Default::default() };
    match decide(&p, "x.com:80", "GET", "/", false) {
        Decision::Block(refusal) => {
            assert_eq!(refusal.status(), 403);
            assert!(refusal.message.contains("credential a"));
            assert!(refusal.message.contains("https"));
        }
        other => panic!("{other:?}"),
    }
    r.allow_http = true;
    let p = Policy { credentials: vec![r], ..Default::default() };
    assert!(injected(decide(&p, "x.com:80", "GET", "/", false)).is_some());
}

#[test]
fn inactive_passes_failed_blocks() {
    let mut a = rule("a", &["x.com"]);
    a.state = CredState::Inactive("X unset".into());
    let mut b = rule("b", &["y.com"]);
    b.state = CredState::Failed("exit 1".into());
    let p = Policy { credentials: vec![a, b], ..Default::default() };
    assert!(
        matches!(decide(&p, "x.com:443", "GET", "/", true), Decision::Pass { reason: r, .. } if r.contains("inactive"))
    );
    assert!(matches!(decide(&p, "y.com:443", "GET", "/", true), Decision::Block(r) if r.status() == 502));
    assert_eq!(connect(&p, "x.com:443"), Decision::Tunnel);
    assert_eq!(connect(&p, "y.com:443"), Decision::Intercept);
}

#[test]
fn origin_needs_allow_listing() {
    let mut r = rule("a", &["x.com"]);
    let p = Policy { credentials: vec![r.clone()], ..Default::default() };
    let mut h = HeaderMap::new();
    h.insert("origin", "https://evil.example".parse().unwrap());
    assert!(matches!(decide_h(&p, "x.com:443", "GET", "/", true, &h), Decision::Pass { .. }));
    r.allowed_origins = vec!["https://evil.example".into()];
    let p = Policy { credentials: vec![r], ..Default::default() };
    assert!(injected(decide_h(&p, "x.com:443", "GET", "/", true, &h)).is_some());
}

#[test]
fn filters() {
    let p = Policy {
        filters: Filters {
            blocked: vec![Pattern::parse("*.evil.com").unwrap()],
            allowlist_only: true,
            allowed: vec![Pattern::parse("api.good.com").unwrap(), Pattern::parse(".evil.com").unwrap()],
            content: ContentFilter::new(&["rm -rf /".into(), "~DROP\\s+TABLE".into()]).unwrap(),
            ..Default::default()
        },
        ..Default::default()
    };
    let block = |d: &str| matches!(connect(&p, d), Decision::Block(_));
    assert!(block("a.evil.com:443"));
    assert!(block("a.evil.com:8080"), "blocklist covers every port");
    assert!(!block("evil.com:443"), "*. needs a label; allowlisted via .evil.com");
    assert!(block("other.com:443"));
    assert!(!block("api.good.com:443"));
    assert!(block("api.good.com:8443"));
    let r = decide(&p, "api.good.com:443", "GET", "/run?cmd=rm%20-rf%20/", true);
    assert!(matches!(r, Decision::Block(r) if r.token() == "blocked-pattern"));
    let mut h = HeaderMap::new();
    h.insert("x-sql", "DROP   TABLE users".parse().unwrap());
    let r = decide_h(&p, "api.good.com:443", "GET", "/", true, &h);
    assert!(matches!(r, Decision::Block(r) if r.token() == "blocked-pattern"));
}

#[test]
fn a_capture_naming_no_present_variable_does_not_match() {
    let mut r = rule("clusters", &[r"~(?P<cluster>[a-z-]+)\.k8s\.test:6443"]);
    r.captures =
        vec![CaptureRef { prefix: "K8S_TOKEN_".into(), capture: "cluster".into(), suffix: "".into() }];
    let p = Policy {
        credentials: vec![r],
        capture_variables: ["K8S_TOKEN_PROD".to_string()].into_iter().collect(),
        ..Default::default()
    };
    let d = |host: &str| {
        let headers = HeaderMap::new();
        let head = RequestHead { method: "GET", target: "/", path: "/", headers: &headers, tls: true };
        p.decide(&Question::now(None, &dest(host), Some(&head)), |_| InSlot::Other)
    };
    assert_eq!(
        d("prod.k8s.test:6443"),
        Decision::Inject {
            credential: 0,
            captures: vec![("cluster".into(), "prod".into())],
            budgets: Budgets::default(),
            token: None
        }
    );
    assert_eq!(
        d("dev.k8s.test:6443"),
        Decision::Pass {
            reason: "credential clusters does not apply to this host: K8S_TOKEN_DEV is not set".into(),
            budgets: Budgets::default()
        }
    );
    assert!(
        matches!(d("a-b.k8s.test:6443"), Decision::Pass { .. }),
        "a capture outside [A-Za-z0-9_] names nothing"
    );
    assert_eq!(
        connect(&p, "dev.k8s.test:6443"),
        Decision::Intercept,
        "the host is still named: intercepted, logged"
    );
}

#[test]
fn canonical_paths() {
    assert_eq!(canonical_path("/a/./b/../c").unwrap(), "/a/c");
    assert_eq!(canonical_path("/../../x").unwrap(), "/x");
    assert_eq!(canonical_path("/a/..").unwrap(), "/");
    assert!(canonical_path("/a%2Fb").is_none());
    assert!(canonical_path("/a\\b").is_none());
    assert!(canonical_path("a").is_none());
    // Issue 11.3: what nginx (merged slashes), Tomcat/Spring (`;params`) and frameworks
    // that decode twice read as /admin.
    for ambiguous in [
        "/v1//../admin",
        "/v1/..;/admin",
        "/v1/..%3B/admin",
        "/v1/.;x/../admin",
        "/admin;/../v1/x",
        "/v1/%252e%252e/admin",
        "/v1/%25",
        "/v1/%%32e%%32e/admin",
        "/v1/%zz",
        "/v1/%2",
    ] {
        assert!(canonical_path(ambiguous).is_none(), "{ambiguous}");
    }
    // Each on its own is plain: no dot segment to resolve differently.
    assert_eq!(canonical_path("/v1//x").unwrap(), "/v1//x");
    assert_eq!(canonical_path("/v1/x;y").unwrap(), "/v1/x;y");
    assert_eq!(canonical_path("/v1/x%41").unwrap(), "/v1/x%41");
    assert_eq!(canonical_prefix("/v1/").unwrap(), "/v1");
    assert_eq!(canonical_prefix("/").unwrap(), "");
}

#[test]
fn percent_decoding() {
    assert_eq!(percent_decode(b"a%20b%zz%4"), b"a b%zz%4");
}

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?"
}

proptest! {
    /// No host outside a suffix's labels ever matches it.
    #[test]
    fn suffix_never_matches_outside(domain in proptest::collection::vec(label(), 1..4),
                                    host in proptest::collection::vec(label(), 1..6),
                                    glue in "[a-z0-9-]{0,3}") {
        let domain = domain.join(".");
        let Ok(pat) = Pattern::parse(&format!(".{domain}")) else { return Ok(()) };
        let glob = Pattern::parse(&format!("*.{domain}")).unwrap();
        let candidate = format!("{}{glue}{domain}", host.join("."));
        let Ok(h) = Host::parse(&candidate) else { return Ok(()) };
        let name = h.as_domain().unwrap_or("").to_string();
        let inside = name == domain || name.ends_with(&format!(".{domain}"));
        prop_assert_eq!(pat.matches_host(&h).is_some(), inside && !h.is_ip());
        let strictly_inside = name.ends_with(&format!(".{domain}"));
        prop_assert_eq!(glob.matches_host(&h).is_some(), strictly_inside && !h.is_ip());
        // Labels appended after the domain match only when they end inside it again.
        if let Ok(h2) = Host::parse(&format!("{domain}.{}", host.join("."))) {
            let name2 = h2.as_domain().unwrap_or("").to_string();
            let inside2 = name2 == domain || name2.ends_with(&format!(".{domain}"));
            prop_assert_eq!(pat.matches_host(&h2).is_some(), inside2 && !h2.is_ip());
        }
    }

    /// Normalisation is idempotent.
    #[test]
    fn normalisation_idempotent(raw in "[A-Za-z0-9.-]{1,30}\\.?") {
        if let Ok(h) = Host::parse(&raw) {
            let again = Host::parse(h.to_string().trim_matches(|c| c == '[' || c == ']')).unwrap();
            prop_assert_eq!(h, again);
        }
    }
}

/// Small models of what servers do to a request path before routing it (issue 11.3).
mod server {
    /// nginx `merge_slashes`: runs of `/` become one.
    pub fn merge_slashes(p: &str) -> String {
        let mut out = String::new();
        for c in p.chars() {
            if !(c == '/' && out.ends_with('/')) {
                out.push(c);
            }
        }
        out
    }

    /// Tomcat/Spring: each segment loses its `;params`.
    pub fn drop_params(p: &str) -> String {
        p.split('/').map(|s| s.split(';').next().unwrap_or("")).collect::<Vec<_>>().join("/")
    }

    /// Servers that treat everything from the first `;` as parameters of the whole path.
    pub fn cut_at_semicolon(p: &str) -> String {
        p.split(';').next().unwrap_or("").to_string()
    }

    /// One round of percent-decoding (invalid escapes left as they are).
    pub fn decode(p: &str) -> String {
        let b = p.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let hex = |x: Option<&u8>| x.and_then(|c| (*c as char).to_digit(16));
            if b[i] == b'%'
                && let (Some(h), Some(l)) = (hex(b.get(i + 1)), hex(b.get(i + 2)))
            {
                out.push((h * 16 + l) as u8);
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Windows-minded servers: `\` is a separator.
    pub fn backslashes(p: &str) -> String {
        p.replace('\\', "/")
    }

    /// RFC 3986 5.2.4 remove_dot_segments, as written there.
    pub fn resolve(p: &str) -> String {
        let mut input = p.to_string();
        let mut output = String::new();
        let pop = |out: &mut String| out.truncate(out.rfind('/').unwrap_or(0));
        while !input.is_empty() {
            if let Some(rest) = input.strip_prefix("../").or_else(|| input.strip_prefix("./")) {
                input = rest.to_string();
            } else if input.starts_with("/./") || input == "/." {
                input = format!("/{}", &input[input.len().min(3)..]);
            } else if input.starts_with("/../") || input == "/.." {
                input = format!("/{}", &input[input.len().min(4)..]);
                pop(&mut output);
            } else if input == "." || input == ".." {
                input.clear();
            } else {
                let start = usize::from(input.starts_with('/'));
                let end = input[start..].find('/').map(|i| i + start).unwrap_or(input.len());
                output.push_str(&input[..end]);
                input = input[end..].to_string();
            }
        }
        output
    }

    pub const STEPS: [fn(&str) -> String; 6] =
        [merge_slashes, drop_params, cut_at_semicolon, decode, backslashes, resolve];
}

/// Pieces of paths: mostly structure (separators, dot segments, parameters, escapes that
/// decode to something else), less often an escape latchkey rejects on its own.
fn path_piece() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "/", "//", "v1", "admin", "x", ".", "..", ";", ";p", "%3b", "%3B", "%%32e", "%41", "2e", "e", "%2",
        ]),
        1 => prop::sample::select(vec!["%2e", "%2E", "%252e", "%25", "%2f", "\\", "%5c", "%"]),
    ]
}

fn request_path() -> impl Strategy<Value = String> {
    let start = prop::sample::select(vec!["/v1/", "/v1", "/", "/v1//", "/v1/x/", "/admin/", "/v1/..;/"]);
    (start, proptest::collection::vec(path_piece(), 0..7))
        .prop_map(|(s, rest)| format!("{s}{}", rest.concat()))
}

#[test]
fn the_server_models_read_the_issue_paths_as_admin() {
    use server::*;
    assert_eq!(resolve(&merge_slashes("/v1//../admin")), "/admin");
    assert_eq!(resolve(&drop_params("/v1/..;/admin")), "/admin");
    assert_eq!(resolve(&decode(&decode("/v1/%252e%252e/admin"))), "/admin");
    assert_eq!(resolve("/a/b/../../c/./d/.."), "/c/");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// No path that a server normalisation (any sequence of up to three of the models,
    /// dot segments resolved last) maps outside `/v1` ever matches a `/v1` credential.
    #[test]
    fn path_scope_holds_under_every_server_normalisation(path in request_path()) {
        let Some(canonical) = canonical_path(&path) else { return Ok(()) };
        if !path_has_prefix(&canonical, "/v1") {
            return Ok(());
        }
        let mut pipelines: Vec<Vec<usize>> = vec![vec![]];
        for _ in 0..3 {
            let longer: Vec<Vec<usize>> = pipelines
                .iter()
                .filter(|p| p.len() == pipelines.last().map(Vec::len).unwrap_or(0))
                .flat_map(|p| (0..server::STEPS.len()).map(move |s| [p.clone(), vec![s]].concat()))
                .collect();
            pipelines.extend(longer);
        }
        for steps in pipelines {
            let read = steps.iter().fold(path.clone(), |p, s| server::STEPS[*s](&p));
            let read = server::resolve(&read);
            prop_assert!(
                path_has_prefix(&read, "/v1"),
                "{path:?} matches /v1 for latchkey but steps {steps:?} read it as {read:?}"
            );
        }
    }
}

#[test]
fn unlisted_hosts_are_asked_about_and_the_answer_decides() {
    let p = Policy {
        filters: Filters {
            blocked: vec![Pattern::parse("bad.example").unwrap()],
            allowlist_only: true,
            allowed: vec![Pattern::parse("api.good.com").unwrap()],
            on_unlisted: OnUnlisted::Ask,
            ask_timeout: std::time::Duration::from_secs(60),
            ..Default::default()
        },
        ..Default::default()
    };
    let d = dest("new.example:443");
    let ask = |person| p.decide(&Question::now(None, &d, None).answered(person), |_| InSlot::Other);
    assert_eq!(ask(Verdict::Unasked), Decision::Ask);
    assert_eq!(ask(Verdict::Allowed), Decision::Tunnel);
    let Decision::Block(r) = ask(Verdict::Denied) else { panic!("a denied host is refused") };
    assert_eq!((r.status(), r.token()), (403, "not-approved"));
    assert_eq!(
        r.message,
        "new.example is not allowed by the user's egress policy (denied); ask the user to allow it with latchkey approvals or the web view"
    );
    let Decision::Block(r) = ask(Verdict::Unanswered) else { panic!("an unanswered host is refused") };
    assert!(r.message.contains("(no answer in 60 s)"), "{}", r.message);
    // Listed hosts are never asked about; a blocked one is refused, never asked about.
    assert_eq!(connect(&p, "api.good.com:443"), Decision::Tunnel);
    assert!(
        matches!(connect(&p, "bad.example:443"), Decision::Block(r) if r.kind == RefusalKind::BlockedDomain)
    );
    // A request head is asked about too (plain HTTP on the proxy port).
    assert_eq!(decide(&p, "new.example:80", "GET", "/", false), Decision::Ask);
}

#[test]
fn warn_lets_unlisted_hosts_through_and_says_so() {
    let p = Policy {
        filters: Filters {
            allowed: vec![Pattern::parse("api.good.com").unwrap()],
            on_unlisted: OnUnlisted::Warn,
            ..Default::default()
        },
        ..Default::default()
    };
    assert_eq!(connect(&p, "new.example:443"), Decision::Tunnel);
    assert!(p.warned(&dest("new.example:443")));
    assert!(!p.warned(&dest("api.good.com:443")));
}

/// Every method an override claims: each of the three headers, every instance, comma
/// lists, any letter case, and `_method` in the query; nothing from other headers.
#[test]
fn override_methods_reads_every_override_header_and_the_query() {
    let mut headers = HeaderMap::new();
    headers.append("x-http-method", "put".parse().unwrap());
    headers.append("x-other", "TRACE".parse().unwrap());
    headers.append("X-HTTP-Method-Override", "delete, patch".parse().unwrap());
    headers.append("x-method-override", "Trace".parse().unwrap());
    headers.append("x-http-method", " ,options".parse().unwrap());
    let target = "/p?a=1&_method=copy";
    let head = RequestHead { method: "GET", target, path: "/p", headers: &headers, tls: true };
    let mut got = override_methods(&head);
    got.sort();
    assert_eq!(got, ["COPY", "DELETE", "OPTIONS", "PATCH", "PUT", "TRACE"]);
    assert!(is_trace(&head));
    headers.remove("x-method-override");
    let head = RequestHead { method: "GET", target, path: "/p", headers: &headers, tls: true };
    assert!(!is_trace(&head), "x-other is no override");
}
