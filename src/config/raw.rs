//! The config file as written: serde types that mirror the TOML (seed schema plus
//! latchkey's extensions). Unknown keys are errors everywhere.

use indexmap::IndexMap;
use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub proxy: RawProxy,
    #[serde(default)]
    pub upstream: RawUpstream,
    pub admin: Option<RawAdmin>,
    pub telemetry: Option<RawTelemetry>,
    pub credentials: Option<IndexMap<String, Spanned<RawCredential>>>,
    #[serde(default)]
    pub agents: IndexMap<String, Spanned<RawAgent>>,
    #[serde(default)]
    pub jail: RawJail,
    /// `[cluster]`: state shared by replicas (SPEC 12).
    pub cluster: Option<RawCluster>,
}

/// `[cluster]`: where replicas keep the state they share.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawCluster {
    /// `redis://[user:password@]HOST[:PORT][/DB]`, or `${VAR}` holding one.
    pub redis: Option<String>,
    /// `closed` (default): 503 while Redis is unreachable; `open`: per-replica state.
    pub on_store_error: Option<String>,
    /// Each Redis operation's time limit, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Prefix of every key latchkey writes (several deployments can share one Redis).
    pub key_prefix: Option<String>,
}

/// `[jail]`: what `latchkey exec --jail` hides besides latchkey's own secret sources.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawJail {
    /// More paths replaced by empty, read-only ones inside the jail (added to the defaults).
    pub hide: Vec<String>,
}

/// `[agents.NAME]`: a client identity, presented as Proxy-Authorization.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct RawAgent {
    /// The agent's proxy token (`${VAR}` template); or `token_file`.
    pub token: Option<String>,
    pub token_file: Option<String>,
    /// Credentials it may use (default: all).
    pub credentials: Option<Vec<String>>,
    /// Destinations it may reach, within the global policy (default: all the policy allows).
    pub allowed_domains: Vec<String>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_day: Option<u64>,
    /// SHA-256 fingerprints of client certificates that identify this agent on a
    /// `[proxy] tls = true` port (hex, colons allowed).
    pub client_cert_sha256: Option<OneOrMany>,
    /// A PEM CA file: a client certificate it issued identifies this agent.
    pub client_ca: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct RawProxy {
    pub port: u16,
    pub bind: String,
    pub ca_dir: String,
    pub generate_certs: bool,
    pub ca_lifetime: u32,
    pub timeout: u64,
    pub connect_timeout: u64,
    pub intercept: String,
    pub allowed_clients: Vec<String>,
    pub allow_private: Vec<String>,
    pub redact_responses: bool,
    pub builtin_providers: bool,
    /// Where `${VAR}` credentials look for a file named like the variable when it is unset.
    pub secrets_dir: String,
    /// Add `Via: 1.1 latchkey` to forwarded requests and responses (RFC 9110 7.6.3).
    pub via: bool,
    /// Lock all of latchkey's memory (mlockall) so secrets are never swapped out.
    pub mlock: bool,
    /// Threads serving connections (each a shard: its own runtime, connections and
    /// upstream pool); absent, one per core the process may use.
    pub threads: Option<usize>,
    /// Serve the proxy port over TLS (an `https://` proxy URL), with a leaf from the CA.
    pub tls: bool,
    /// Names and addresses the proxy's own certificate covers, besides the defaults.
    pub tls_names: Vec<String>,
    /// A directory that gets only the public `ca.crt` and `bundle.pem`, for agents.
    pub ca_export_dir: Option<String>,
    /// Transparent mode (SPEC 9): `ip:port` where nftables REDIRECTs connections.
    pub transparent: Option<String>,
    /// The `[agents]` name every transparent connection is served as.
    pub transparent_agent: Option<String>,
    pub logging: RawLogging,
    pub filters: RawFilters,
    pub limits: RawLimits,
    pub dlp: RawDlp,
}

impl Default for RawProxy {
    fn default() -> Self {
        RawProxy {
            port: 3128,
            bind: "127.0.0.1".into(),
            ca_dir: "~/.config/latchkey/ca".into(),
            generate_certs: true,
            ca_lifetime: 365,
            threads: None,
            timeout: 300,
            connect_timeout: 10,
            intercept: "auto".into(),
            allowed_clients: vec![],
            allow_private: vec![],
            redact_responses: true,
            builtin_providers: false,
            secrets_dir: "~/.config/secrets".into(),
            via: true,
            mlock: false,
            tls: false,
            tls_names: vec![],
            ca_export_dir: None,
            transparent: None,
            transparent_agent: None,
            logging: RawLogging::default(),
            filters: RawFilters::default(),
            limits: RawLimits::default(),
            dlp: RawDlp::default(),
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct RawLogging {
    pub log_requests: bool,
    pub log_file: String,
    /// A key file (0600) for a per-line HMAC in the request log.
    pub hmac_key_file: Option<String>,
    /// `"block"` (refuse requests while the log cannot be written) or `"continue"`.
    pub on_log_error: String,
}

impl Default for RawLogging {
    fn default() -> Self {
        RawLogging {
            log_requests: false,
            log_file: "~/.config/latchkey/proxy.log".into(),
            hmac_key_file: None,
            on_log_error: "block".into(),
        }
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawFilters {
    pub blocked_domains: Vec<String>,
    pub blocked_patterns: Vec<String>,
    pub allowlist_only: bool,
    pub allowed_domains: Vec<String>,
    /// "deny" (default) | "ask" | "warn" (SPEC 10).
    pub on_unlisted: Option<String>,
    /// Seconds a held connection waits for a person (default 60).
    pub ask_timeout: Option<u64>,
}

/// `[proxy.dlp]`: outbound scanning of requests (docs/dlp.md).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct RawDlp {
    pub enabled: bool,
    /// "block" | "redact" | "warn".
    pub action: String,
    /// "builtin" (the bundled rule set) or "none" (only `[[proxy.dlp.rule]]`).
    pub rules: String,
    pub allow: Vec<RawDlpAllow>,
    pub rule: Vec<RawDlpRule>,
    /// Request body bytes held (and scanned whole) before anything is forwarded.
    pub hold_bytes: usize,
}

impl Default for RawDlp {
    fn default() -> Self {
        RawDlp {
            enabled: false,
            action: "block".into(),
            rules: "builtin".into(),
            allow: vec![],
            rule: vec![],
            hold_bytes: 1024 * 1024,
        }
    }
}

/// `allow = [{ rule = "github-pat", hosts = ["api.github.com"] }]`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawDlpAllow {
    pub rule: String,
    pub hosts: Vec<String>,
}

/// `[[proxy.dlp.rule]]`: a user's rule, a regex or a literal.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RawDlpRule {
    pub id: String,
    pub regex: Option<String>,
    pub literal: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: u64,
    pub idle_timeout: u64,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub inspect_body_bytes: usize,
    pub tunnel_timeout: u64,
    pub shutdown_grace: u64,
    /// Bytes one CONNECT tunnel may carry, both ways together (0 = no cap).
    pub max_tunnel_bytes: u64,
    /// Upstream connections open for one client connection's requests.
    pub max_upstream_per_connection: usize,
    /// Upstream connections open for requests, in total.
    pub max_upstream_connections: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            header_read_timeout: 10,
            idle_timeout: 90,
            max_connections: 4096,
            max_connections_per_client: 1024,
            inspect_body_bytes: 1024 * 1024,
            tunnel_timeout: 4 * 3600,
            shutdown_grace: 30,
            max_tunnel_bytes: 0,
            max_upstream_per_connection: 32,
            max_upstream_connections: 8192,
        }
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpstream {
    pub ca_file: Option<String>,
    pub resolve: IndexMap<String, String>,
    /// `http://[USER:PASS@]HOST:PORT`: a corporate proxy every upstream connection goes through.
    pub proxy: Option<String>,
    /// Destinations reached directly, not through `proxy` (host patterns).
    pub no_proxy: Vec<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub listen: Option<String>,
    /// The web view at `/`.
    pub ui: bool,
    /// The admin token (created 0600 at first start when absent).
    pub token_file: Option<String>,
    /// Every approval request is POSTed here, signed with the admin token.
    pub webhook: Option<String>,
}

/// `[telemetry]`: OpenTelemetry export.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawTelemetry {
    /// OTLP/HTTP collector base URL (`http://127.0.0.1:4318`); absent = no spans.
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
    /// Redacted response bytes attached to each span (0 = none).
    pub capture_body_bytes: usize,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct RawCredential {
    pub header: Option<OneOrMany>,
    pub auth_type: Option<String>,
    pub value: Option<String>,
    pub value_file: Option<String>,
    pub value_command: Option<Vec<String>>,
    /// A sealed secret (`lks1:...`, made by `latchkey seal`) in place of `value` (or
    /// `password`): opened with `seal.key`, bound to the hosts it was sealed for.
    pub sealed: Option<String>,
    /// Seconds a value_command's output is used before the command runs again.
    pub value_command_ttl: Option<u64>,
    /// Variables of latchkey's environment the value_command gets besides PATH, HOME
    /// and LANG (it gets nothing else).
    pub value_command_env: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub param: Option<String>,
    pub domains: Vec<String>,
    pub paths: Vec<String>,
    /// Path patterns where the credential is never injected (`*` one segment, `**` any).
    pub except_paths: Vec<String>,
    pub methods: Vec<String>,
    pub ports: Vec<u16>,
    pub allow_http: bool,
    pub placeholder: Option<String>,
    pub env: Option<OneOrMany>,
    pub require_placeholder: bool,
    /// Refuse requests whose slot holds no valid scoped token (`latchkey token mint`).
    pub require_token: bool,
    pub allowed_origins: Vec<String>,
    pub pass_cookies: bool,
    /// PEM certificate chain latchkey presents to the upstream (with `client_key`).
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    /// PEM roots trusted for this credential's upstream, besides the public ones.
    pub upstream_ca: Option<String>,
    /// aws_sigv4: secret sources (`${VAR}` templates), and the signing scope.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
    pub service: Option<String>,
    /// aws_sigv4: largest request body hashed for signing (bytes; 413 beyond).
    pub max_signed_body: Option<usize>,
    /// gcp: a service-account or authorized_user JSON (default: Application Default
    /// Credentials discovery), and the OAuth2 scopes to ask for.
    pub credentials_file: Option<String>,
    pub scopes: Vec<String>,
    /// oauth2_client_credentials: the token endpoint, the client, its secret (a secret
    /// source), the audience asked for and how the client authenticates.
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub audience: Option<String>,
    pub token_endpoint_auth_method: Option<String>,
    /// github_app: the app, its installation, its private key (PEM, a secret source),
    /// and what each minted installation token is narrowed to.
    pub app_id: Option<u64>,
    pub installation_id: Option<u64>,
    pub private_key: Option<String>,
    pub repositories: Option<Vec<String>>,
    pub permissions: Option<IndexMap<String, String>>,
    /// A secret in the OS keyring: `"SERVICE/ACCOUNT"`.
    pub value_keyring: Option<String>,
    /// Limits on this credential (see `crate::limits`).
    pub requests_per_minute: Option<u32>,
    pub tokens_per_day: Option<u64>,
    /// Only in the built-in table: the file in `secrets_dir` used when the variable is unset.
    pub secret_file: Option<String>,
    /// Only in the built-in table: what `latchkey providers` shows.
    pub provider: Option<String>,
    pub docs: Option<String>,
}
