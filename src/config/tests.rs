use super::*;

fn env(k: &str) -> Option<String> {
    match k {
        "ANTHROPIC_API_KEY" => Some("sk-ant-REAL".into()),
        "GITHUB_TOKEN" => Some("ghp_REAL".into()),
        _ => None,
    }
}

fn compile_str(src: &str) -> Result<Config, ConfigError> {
    compile(src, Some(Path::new("/etc/latchkey.toml")), &env, &[])
}

fn err(src: &str) -> String {
    compile_str(src).unwrap_err().to_string()
}

#[test]
fn seed_config_loads() {
    let src = include_str!("../../tests/data/seed-config.toml");
    let c = compile_str(src).unwrap();
    assert_eq!(c.proxy.listen.port(), 8080);
    assert_eq!(c.proxy.timeout, Duration::from_secs(30));
    let names: Vec<&str> = c.credentials.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["anthropic", "github", "github_basic"]);
    assert_eq!(c.policy.filters.blocked.len(), 2);
    assert_eq!(c.credentials[1].placeholder, c.credentials[2].placeholder, "shared GITHUB_TOKEN placeholder");
    assert_eq!(c.credentials[0].env, ["ANTHROPIC_API_KEY"]);
}

#[test]
fn unknown_key_has_line_and_suggestion() {
    let e = err("[proxy]\nport = 1\n\n[proxy.filters]\nalowlist_only = true\n");
    assert!(e.starts_with("/etc/latchkey.toml:5:1: proxy.filters.alowlist_only: unknown key"), "{e}");
    assert!(e.contains("did you mean `allowlist_only`"), "{e}");
}

/// A syntax error names the key whose statement it is in, not just the table.
#[test]
fn syntax_errors_name_the_key() {
    let src = "[proxy]\nport = 3128\n\n# keys\n\n[credentials.anthropic]\nheader = \"x-api-key\"\nvalue = \"${ANTHROPIC_API_KEY\ndomains = [\"api.anthropic.com\"]\n";
    let e = err(src);
    assert!(e.starts_with("/etc/latchkey.toml:8:29: credentials.anthropic.value: "), "{e}");
    let e = err("[credentials.a]\nheader = \"k\"\ndomains = [\"a.com\"\npaths = 3\n");
    assert!(e.contains(": credentials.a.domains: "), "{e}");
    let e = err("[credentials.a]\nheader = \"k\"\nvalue = v\n");
    assert!(e.starts_with("/etc/latchkey.toml:3:9: credentials.a.value: "), "{e}");
}

#[test]
fn semantic_errors_point_at_the_key() {
    let e = err("[credentials.x]\nheader = \"x-key\"\nvalue = \"v\"\ndomains = [\"*\"]\n");
    assert!(e.starts_with("/etc/latchkey.toml:4:1: credentials.x.domains: "), "{e}");
    let e = err("[credentials.x]\nheader = \"x-key\"\nvalue = \"v\"\ndomains = [\"~.*\"]\n");
    assert!(e.contains("matches every host"), "{e}");
    let e = err("[credentials.x]\nheader = \"x-key\"\nvalue = \"v\"\ndomains = []\n");
    assert!(e.contains("at least one host"), "{e}");
    let e = err("[credentials.x]\nauth_type = \"nope\"\nvalue = \"v\"\ndomains = [\"a.com\"]\n");
    assert!(e.contains(":2:1: credentials.x.auth_type: "), "{e}");
    let e = err("[proxy]\nbind = \"0.0.0.0\"\n");
    assert!(e.contains(": proxy.bind: ") && e.contains("allowed_clients"), "{e}");
    assert!(compile_str("[proxy]\nbind = \"0.0.0.0\"\nallowed_clients = [\"10.0.0.0/8\"]\n").is_ok());
    let e = err("[proxy]\nport = \"x\"\n");
    assert!(e.contains(":2:8: proxy.port: "), "{e}");
}

#[test]
fn builtins_apply_without_credentials() {
    let c = compile_str("").unwrap();
    let active: Vec<&str> = c
        .policy
        .credentials
        .iter()
        .filter(|r| r.state == CredState::Active)
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(active, ["anthropic", "github", "github_git", "github_raw"]);
    let c =
        compile_str("[credentials.a]\nheader = \"k\"\nvalue = \"${NOPE}\"\ndomains = [\"a.com\"]\n").unwrap();
    assert_eq!(c.credentials.len(), 1, "a [credentials] section replaces the built-ins");
    assert!(matches!(c.policy.credentials[0].state, CredState::Inactive(_)));
    let openai = compile_str("").unwrap();
    let o = openai.credentials.iter().find(|c| c.name == "openai").unwrap();
    assert_eq!(o.env, ["OPENAI_API_KEY", "CODEX_API_KEY"]);
}

#[test]
fn debug_has_no_secrets() {
    let c = compile_str(include_str!("../../tests/data/seed-config.toml")).unwrap();
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("sk-ant-REAL") && !dbg.contains("ghp_REAL"));
    assert!(!c.secret_values().is_empty());
}
