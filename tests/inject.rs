//! Credential injection through the real binary with real clients (curl, Python requests).

mod common;
use common::*;

const ANTHROPIC: &str = r#"
[credentials.anthropic]
header = ["x-api-key", "Authorization: Bearer"]
value = "${ANTHROPIC_API_KEY}"
domains = ["api.anthropic.com"]
"#;

#[test]
fn curl_gets_the_real_key_injected() {
    let up = upstream(true, None);
    let lk = Latchkey::start(Some(&up), ANTHROPIC, &[("ANTHROPIC_API_KEY", "sk-ant-REAL")]);
    let (status, body) =
        lk.curl(&["-H", "x-api-key: latchkey-anthropic", "https://api.anthropic.com/v1/messages"]);
    assert_eq!(status, 200, "{body}\n{}", lk.stderr());
    assert_eq!(echoed(&body, "x-api-key"), ["sk-ant-REAL"]);
    assert!(echoed(&body, "authorization").is_empty());
    assert_eq!(echoed(&body, "host"), ["api.anthropic.com"]);
}

#[test]
fn every_client_copy_is_overridden_in_any_case_and_count() {
    let up = upstream(true, None);
    let lk = Latchkey::start(Some(&up), ANTHROPIC, &[("ANTHROPIC_API_KEY", "sk-ant-REAL")]);
    let (status, body) = lk.curl(&[
        "-H",
        "X-Api-Key: attacker-1",
        "-H",
        "x-api-key: attacker-2",
        "-H",
        "X-API-KEY: attacker-3",
        "https://api.anthropic.com/v1/messages",
    ]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(echoed(&body, "x-api-key"), ["sk-ant-REAL"]);
    // The client chose the Authorization slot: the secret goes there, in that form.
    let (_, body) =
        lk.curl(&["-H", "authorization: Bearer placeholder", "https://api.anthropic.com/v1/messages"]);
    assert_eq!(echoed(&body, "authorization"), ["Bearer sk-ant-REAL"]);
    assert!(echoed(&body, "x-api-key").is_empty(), "exactly one credential header");
    // Both slots filled by the client: the first holding a value is used, the other
    // is removed, so exactly one credential header leaves.
    let (_, body) = lk.curl(&[
        "-H",
        "x-api-key: attacker",
        "-H",
        "Authorization: Bearer attacker-2",
        "https://api.anthropic.com/v1/messages",
    ]);
    assert_eq!(echoed(&body, "x-api-key"), ["sk-ant-REAL"]);
    assert!(echoed(&body, "authorization").is_empty(), "{body}");
    // A placeholder elsewhere (another header, the body, the path) is never replaced.
    let (_, body) = lk.curl(&[
        "-H",
        "x-other: latchkey-anthropic",
        "--data",
        "latchkey-anthropic",
        "https://api.anthropic.com/latchkey-anthropic",
    ]);
    let j = json(&body);
    assert_eq!(echoed(&body, "x-other"), ["latchkey-anthropic"]);
    assert_eq!(j["body"], "latchkey-anthropic");
    assert_eq!(j["path"], "/latchkey-anthropic");
}

#[test]
fn bearer_basic_and_query_auth_types() {
    let up = upstream(true, None);
    let cfg = r#"
[credentials.openai]
auth_type = "bearer"
value = "${OPENAI_API_KEY}"
domains = ["api.openai.com"]

[credentials.git]
auth_type = "basic"
username = "x-access-token"
password = "${GITHUB_TOKEN}"
domains = ["github.com"]

[credentials.maps]
auth_type = "query"
param = "key"
value_file = "SECRET_FILE"
domains = ["api.example.com"]

[credentials.cmd]
header = "X-Token"
value_command = ["printf", "  from-command \n"]
domains = ["other.example.com"]
"#;
    let dir_probe = tempfile::tempdir().unwrap();
    let secret_file = dir_probe.path().join("maps-key");
    std::fs::write(&secret_file, "maps-REAL/+=\n").unwrap();
    set_mode(&secret_file, 0o600);
    let cfg = cfg.replace("SECRET_FILE", secret_file.to_str().unwrap());
    let lk = Latchkey::start(Some(&up), &cfg, &[("OPENAI_API_KEY", "sk-REAL"), ("GITHUB_TOKEN", "ghp_REAL")]);

    let (_, body) = lk.curl(&["-H", "Authorization: Bearer dummy", "https://api.openai.com/v1/models"]);
    assert_eq!(echoed(&body, "authorization"), ["Bearer sk-REAL"]);

    let (_, body) = lk.curl(&["-u", "someone:latchkey-git", "https://github.com/org/repo"]);
    let want = format!("Basic {}", base64_encode("x-access-token:ghp_REAL"));
    assert_eq!(echoed(&body, "authorization"), [want]);

    let (_, body) = lk.curl(&["https://api.example.com/v1/geo?key=dummy&key=again&q=1"]);
    assert_eq!(json(&body)["path"], "/v1/geo?q=1&key=maps-REAL%2F%2B%3D");

    let (_, body) = lk.curl(&["-H", "x-token: nope", "https://other.example.com/"]);
    assert_eq!(echoed(&body, "x-token"), ["from-command"]);
}

fn base64_encode(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn most_specific_credential_wins_and_paths_scope() {
    let up = upstream(true, None);
    let cfg = r#"
[credentials.wide]
header = "X-Key"
value = "wide-secret"
domains = [".example.org"]

[credentials.narrow]
header = "X-Key"
value = "narrow-secret"
domains = ["a.b.example.org"]

[credentials.v1]
header = "X-Key"
value = "v1-secret"
domains = [".example.org"]
paths = ["/v1"]
"#;
    let lk = Latchkey::start(Some(&up), cfg, &[]);
    let (_, body) = lk.curl(&["https://a.b.example.org/x"]);
    assert_eq!(echoed(&body, "x-key"), ["narrow-secret"], "exact beats suffix");
    let (_, body) = lk.curl(&["https://example.org/x"]);
    assert_eq!(echoed(&body, "x-key"), ["wide-secret"]);
    let (_, body) = lk.curl(&["https://example.org/v1/models"]);
    assert_eq!(echoed(&body, "x-key"), ["v1-secret"], "a path prefix beats no path");
    let (_, body) = lk.curl(&["https://example.org/v1beta"]);
    assert_eq!(echoed(&body, "x-key"), ["wide-secret"], "prefixes match whole segments");
    let (_, body) = lk.curl(&["--path-as-is", "https://example.org/v1/../admin"]);
    assert_eq!(echoed(&body, "x-key"), ["wide-secret"], "dot segments resolve before matching");
}

#[test]
fn inactive_credentials_pass_without_injection() {
    let up = upstream(true, None);
    let cfg = r#"
[credentials.anthropic]
header = "x-api-key"
value = "${ANTHROPIC_API_KEY}"
domains = ["api.anthropic.com"]

[credentials.broken]
header = "x-token"
value_command = ["false"]
domains = ["api.example.com"]
"#;
    let lk = Latchkey::start(Some(&up), cfg, &[]);
    // Inactive: the host needs nothing, so latchkey tunnels it blind and the client
    // meets the upstream's own certificate (a private test CA, hence -k).
    let out = std::process::Command::new("curl")
        .args(["-sS", "-k", "-x", &lk.proxy_url(), "-H", "x-api-key: mine", "https://api.anthropic.com/"])
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(echoed(&body, "x-api-key"), ["mine"], "passes untouched");
    assert!(lk.stderr().contains("credential anthropic inactive"), "{}", lk.stderr());
    // Failed source: 502, never forwarded without it.
    let before = up.count();
    let (status, body) = lk.curl(&["https://api.example.com/"]);
    assert_eq!(status, 502, "{body}");
    assert!(body.starts_with("latchkey: credential broken"), "{body}");
    assert_eq!(up.count(), before);
}

#[test]
fn zero_config_providers_apply_from_the_environment() {
    let up = upstream(true, None);
    // No [credentials] at all: the built-in table applies.
    let lk = Latchkey::start(
        Some(&up),
        "",
        &[("ANTHROPIC_API_KEY", "sk-ant-REAL"), ("GH_TOKEN", "ghp_REAL"), ("OPENAI_API_KEY", "sk-oa-REAL")],
    );
    let (_, body) =
        lk.curl(&["-H", "x-api-key: latchkey-anthropic", "https://api.anthropic.com/v1/messages"]);
    assert_eq!(echoed(&body, "x-api-key"), ["sk-ant-REAL"]);
    let (_, body) =
        lk.curl(&["-H", "Authorization: Bearer latchkey-anthropic", "https://api.anthropic.com/v1/messages"]);
    assert_eq!(echoed(&body, "authorization"), ["Bearer sk-ant-REAL"]);
    let (_, body) = lk.curl(&["https://api.openai.com/v1/models"]);
    assert_eq!(echoed(&body, "authorization"), ["Bearer sk-oa-REAL"]);
    let (_, body) = lk.curl(&["https://api.github.com/user"]);
    assert_eq!(echoed(&body, "authorization"), ["Bearer ghp_REAL"]);
    let (_, body) = lk.curl(&["https://raw.githubusercontent.com/o/r/main/README.md"]);
    assert_eq!(echoed(&body, "authorization"), ["Bearer ghp_REAL"]);
    let (_, body) = lk.curl(&["https://github.com/org/repo.git/info/refs"]);
    assert_eq!(
        echoed(&body, "authorization"),
        [format!("Basic {}", base64_encode("x-access-token:ghp_REAL"))]
    );
}

#[test]
fn python_requests_through_latchkey() {
    let up = upstream(true, None);
    let lk = Latchkey::start(Some(&up), ANTHROPIC, &[("ANTHROPIC_API_KEY", "sk-ant-REAL")]);
    let script = r#"
import os, requests, json
r = requests.post("https://api.anthropic.com/v1/messages",
                  headers={"x-api-key": os.environ["ANTHROPIC_API_KEY"]}, json={"model": "m"})
print(r.status_code)
print(r.text)
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("HOME", lk.dir.path())
        .env("HTTPS_PROXY", lk.proxy_url())
        .env("REQUESTS_CA_BUNDLE", lk.bundle())
        .env("ANTHROPIC_API_KEY", "latchkey-anthropic")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let (status, body) = text.split_once('\n').unwrap();
    assert_eq!(status, "200");
    assert_eq!(echoed(body.trim(), "x-api-key"), ["sk-ant-REAL"]);
    assert_eq!(json(body.trim())["body"], r#"{"model": "m"}"#);
}

#[test]
fn require_placeholder_refuses_requests_without_it() {
    let up = upstream(true, None);
    let cfg = r#"
[credentials.strict]
header = "x-api-key"
value = "strict-secret"
domains = ["api.example.com"]
require_placeholder = true
placeholder = "ph-strict"

[credentials.other]
header = "x-api-key"
value = "other-secret"
domains = ["other.example.com"]
placeholder = "ph-other"
"#;
    let lk = Latchkey::start(Some(&up), cfg, &[]);
    let (status, body) = lk.curl(&["-H", "x-api-key: ph-strict", "https://api.example.com/"]);
    assert_eq!(status, 200);
    assert_eq!(echoed(&body, "x-api-key"), ["strict-secret"]);
    let before = up.count();
    let (status, body) = lk.curl(&["-H", "x-api-key: ph-other", "https://api.example.com/"]);
    assert_eq!(status, 403, "another credential's placeholder is not laundered: {body}");
    let (status, _) = lk.curl(&["https://api.example.com/"]);
    assert_eq!(status, 403);
    assert_eq!(up.count(), before);
}

#[test]
fn set_cookie_dropped_on_credentialed_responses_and_origin_not_injected() {
    let up = upstream(true, None);
    let lk = Latchkey::start(Some(&up), ANTHROPIC, &[("ANTHROPIC_API_KEY", "sk-ant-REAL")]);
    let out = std::process::Command::new("curl")
        .args(["-sS", "-D", "-", "-x", &lk.proxy_url(), "--cacert"])
        .arg(lk.bundle())
        .arg("https://api.anthropic.com/cookie")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(!text.contains("set-cookie"), "{text}");
    let (_, body) = lk.curl(&["-H", "Origin: https://evil.example", "https://api.anthropic.com/v1/messages"]);
    assert!(echoed(&body, "x-api-key").is_empty(), "a browser origin does not get the key");
}

#[test]
fn the_seed_config_behaves_as_it_describes() {
    let up = upstream(true, None);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // The seed's config.toml, unchanged apart from the port and paths, plus test routing.
    let seed = include_str!("data/seed-config.toml")
        .replace("port = 8080", &format!("port = {port}\nca_dir = \"{}/ca\"", dir.path().display()))
        .replace("~/.config/clauderon/proxy.log", &format!("{}/proxy.log", dir.path().display()));
    let routing = write_config(dir.path(), port, Some(up.addr), "");
    let routing = std::fs::read_to_string(routing).unwrap();
    let upstream_part = &routing[routing.find("[upstream]").unwrap()..];
    let path = dir.path().join("seed.toml");
    std::fs::write(&path, format!("{seed}\n{upstream_part}")).unwrap();
    set_mode(&path, 0o600);
    let lk = Latchkey::spawn(
        dir,
        port,
        path,
        &[("ANTHROPIC_API_KEY", "sk-ant-SEED"), ("GITHUB_TOKEN", "ghp_SEED")],
    );
    // What the upstream received (the seed's default redact_responses masks the echo).
    let last = |header: &str| up.requests().last().unwrap().header_all(header);
    let (_, body) = lk.curl(&["https://api.anthropic.com/v1/messages"]);
    assert_eq!(last("x-api-key"), ["sk-ant-SEED"]);
    assert_eq!(echoed(&body, "x-api-key"), ["*".repeat(11)], "and the echo reached the client masked");
    lk.curl(&["https://api.github.com/user"]);
    assert_eq!(last("authorization"), ["Bearer ghp_SEED"]);
    lk.curl(&["https://github.com/org/repo.git/info/refs"]);
    assert_eq!(last("authorization"), [format!("Basic {}", base64_encode("x-access-token:ghp_SEED"))]);
    let (code, _) = lk.curl(&["--data", "DROP TABLE users", "https://api.github.com/graphql"]);
    assert_eq!(code, 403, "blocked_patterns from the seed");
}

#[test]
fn upstream_connections_are_pooled_across_clients() {
    let up = upstream(true, None);
    let lk = Latchkey::start(Some(&up), ANTHROPIC, &[("ANTHROPIC_API_KEY", "sk-ant-REAL")]);
    for _ in 0..5 {
        // A new curl process each time: a new client connection and TLS session.
        let (status, _) = lk.curl(&["https://api.anthropic.com/v1/messages"]);
        assert_eq!(status, 200);
    }
    assert_eq!(up.count(), 5);
    assert_eq!(up.connections.load(std::sync::atomic::Ordering::SeqCst), 1, "one pooled upstream connection");
}

#[test]
fn value_file_rotation_applies_within_a_second() {
    let up = upstream(true, None);
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("token");
    std::fs::write(&file, "first-secret\n").unwrap();
    set_mode(&file, 0o600);
    let cfg = format!(
        "[credentials.rot]\nheader = \"x-token\"\nvalue_file = \"{}\"\ndomains = [\"api.example.com\"]\n\n[credentials.rotbasic]\nauth_type = \"basic\"\nusername = \"bot\"\nvalue_file = \"{}\"\ndomains = [\"other.example.com\"]\n",
        file.display(),
        file.display()
    );
    let lk = Latchkey::start(Some(&up), &cfg, &[]);
    let (_, body) = lk.curl(&["https://api.example.com/"]);
    assert_eq!(echoed(&body, "x-token"), ["first-secret"]);
    // The file is looked at (off the request path) once its last check is a second old.
    let recheck = || std::thread::sleep(std::time::Duration::from_millis(1100));
    // Rotate by rename, as editors and Kubernetes do.
    let tmp = secrets.path().join("token.new");
    std::fs::write(&tmp, "second-secret\n").unwrap();
    set_mode(&tmp, 0o600);
    std::fs::rename(&tmp, &file).unwrap();
    recheck();
    let (_, body) = lk.curl(&["https://api.example.com/"]);
    assert_eq!(echoed(&body, "x-token"), ["second-secret"]);
    let (_, body) = lk.curl(&["https://other.example.com/"]);
    assert_eq!(echoed(&body, "authorization"), [format!("Basic {}", base64_encode("bot:second-secret"))]);
    // In place, same length.
    std::fs::write(&file, "third--secret\n").unwrap();
    recheck();
    let (_, body) = lk.curl(&["https://api.example.com/"]);
    assert_eq!(echoed(&body, "x-token"), ["third--secret"]);
    // Gone: the credential fails closed (502), nothing is forwarded without it.
    std::fs::remove_file(&file).unwrap();
    recheck();
    let before = up.count();
    let (code, body) = lk.curl(&["https://api.example.com/"]);
    assert_eq!(code, 502, "{body}");
    assert_eq!(up.count(), before);
}

#[test]
fn every_builtin_provider_injects_its_documented_scheme() {
    let up = upstream(true, None);
    let env = [
        ("AZURE_OPENAI_API_KEY", "az-REAL"),
        ("GEMINI_API_KEY", "gem-REAL"),
        ("GITLAB_TOKEN", "glpat-REAL"),
        ("HF_TOKEN", "hf-REAL"),
        ("MISTRAL_API_KEY", "mis-REAL"),
        ("GROQ_API_KEY", "groq-REAL"),
        ("OPENROUTER_API_KEY", "or-REAL"),
        ("CURSOR_API_KEY", "cur-REAL"),
        ("PAGERDUTY_TOKEN", "pd-REAL"),
        ("SENTRY_AUTH_TOKEN", "sentry-REAL"),
    ];
    let lk = Latchkey::start(Some(&up), "", &env);
    let cases = [
        (
            "https://myres.openai.azure.com/openai/deployments/d/chat/completions",
            "api-key",
            "az-REAL".to_string(),
        ),
        ("https://generativelanguage.googleapis.com/v1beta/models", "x-goog-api-key", "gem-REAL".into()),
        ("https://gitlab.com/api/v4/user", "private-token", "glpat-REAL".into()),
        (
            "https://gitlab.com/org/repo.git/info/refs",
            "authorization",
            format!("Basic {}", base64_encode("oauth2:glpat-REAL")),
        ),
        ("https://huggingface.co/api/whoami-v2", "authorization", "Bearer hf-REAL".into()),
        ("https://api.mistral.ai/v1/models", "authorization", "Bearer mis-REAL".into()),
        ("https://api.groq.com/openai/v1/models", "authorization", "Bearer groq-REAL".into()),
        ("https://openrouter.ai/api/v1/models", "authorization", "Bearer or-REAL".into()),
        ("https://api2.cursor.sh/v1/x", "authorization", "Bearer cur-REAL".into()),
        ("https://api.pagerduty.com/incidents", "authorization", "Token token=pd-REAL".into()),
        ("https://sentry.io/api/0/projects/", "authorization", "Bearer sentry-REAL".into()),
    ];
    for (url, header, want) in cases {
        let (code, body) = lk.curl(&[url]);
        assert_eq!(code, 200, "{url}: {body}");
        assert_eq!(echoed(&body, header), [want], "{url}");
    }
    // Path-scoped entries leave the rest of their host alone.
    let out = std::process::Command::new("curl")
        .args(["-sS", "-k", "-x", &lk.proxy_url(), "https://openrouter.ai/"])
        .output()
        .unwrap();
    assert!(echoed(&String::from_utf8_lossy(&out.stdout), "authorization").is_empty());
}

const CLUSTERS: &str = r#"
[credentials.clusters]
header = "Authorization: Bearer"
value = "${K8S_TOKEN_{cluster}}"
domains = ['~^(?P<cluster>[a-z]+)\.k8s\.example\.com$:6443']
"#;

/// `[upstream.resolve]` lines sending every test cluster's :6443 to `up`, then `rest`.
fn clusters_config(up: &Upstream, log: &std::path::Path, rest: &str) -> String {
    let a = up.addr;
    format!(
        "[proxy.logging]\nlog_requests = true\nlog_file = \"{}\"\n#END-PROXY\n\
         \"prod.k8s.example.com:6443\" = \"{a}\"\n\"staging.k8s.example.com:6443\" = \"{a}\"\n\
         \"dev.k8s.example.com:6443\" = \"{a}\"\n{rest}",
        log.display()
    )
}

/// The request log's records for `host`, once one has been written.
fn logged(log: &std::path::Path, host: &str) -> Vec<serde_json::Value> {
    for _ in 0..100 {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let records: Vec<serde_json::Value> =
            text.lines().map(json).filter(|r| r["host"] == host && r["method"] != "CONNECT").collect();
        if !records.is_empty() {
            return records;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("no log record for {host}");
}

#[test]
fn regex_captures_pick_one_token_per_cluster() {
    let up = upstream(true, None);
    let log = tempfile::tempdir().unwrap();
    let log = log.path().join("requests.log");
    let env = [("K8S_TOKEN_PROD", "prod-REAL"), ("K8S_TOKEN_STAGING", "staging-REAL")];
    let lk = Latchkey::start(Some(&up), &clusters_config(&up, &log, CLUSTERS), &env);
    let (_, body) = lk.curl(&["https://prod.k8s.example.com:6443/api/v1/pods"]);
    assert_eq!(echoed(&body, "authorization"), ["Bearer prod-REAL"]);
    let (_, body) = lk.curl(&["https://staging.k8s.example.com:6443/api/v1/pods"]);
    assert_eq!(echoed(&body, "authorization"), ["Bearer staging-REAL"]);
    // A cluster without a variable is not this credential's host (SPEC 5): it passes
    // without a credential, never with another cluster's token.
    let (code, body) = lk.curl(&["https://dev.k8s.example.com:6443/api/v1/pods"]);
    assert_eq!(code, 200, "{body}");
    assert!(echoed(&body, "authorization").is_empty(), "{body}");
    let record = &logged(&log, "dev.k8s.example.com")[0];
    assert_eq!(record["decision"], "passed", "{record}");
    assert!(record["reason"].as_str().unwrap().contains("K8S_TOKEN_DEV is not set"), "{record}");
    let o = lk.cli(&["check"], &env);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains("K8S_TOKEN_PROD, K8S_TOKEN_STAGING") && !t.contains("prod-REAL"), "{t}");
    let o = lk.cli(&["explain", "https://dev.k8s.example.com:6443/api"], &env);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.starts_with("pass: ") && t.contains("K8S_TOKEN_DEV is not set"), "{t}");
}

#[test]
fn a_cluster_without_a_variable_goes_to_the_next_credential() {
    let up = upstream(true, None);
    let log = tempfile::tempdir().unwrap();
    let log = log.path().join("requests.log");
    // Declared first: it loses the regex tie wherever `clusters` applies.
    let fallback = r#"
[credentials.fallback]
header = "X-Fallback"
value = "fallback-REAL"
domains = ['~^[a-z]+\.k8s\.example\.com$:6443']
"#;
    let cfg = clusters_config(&up, &log, &format!("{fallback}{CLUSTERS}"));
    let lk = Latchkey::start(Some(&up), &cfg, &[("K8S_TOKEN_PROD", "prod-REAL")]);
    let (_, body) = lk.curl(&["https://prod.k8s.example.com:6443/api"]);
    assert_eq!(echoed(&body, "authorization"), ["Bearer prod-REAL"]);
    assert!(echoed(&body, "x-fallback").is_empty());
    let (code, body) = lk.curl(&["https://dev.k8s.example.com:6443/api"]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(echoed(&body, "x-fallback"), ["fallback-REAL"]);
    assert!(echoed(&body, "authorization").is_empty(), "never prod's token: {body}");
}

#[test]
fn value_command_output_is_renewed_after_its_ttl() {
    let up = upstream(true, None);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vault");
    std::fs::write(&file, "cmd-secret-1").unwrap();
    let cfg = format!(
        "[credentials.vault]\nheader = \"x-token\"\nvalue_command = [\"cat\", \"{}\"]\nvalue_command_ttl = 3\ndomains = [\"api.example.com\"]\n",
        file.display()
    );
    let lk = Latchkey::start(Some(&up), &cfg, &[]);
    let get = || lk.curl(&["https://api.example.com/"]);
    // A 3 s TTL: with 1 s, two curls on a loaded 2-core machine were sometimes more than
    // a TTL apart and the "cached" check failed although latchkey was right.
    let first = std::time::Instant::now();
    assert_eq!(echoed(&get().1, "x-token"), ["cmd-secret-1"]);
    std::fs::write(&file, "cmd-secret-2").unwrap();
    let cached = echoed(&get().1, "x-token");
    assert!(
        first.elapsed() < std::time::Duration::from_secs(3),
        "the machine is too slow for this test's TTL"
    );
    assert_eq!(cached, ["cmd-secret-1"], "within the TTL: the cached output");
    std::thread::sleep(std::time::Duration::from_millis(3100));
    assert_eq!(echoed(&get().1, "x-token"), ["cmd-secret-2"], "after the TTL: the command ran again");
    std::fs::remove_file(&file).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(3100));
    let before = up.count();
    let (code, body) = get();
    assert_eq!(code, 502, "a failing command never leaves a stale value in use: {body}");
    assert_eq!(up.count(), before);
}

#[test]
fn the_secrets_directory_convention_backs_unset_variables() {
    let up = upstream(true, None);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, Some(up.addr), "");
    // HOME is the test directory: ~/.config/secrets/ as in seed 001.
    let secrets = dir.path().join(".config/secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    for (name, value) in [("anthropic_key", "sk-ant-FROMFILE\n"), ("github_token", "ghp_FROMFILE\n")] {
        std::fs::write(secrets.join(name), value).unwrap();
        set_mode(&secrets.join(name), 0o600);
    }
    let lk = Latchkey::spawn(dir, port, config, &[]);
    let (_, body) = lk.curl(&["https://api.anthropic.com/v1/messages"]);
    assert_eq!(echoed(&body, "x-api-key"), ["sk-ant-FROMFILE"]);
    let (_, body) = lk.curl(&["https://api.github.com/user"]);
    assert_eq!(echoed(&body, "authorization"), ["Bearer ghp_FROMFILE"]);
}

/// The built-in GitHub provider stays off GitHub's credential-minting endpoints
/// (`except_paths`), however the path is written; the rest of the API gets the token.
/// The request passes without it (logged `passed`), or gets 403 when the credential
/// requires its placeholder.
#[test]
fn except_paths_keep_credentials_off_minting_endpoints() {
    let up = upstream(true, None);
    let log = tempfile::tempdir().unwrap().keep().join("requests.log");
    let cfg = format!("[proxy.logging]\nlog_requests = true\nlog_file = \"{}\"\n#END-PROXY\n", log.display());
    let lk = Latchkey::start(Some(&up), &cfg, &[("GH_TOKEN", "ghp_REAL"), ("GITLAB_TOKEN", "glpat-REAL")]);
    let post = |url: &str| lk.curl(&["-X", "POST", "-H", "Authorization: Bearer latchkey-github", url]);
    for path in [
        "/user/keys",
        "/user/gpg_keys",
        "/repos/octo/hello/keys",
        "/app/installations/42/access_tokens",
        "/authorizations",
        "/repos/octo/hello/actions/runners/registration-token",
        "/orgs/octo/actions/runners/registration-token",
        // Written the ways servers normalise away.
        "/user//keys/",
        "/USER/Keys",
        "/user/%6beys",
        "/user/keys;x=1",
        "/repos/octo/x/../hello/keys",
    ] {
        let (code, body) = post(&format!("https://api.github.com{path}"));
        assert_eq!(code, 200, "{path}: {body}");
        assert_eq!(echoed(&body, "authorization"), ["Bearer latchkey-github"], "{path}: placeholder only");
    }
    for path in ["/user", "/user/keys/7", "/repos/octo/hello/branches/feature%2Fkeys"] {
        let (_, body) = lk.curl(&[&format!("https://api.github.com{path}")]);
        assert_eq!(echoed(&body, "authorization"), ["Bearer ghp_REAL"], "{path}");
    }
    // GitLab: the API credential's except_paths also keep the git one (basic) off.
    let (_, body) = lk.curl(&["-X", "POST", "https://gitlab.com/api/v4/user/personal_access_tokens"]);
    assert!(echoed(&body, "authorization").is_empty() && echoed(&body, "private-token").is_empty(), "{body}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let passed = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(json)
        .find(|r| r["path"] == "/user/keys")
        .expect("a log line for /user/keys");
    assert_eq!(passed["decision"], "passed", "{passed}");
    assert!(passed["reason"].as_str().unwrap().contains("except_paths"), "{passed}");
    // Nothing to warn about in an unmodified provider table.
    let o = lk.cli(&["check"], &[("GH_TOKEN", "ghp_REAL"), ("GITLAB_TOKEN", "glpat-REAL")]);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(!t.contains("mints new credentials"), "{t}");

    // A credential that requires its placeholder refuses the path instead.
    let cfg = "[credentials.gh]\nauth_type = \"bearer\"\nvalue = \"${GH_TOKEN}\"\ndomains = [\"api.github.com\"]\nrequire_placeholder = true\nexcept_paths = [\"/user/keys\", \"/repos/*/*/keys\"]\n";
    let lk = Latchkey::start(Some(&up), cfg, &[("GH_TOKEN", "ghp_REAL")]);
    let before = up.count();
    let (code, body) = lk.curl(&[
        "-X",
        "POST",
        "-H",
        "Authorization: Bearer latchkey-gh",
        "https://api.github.com/repos/a/b/keys",
    ]);
    assert_eq!(code, 403, "{body}");
    assert!(body.starts_with("latchkey: credential gh is never sent to this path"), "{body}");
    assert_eq!(up.count(), before);
    let (_, body) = lk.curl(&["-H", "Authorization: Bearer latchkey-gh", "https://api.github.com/user"]);
    assert_eq!(echoed(&body, "authorization"), ["Bearer ghp_REAL"]);
    let o = lk.cli(&["check"], &[("GH_TOKEN", "ghp_REAL")]);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.contains("credential gh covers api.github.com/user/gpg_keys"),
        "a user rule without it warns: {t}"
    );
}
