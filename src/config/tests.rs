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

fn compile_env(src: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let lookup = move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).or_else(|| env(k));
    compile(src, Some(Path::new("/etc/latchkey.toml")), &lookup, &[])
}

/// `LATCHKEY_*` variables override the file's keys (containers configure by environment).
#[test]
fn environment_overrides_the_file() {
    let src = "[proxy]\nport = 1\nca_dir = \"/file/ca\"\nallowed_clients = [\"10.0.0.1\"]\n";
    let c = compile_env(
        src,
        &[
            ("LATCHKEY_LISTEN", "0.0.0.0:3128"),
            ("LATCHKEY_CA_DIR", "/data/ca"),
            ("LATCHKEY_ALLOWED_CLIENTS", "10.89.0.0/24, 192.0.2.7"),
            ("LATCHKEY_ALLOWED_DOMAINS", ".anthropic.com,github.com"),
            ("LATCHKEY_ADMIN_LISTEN", "0.0.0.0:9090"),
            ("LATCHKEY_LOG_REQUESTS", "yes"),
        ],
    )
    .unwrap();
    assert_eq!(c.proxy.listen, "0.0.0.0:3128".parse().unwrap());
    assert_eq!(c.proxy.ca_dir, Path::new("/data/ca"));
    let clients: Vec<String> = c.proxy.allowed_clients.iter().map(|n| n.to_string()).collect();
    assert_eq!(clients, ["10.89.0.0/24", "192.0.2.7/32"]);
    assert!(c.policy.filters.allowlist_only, "an allowlist given by variable is enforced");
    assert_eq!(c.policy.filters.allowed.len(), 2);
    assert_eq!(c.admin, Some("0.0.0.0:9090".parse().unwrap()));
    assert!(c.proxy.log_requests);
    // Without variables, the file's values stand.
    let c = compile_env(src, &[]).unwrap();
    assert_eq!(c.proxy.listen.port(), 1);
    assert_eq!(c.proxy.ca_dir, Path::new("/file/ca"));
    // An empty allowlist variable is no allowlist; LATCHKEY_ALLOWLIST_ONLY has the last word.
    let c = compile_env("", &[("LATCHKEY_ALLOWED_DOMAINS", "")]).unwrap();
    assert!(!c.policy.filters.allowlist_only);
    let c = compile_env("", &[("LATCHKEY_ALLOWED_DOMAINS", "a.com"), ("LATCHKEY_ALLOWLIST_ONLY", "false")])
        .unwrap();
    assert!(!c.policy.filters.allowlist_only);
}

/// A bad value from a variable gets the file's validation, and the error names the variable.
#[test]
fn environment_errors_name_the_variable() {
    let e = compile_env("", &[("LATCHKEY_ALLOWED_CLIENTS", "10.0.0.0/8,nonsense")]).unwrap_err().to_string();
    assert_eq!(
        e,
        "LATCHKEY_ALLOWED_CLIENTS (overrides proxy.allowed_clients): \"nonsense\" is not an IP or CIDR"
    );
    let e = compile_env("", &[("LATCHKEY_LISTEN", "3128")]).unwrap_err().to_string();
    assert!(e.starts_with("LATCHKEY_LISTEN (overrides proxy.bind): \"3128\" is not ip:port"), "{e}");
    // The open-proxy rule applies to an address given by variable, and says which variable.
    let e = compile_env("", &[("LATCHKEY_LISTEN", "0.0.0.0:3128")]).unwrap_err().to_string();
    assert!(e.starts_with("LATCHKEY_LISTEN (overrides proxy.bind): binding to 0.0.0.0"), "{e}");
    let e = compile_env("", &[("LATCHKEY_ALLOWED_DOMAINS", "~(")]).unwrap_err().to_string();
    assert!(
        e.starts_with("LATCHKEY_ALLOWED_DOMAINS (overrides proxy.filters.allowed_domains): \"~(\""),
        "{e}"
    );
    let e = compile_env("", &[("LATCHKEY_PROXY_TLS", "maybe")]).unwrap_err().to_string();
    assert_eq!(
        e,
        "LATCHKEY_PROXY_TLS (overrides proxy.tls): \"maybe\" is not a boolean (true/false, 1/0, yes/no)"
    );
    let e = compile_env("", &[("LATCHKEY_INTERCEPT", "some")]).unwrap_err().to_string();
    assert!(e.starts_with("LATCHKEY_INTERCEPT (overrides proxy.intercept): "), "{e}");
    let e = compile_env("", &[("LATCHKEY_ADMIN_LISTEN", "localhost")]).unwrap_err().to_string();
    assert!(e.starts_with("LATCHKEY_ADMIN_LISTEN (overrides admin.listen): "), "{e}");
    // The same mistake in the file still points at the file.
    let e = err("[proxy]\nallowed_clients = [\"nonsense\"]\n");
    assert!(e.starts_with("/etc/latchkey.toml:2:1: proxy.allowed_clients: "), "{e}");
}

#[test]
fn client_certificate_identities_are_checked() {
    let fp = "AB:".repeat(31) + "AB";
    let agent = format!("[agents.a]\nclient_cert_sha256 = \"{fp}\"\n");
    let e = err(&agent);
    assert!(e.contains("agents.a.client_cert_sha256: ") && e.contains("[proxy] tls = true"), "{e}");
    let c = compile_str(&format!("[proxy]\ntls = true\n{agent}")).unwrap();
    assert_eq!(c.agents[0].client_certs, [[0xab; 32]], "colons and case are accepted");
    assert!(c.agents[0].token.is_none(), "a certificate alone identifies the agent");
    let e = err("[proxy]\ntls = true\n[agents.a]\nclient_cert_sha256 = \"abcd\"\n");
    assert!(e.contains("is not a SHA-256 fingerprint"), "{e}");
    let e = err(&format!("[proxy]\ntls = true\n{agent}[agents.b]\nclient_cert_sha256 = [\"{fp}\"]\n"));
    assert!(
        e.contains("agents.b.client_cert_sha256: the same certificate already identifies agent a"),
        "{e}"
    );
    let e = err("[agents.a]\nallowed_domains = [\"a.com\"]\n");
    assert!(e.contains("agents.a.token: set one of"), "{e}");
}

#[test]
fn transparent_listener_is_checked() {
    let c = compile_str("[proxy]\ntransparent = \"127.0.0.1:3130\"\n").unwrap();
    assert_eq!(c.proxy.transparent, Some("127.0.0.1:3130".parse().unwrap()));
    assert_eq!(compile_str("").unwrap().proxy.transparent, None);
    let e = err("[proxy]\nport = 3128\ntransparent = \"3130\"\n");
    assert!(
        e.starts_with("/etc/latchkey.toml:3:1: proxy.transparent: ") && e.contains("127.0.0.1:3130"),
        "{e}"
    );
    let e = err("[proxy]\ntransparent = \"127.0.0.1:0\"\n");
    assert!(e.contains("proxy.transparent: needs a fixed port"), "{e}");
    let e = err("[proxy]\nport = 3130\ntransparent = \"127.0.0.1:3130\"\n");
    assert!(e.contains("is the proxy port"), "{e}");
    let e = err("[proxy]\ntransparent = \"0.0.0.0:3130\"\n");
    assert!(e.contains("proxy.transparent: ") && e.contains("allowed_clients"), "{e}");
    assert!(
        compile_str("[proxy]\ntransparent = \"0.0.0.0:3130\"\nallowed_clients = [\"10.0.0.0/8\"]\n").is_ok()
    );
    // Redirected connections cannot present Proxy-Authorization: with [agents], one is named.
    let agents = "[agents.coder]\ntoken = \"t-coder\"\n";
    let e = err(&format!("[proxy]\ntransparent = \"127.0.0.1:3130\"\n{agents}"));
    assert!(e.contains("proxy.transparent_agent: [agents] is configured"), "{e}");
    let e =
        err(&format!("[proxy]\ntransparent = \"127.0.0.1:3130\"\ntransparent_agent = \"nope\"\n{agents}"));
    assert!(e.contains("\"nope\" is not an [agents] entry"), "{e}");
    let c = compile_str(&format!(
        "[proxy]\ntransparent = \"127.0.0.1:3130\"\ntransparent_agent = \"coder\"\n{agents}"
    ));
    assert_eq!(c.unwrap().proxy.transparent_agent.as_deref(), Some("coder"));
    let e = err("[proxy]\ntransparent_agent = \"coder\"\n");
    assert!(e.contains("only means something with [proxy] transparent"), "{e}");
}

#[test]
fn a_changed_transparent_listener_needs_a_restart() {
    let a = compile_str("[proxy]\ntransparent = \"127.0.0.1:3130\"\n").unwrap();
    let b = compile_str("[proxy]\ntransparent = \"127.0.0.1:3131\"\n").unwrap();
    let none = compile_str("").unwrap();
    assert_eq!(restart::restart_needed(&a, &b), Some("[proxy] transparent"));
    assert_eq!(restart::restart_needed(&none, &a), Some("[proxy] transparent"));
    assert_eq!(restart::restart_needed(&a, &a), None);
}

/// `[proxy] threads`: 1 to 1,024, absent for one per core; a change needs a restart
/// (the shards are started once).
#[test]
fn proxy_threads_are_checked_and_need_a_restart() {
    let e = err("[proxy]\nport = 1\nthreads = 0\n");
    assert!(e.starts_with("/etc/latchkey.toml:3:1: proxy.threads: 0: expected 1 to 1024"), "{e}");
    let e = err("[proxy]\nthreads = 5000\n");
    assert!(e.contains("proxy.threads: 5000"), "{e}");
    let e = err("[proxy]\nthreads = -1\n");
    assert!(e.contains("threads"), "{e}");
    let one = compile_str("[proxy]\nthreads = 1\n").unwrap();
    let default = compile_str("").unwrap();
    assert_eq!((one.proxy.threads, default.proxy.threads), (Some(1), None));
    assert_eq!(restart::restart_needed(&default, &one), Some("[proxy] threads"));
    assert_eq!(restart::restart_needed(&one, &one), None);
}

/// `[cluster]`: each bad key is named with its line; a good table compiles.
#[test]
fn cluster_table_errors_name_the_key() {
    let e = err("[proxy]\nport = 1\n\n[cluster]\non_store_error = \"open\"\n");
    assert!(e.starts_with("/etc/latchkey.toml:4:1: cluster.redis:"), "{e}");
    let e = err("[cluster]\nredis = \"redis://127.0.0.1\"\non_store_error = \"sometimes\"\n");
    assert!(e.starts_with("/etc/latchkey.toml:3:1: cluster.on_store_error:"), "{e}");
    let e = err("[cluster]\nredis = \"http://127.0.0.1\"\n");
    assert!(e.contains("cluster.redis: not a Redis URL"), "{e}");
    let e = err("[cluster]\nredis = \"redis://h\"\nredis_url = \"x\"\n");
    assert!(e.contains("unknown key `redis_url`"), "{e}");
    let c = compile_str("[cluster]\nredis = \"redis://10.0.0.5:6380/2\"\ntimeout_ms = 50\n").unwrap();
    let cluster = c.cluster.unwrap();
    assert_eq!((cluster.server().as_str(), cluster.timeout), ("10.0.0.5:6380", Duration::from_millis(50)));
    assert!(compile_str("").unwrap().cluster.is_none());
}

/// `LATCHKEY_REDIS` sets up `[cluster]`; a bad value names the variable.
#[test]
fn cluster_from_the_environment() {
    let vars = |redis: &'static str| {
        move |k: &str| match k {
            "LATCHKEY_REDIS" => Some(redis.to_string()),
            "LATCHKEY_ON_STORE_ERROR" => Some("open".to_string()),
            _ => None,
        }
    };
    let c = compile("", None, &vars("redis://:pw@10.1.2.3:6379/0"), &[]).unwrap().cluster.unwrap();
    assert_eq!(
        (c.server().as_str(), c.on_store_error),
        ("10.1.2.3:6379", crate::cluster::OnStoreError::Open)
    );
    let e = compile("", None, &vars("http://x"), &[]).unwrap_err().to_string();
    assert!(e.contains("LATCHKEY_REDIS") && e.contains("not a Redis URL"), "{e}");
}

/// Issue 19's keys: errors name file:line:column and the key, and never repeat a
/// proxy password.
#[test]
fn minted_credentials_keyring_and_proxy_errors_point_at_the_key() {
    let oauth = "[credentials.o]\nauth_type = \"oauth2_client_credentials\"\nclient_id = \"c\"\nclient_secret = \"${S}\"\ndomains = [\"a.com\"]\n";
    let e = err(oauth);
    assert!(e.contains("credentials.o.token_url: required"), "{e}");
    let e = err(&oauth.replace("client_id", "token_url = \"http://auth.a.com/t\"\nclient_id"));
    assert!(e.contains("credentials.o.token_url: ") && e.contains("https://"), "{e}");
    let e = err(&oauth.replace(
        "client_id",
        "token_url = \"https://auth.a.com/t\"\ntoken_endpoint_auth_method = \"jwt\"\nclient_id",
    ));
    assert!(
        e.contains("credentials.o.token_endpoint_auth_method: ") && e.contains("client_secret_post"),
        "{e}"
    );
    let e = err(
        "[credentials.g]\nauth_type = \"github_app\"\ninstallation_id = 1\nvalue = \"x\"\ndomains = [\"github.com\"]\n",
    );
    assert!(e.contains("credentials.g.value: github_app mints its own tokens"), "{e}");
    let e = err(
        "[credentials.g]\nauth_type = \"github_app\"\ninstallation_id = 1\nprivate_key = \"${K}\"\ndomains = [\"github.com\"]\n",
    );
    assert!(e.contains("credentials.g.app_id: required"), "{e}");
    let e =
        err("[credentials.k]\nauth_type = \"bearer\"\nvalue_keyring = \"no-slash\"\ndomains = [\"a.com\"]\n");
    assert!(e.contains("credentials.k.value_keyring: ") && e.contains("SERVICE/ACCOUNT"), "{e}");
    let e = err("[upstream]\nproxy = \"https://u:hunter2@proxy:3128\"\n");
    assert!(
        e.starts_with("/etc/latchkey.toml:") && e.contains("upstream.proxy: must be an http:// URL"),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "{e}");
    let e = err("[upstream]\nproxy = \"http://u:hunter2@proxy\"\n");
    assert!(e.contains("upstream.proxy: ") && e.contains("port") && !e.contains("hunter2"), "{e}");
    let e = err("[upstream]\nno_proxy = [\".corp\"]\n");
    assert!(e.contains("upstream.no_proxy: no_proxy needs proxy"), "{e}");
    let c = compile_str("[upstream]\nproxy = \"http://u:hunter2@proxy.corp:3128\"\nno_proxy = [\".corp\"]\n")
        .unwrap();
    assert!(!format!("{:?}", c.upstream).contains("hunter2"));
}
