use super::*;
use base64::Engine;

/// Test values in the bundled formats (made up; none is a real credential).
pub const AWS_ID: &str = "AKIAZ7QWERTY2UIOPLKJ";
pub const AWS_SECRET: &str = "Zx9Qp2Lm7Vb4Nc8Rt1Yw6Ks3Hd5Gf0Ja2Ue7IoPq";

fn samples() -> Vec<(&'static str, String)> {
    let jwt_header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"k1"}"#);
    let jwt_body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"sub":"1234567890"}"#);
    vec![
        ("aws-access-key", format!("AWS_ACCESS_KEY_ID={AWS_ID}\nAWS_SECRET_ACCESS_KEY={AWS_SECRET}\n")),
        ("github-pat", "token ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5 here".into()),
        ("github-pat", format!("github_pat_{}_{}", "A1b2C3d4E5f6G7h8J9k0L1", "m".repeat(59))),
        ("anthropic-key", format!("ANTHROPIC_API_KEY=sk-ant-api03-{}AA", "x7Yq".repeat(23))),
        ("openai-key", format!("sk-proj-{}", "Ab3_cD5-eF7g".repeat(8))),
        ("openai-key", "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".into()),
        ("slack-token", "xoxb-1234567890-9876543210-AbCdEfGhIjKlMnOpQrStUvWx".into()),
        ("stripe-live-key", "sk_live_51HxAbCdEfGhIjKlMnOpQrStUv".into()),
        ("google-api-key", "key=AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q&x".into()),
        (
            "private-key",
            format!(
                "-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----\n",
                "MIIEow".repeat(11)
            ),
        ),
        (
            "gcp-service-account",
            format!(r#"{{"type": "service_account", "private_key_id": "{}"}}"#, "0a1b".repeat(10)),
        ),
        ("jwt", format!("Bearer {jwt_header}.{jwt_body}.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWc")),
    ]
}

fn scanner() -> Scanner {
    Scanner::new(true, vec![]).unwrap()
}

fn ids(s: &Scanner, f: &Findings) -> Vec<String> {
    f.hits.iter().map(|h| s.ids[h.rule].to_string()).collect()
}

#[test]
fn every_bundled_rule_finds_its_sample() {
    let s = scanner();
    for (id, text) in samples() {
        let f = s.scan(text.as_bytes(), None);
        assert_eq!(ids(&s, &f), vec![id.to_string()], "{text}");
    }
}

#[test]
fn every_sample_is_found_inside_a_json_string_too() {
    // Pasted into a prompt: newlines and quotes escaped, read without decoding.
    let s = scanner();
    for (id, text) in samples() {
        let json = serde_json::json!({ "content": format!("look:\n{text}\n") }).to_string();
        let f = s.scan(json.as_bytes(), None);
        assert_eq!(ids(&s, &f), vec![id.to_string()], "{json}");
    }
}

#[test]
fn near_misses_are_not_matches() {
    let s = scanner();
    for text in [
        // AWS's documented example pair, and a key id with no secret near it.
        "AKIAIOSFODNN7EXAMPLE wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "AKIAZ7QWERTY2UIOPLKJ alone",
        "ghp_short",
        "task-ant-api03-not-a-key",
        "xoxb-not-a-real-token-this-will-not-work",
        "sk_test_51HxAbCdEfGhIjKlMnOpQrStUv",
        "-----BEGIN RSA PRIVATE KEY----- (the header alone, in docs)",
        r#"{"private_key_id": "your-key-id"}"#,
        // A JWT without a kid in its header.
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    ] {
        let f = s.scan(text.as_bytes(), None);
        assert!(f.hits.is_empty(), "{text}: {:?}", ids(&s, &f));
    }
}

#[test]
fn encoded_forms_are_found_and_masked_in_place() {
    let s = scanner();
    let env = format!(
        "DATABASE_URL=postgres://localhost/app\nAWS_ACCESS_KEY_ID={AWS_ID}\nAWS_SECRET_ACCESS_KEY={AWS_SECRET}\n"
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(&env);
    let json = serde_json::json!({"messages": [{"role": "user", "content": format!("my .env:\n{env}")}]})
        .to_string();
    let escaped: String = env.chars().map(|c| format!("\\u{:04x}", c as u32)).collect();
    let unicode = format!(r#"{{"content":"{escaped}"}}"#);
    let url = format!("/search?q={}", crate::inject::encode_component(&env));
    for text in [json.clone(), format!(r#"{{"file":"{b64}"}}"#), unicode, url, format!("xx-yy_{b64}")] {
        let f = s.scan(text.as_bytes(), None);
        assert_eq!(ids(&s, &f), vec!["aws-access-key"], "{text}");
        let mut bytes = text.clone().into_bytes();
        mask(&mut bytes, &f.hits.iter().collect::<Vec<_>>());
        let out = String::from_utf8(bytes).unwrap();
        assert_eq!(out.len(), text.len());
        assert!(s.scan(out.as_bytes(), None).hits.is_empty(), "still there: {out}");
        if text.starts_with('{') {
            serde_json::from_str::<serde_json::Value>(&out).expect("still JSON");
        }
    }
    // Masking touches the secret's bytes only.
    let f = s.scan(json.as_bytes(), None);
    let mut bytes = json.clone().into_bytes();
    mask(&mut bytes, &f.hits.iter().collect::<Vec<_>>());
    let out = String::from_utf8(bytes).unwrap();
    assert!(out.contains("AWS_ACCESS_KEY_ID=********************\\nAWS_SECRET_ACCESS_KEY=****"), "{out}");
    // Every length of .env prefix: the run's last quantum is decoded too.
    for pad in 0..3 {
        let text = base64::engine::general_purpose::STANDARD.encode(format!("{}{env}", "x".repeat(pad)));
        assert_eq!(ids(&s, &s.scan(text.as_bytes(), None)), vec!["aws-access-key"], "pad {pad}");
    }
}

#[test]
fn own_secrets_are_counted_in_every_form() {
    let secret = crate::secrets::Secret::new("own-live-secret-0123456789".into());
    let set = Set::new(vec![Arc::new(crate::redact::Redactor::new(&[secret]).unwrap())]).unwrap();
    let s = scanner();
    let b64 = base64::engine::general_purpose::STANDARD.encode("x:own-live-secret-0123456789");
    for text in ["a own-live-secret-0123456789 b", &b64, "q=own%2Dlive-secret-0123456789"] {
        assert!(s.scan(text.as_bytes(), Some(&set)).own >= 1, "{text}");
    }
    assert_eq!(s.scan(b"nothing", Some(&set)).own, 0);
}

#[test]
fn user_rules_literal_and_regex() {
    let raw = |id: &str, regex: Option<&str>, literal: Option<&str>| crate::config::raw::RawDlpRule {
        id: id.into(),
        regex: regex.map(Into::into),
        literal: literal.map(Into::into),
    };
    let user = vec![
        user_rule(&raw("corp-token", Some(r"corp_[0-9a-f]{16}"), None), true).unwrap(),
        user_rule(&raw("codename", None, Some("PROJECT-NIGHTJAR")), true).unwrap(),
    ];
    assert!(user_rule(&raw("jwt", Some("x"), None), true).is_err(), "a bundled id");
    assert!(user_rule(&raw("e", Some("a*"), None), true).is_err(), "matches empty");
    assert!(user_rule(&raw("both", Some("a"), Some("abcd")), true).is_err());
    let s = Scanner::new(true, user).unwrap();
    let f = s.scan(b"corp_0123456789abcdef and PROJECT-NIGHTJAR", None);
    assert_eq!(ids(&s, &f), vec!["codename", "corp-token"]);
}

#[test]
fn a_match_split_across_chunks_is_found_once_and_before_release() {
    let s = scanner();
    let text =
        format!("{}ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5{}", "a ".repeat(20_000), " b".repeat(20_000));
    let bytes = text.as_bytes();
    for cut in [40_010, 40_020, 40_039] {
        let mut st = stream::Stream::new(0, false);
        let mut out = Vec::new();
        let mut found = 0;
        for (i, part) in [&bytes[..cut], &bytes[cut..]].into_iter().enumerate() {
            let last = i == 1;
            let f = st.feed(part, &s, None, last);
            found += f.hits.len();
            mask(st.window(), &f.hits.iter().collect::<Vec<_>>());
            out.extend_from_slice(&st.release(None, last));
        }
        assert_eq!(found, 1, "cut {cut}");
        assert_eq!(out.len(), bytes.len());
        assert!(!String::from_utf8_lossy(&out).contains("ghp_"), "cut {cut}");
    }
}

#[test]
fn base64_runs_are_found_at_any_place() {
    let text = b"short words only, then QUtJQVo3UVdFUlRZMlVJT1BMS0o= and more";
    let runs: Vec<_> = base64_runs(text).collect();
    assert_eq!(runs.len(), 1);
    assert_eq!(&text[runs[0].clone()], b"QUtJQVo3UVdFUlRZMlVJT1BMS0o");
    assert_eq!(base64_runs(&[b'a'; 26]).count(), 0);
    assert_eq!(base64_runs(&[b'a'; 27]).count(), 1);
}

/// False positives (tests/data/dlp-corpus/README.md): ordinary files hold no match of
/// a bundled rule, whole or streamed in pieces. The count printed is the measurement.
#[test]
fn the_corpus_has_no_matches() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/data/dlp-corpus");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.retain(|p| p.file_name().is_some_and(|n| n != "README.md"));
    files.push(root.join("Cargo.lock"));
    assert!(files.len() >= 10, "the corpus is there: {files:?}");
    let s = scanner();
    let (mut bytes, mut matches) = (0usize, Vec::new());
    for path in &files {
        let text = std::fs::read(path).unwrap();
        bytes += text.len();
        let whole = s.scan(&text, None);
        matches.extend(whole.hits.iter().map(|h| format!("{}: {}", path.display(), s.ids[h.rule])));
        let mut st = stream::Stream::new(0, false);
        let pieces: Vec<&[u8]> = text.chunks(4096).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let f = st.feed(piece, &s, None, i + 1 == pieces.len());
            matches
                .extend(f.hits.iter().map(|h| format!("{} (streamed): {}", path.display(), s.ids[h.rule])));
            st.release(None, i + 1 == pieces.len());
        }
    }
    println!("dlp corpus: {} files, {bytes} bytes, {} matches", files.len(), matches.len());
    assert!(matches.is_empty(), "false positives: {matches:#?}");
}

/// The quick pass (`quick.rs`) over a body in pieces finds nothing only where the whole
/// scan finds nothing: every sample and own-secret form, cut at every piece size (so
/// across every seam), is found exactly as in one piece; a clean body is cleared.
#[test]
fn the_quick_pass_clears_only_clean_bodies_at_every_cut() {
    let secret = crate::secrets::Secret::new("own-live-secret-0123456789".into());
    let set = Set::new(vec![Arc::new(crate::redact::Redactor::new(&[secret]).unwrap())]).unwrap();
    let s = scanner();
    let quick = quick::Cache::default().get(&s, Some(&set)).unwrap();
    let filler = "the function returns a value when the body is parsed\\n".repeat(3);
    let mut texts: Vec<String> = samples().into_iter().map(|(_, t)| t).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode("x:own-live-secret-0123456789");
    texts.extend([
        "own-live-secret-0123456789".to_string(),
        b64,
        "q=own%2Dlive-secret-0123456789".into(),
        format!("\\u0041{} {AWS_SECRET}", &AWS_ID[1..]),
        // Nothing in it, but a run long enough to be decoded: the whole scan decides.
        "x".repeat(27),
    ]);
    for text in &texts {
        let body = format!("{filler}\n{text}\n{filler}");
        let whole = s.scan(body.as_bytes(), Some(&set));
        assert!(!whole.is_empty() || text.starts_with('x'), "{text}");
        for size in 1..=70 {
            let pieces: Vec<bytes::Bytes> =
                body.as_bytes().chunks(size).map(bytes::Bytes::copy_from_slice).collect();
            assert!(!quick.clean(&pieces), "size {size}: {text}");
            let found = s.scan_pieces(&pieces, Some(&set), Some(&quick));
            assert_eq!((found.own, &found.hits), (whole.own, &whole.hits), "size {size}: {text}");
        }
    }
    let clean = bytes::Bytes::from(filler.repeat(40));
    assert!(
        quick.clean(std::slice::from_ref(&clean)) && quick.clean(&[clean.slice(..100), clean.slice(100..)])
    );
}

/// The SIMD byte classes are base64's (either alphabet), `\` + `/` or `u`, and `%`:
/// the vector pass agrees with the plain one on every byte value, in and around runs.
#[test]
fn the_simd_pass_agrees_with_the_plain_one_on_every_byte() {
    for b in 0..=255u8 {
        quick::assert_passes_agree(&[b; 100]);
        for at in 0..100 {
            let mut text = vec![b'a'; 100];
            text[at] = b;
            quick::assert_passes_agree(&text);
            let mut spaced = vec![b' '; 130];
            spaced[at..at + 26].fill(b'Q');
            spaced[at + 26] = b;
            quick::assert_passes_agree(&spaced);
        }
    }
    for text in [&b"\\u0041"[..], b"\\u00", b"\\/", b"\\n", b"%41", b"%4", b"%zz"] {
        for pad in [0, 30, 60, 64, 100] {
            let mut t = vec![b' '; pad];
            t.extend_from_slice(text);
            t.extend(std::iter::repeat_n(b' ', 70));
            quick::assert_passes_agree(&t);
        }
    }
}
