//! Configuration: find the file, parse it (unknown keys are errors), resolve secrets,
//! and compile it into one immutable `Config` that the proxy swaps whole.

pub mod envvars;
mod locate;
pub mod raw;
pub mod restart;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indexmap::IndexMap;
use ipnet::IpNet;

use crate::inject::build::Sources;
use crate::inject::{Held, Injector};
use crate::policy::{
    AgentRule, ContentFilter, CredState, CredentialRule, Decision, Destination, Filters, InSlot, OnUnlisted,
    Pattern, Policy, Question, RequestHead, canonical_prefix,
};
use crate::secrets::{Resolved, SecretValue, Source, Template};
use crate::token::state::TokenState;
use raw::{RawConfig, RawCredential};

/// The built-in provider table (SPEC section 5), kept as data.
pub const PROVIDERS_TOML: &str = include_str!("../providers.toml");

/// `[proxy] threads` at most: a thread per core of a large machine, not a typo's million.
const MAX_THREADS: usize = 1024;

#[derive(Debug)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
    /// The `LATCHKEY_*` variable the offending value came from, when it did.
    pub variable: Option<&'static str>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(var) = self.variable {
            return write!(f, "{var} (overrides {}): {}", self.key, self.message);
        }
        let file =
            self.file.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "<built-in>".into());
        if self.line > 0 {
            write!(f, "{file}:{}:{}: ", self.line, self.column)?;
        } else {
            write!(f, "{file}: ")?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub inspect_body_bytes: usize,
    /// Whole life of a blind tunnel or an upgraded (WebSocket) stream.
    pub tunnel_timeout: Duration,
    /// How long SIGTERM/SIGINT waits for requests in flight.
    pub shutdown_grace: Duration,
    /// Bytes one CONNECT tunnel may carry, both directions together; `None`: no cap.
    pub max_tunnel_bytes: Option<u64>,
    /// Upstream connections open for one client connection's requests (HTTP/2 streams
    /// fanned out to HTTP/1.1 upstreams), and for all requests together.
    pub max_upstream_per_connection: usize,
    pub max_upstream_connections: usize,
}

#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub listen: SocketAddr,
    pub ca_dir: PathBuf,
    pub generate_certs: bool,
    pub ca_lifetime_days: u32,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub allowed_clients: Vec<IpNet>,
    pub allow_private: Vec<IpNet>,
    pub redact_responses: bool,
    pub via: bool,
    pub mlock: bool,
    /// `[proxy] threads`: how many shards serve connections; `None`, one per core.
    pub threads: Option<usize>,
    /// `[proxy] tls`: the proxy port speaks TLS; the names its certificate covers.
    pub tls: bool,
    pub tls_names: Vec<String>,
    /// `[proxy] ca_export_dir`: where the public half of the CA is copied for agents.
    pub ca_export_dir: Option<PathBuf>,
    /// `[proxy] transparent`: the listener for redirected connections (SPEC 9).
    pub transparent: Option<SocketAddr>,
    /// `[proxy] transparent_agent`: the `[agents]` name transparent connections carry.
    pub transparent_agent: Option<String>,
    pub log_requests: bool,
    pub log_file: PathBuf,
    pub hmac_key_file: Option<PathBuf>,
    pub on_log_error: crate::telemetry::audit::OnLogError,
    pub limits: Limits,
}

#[derive(Debug, Clone, Default)]
pub struct UpstreamSettings {
    pub ca_file: Option<PathBuf>,
    /// `host:port` → address, like curl --resolve.
    pub resolve: HashMap<Destination, SocketAddr>,
    /// `proxy` and `no_proxy`: the corporate proxy upstream connections go through.
    pub proxy: Option<std::sync::Arc<crate::proxy::corporate::CorporateProxy>>,
}

/// A credential as the proxy uses it. Its routing lives in `policy.credentials[i]`.
#[derive(Debug)]
pub struct Credential {
    pub name: String,
    /// The name again, shared: log records and metric labels carry it without a copy.
    pub label: std::sync::Arc<str>,
    pub injector: Box<dyn Injector>,
    pub placeholder: String,
    /// Client-side variables that get the placeholder.
    pub env: Vec<String>,
    /// Variables the secret source reads (scrubbed from `exec` children).
    pub reads: Vec<String>,
    /// `value_command_env`: variables passed to the value_command (scrubbed from `exec`
    /// children too; never a variable a secret is read from).
    pub command_env: Vec<String>,
    /// The resolved secret values the injector reads; refreshed ones (files, commands
    /// with a TTL) are brought up to date by [`Credential::ready`] before each use.
    pub sources: Vec<SecretValue>,
    pub source: String,
    pub inline_secret: bool,
    pub pass_cookies: bool,
    pub builtin: bool,
    pub auth_type: String,
    /// Client certificate and/or extra roots for this credential's upstream connections.
    pub tls: Option<std::sync::Arc<crate::secrets::ClientTls>>,
    /// Masks this credential's secrets in the responses to its requests; shared with the
    /// same-named credential of the next config on reload (rotated values stay masked).
    pub redactor: std::sync::Arc<crate::redact::Cache>,
    /// The header names of the injector's slots, parsed once: request trailers are
    /// cleaned of them (`proxy::trailers`), DLP does not scan them, spans hide them.
    pub slot_headers: std::sync::Arc<[http::HeaderName]>,
}

#[derive(Debug)]
pub struct Config {
    pub file: Option<PathBuf>,
    pub proxy: ProxySettings,
    pub upstream: UpstreamSettings,
    pub admin: Option<SocketAddr>,
    /// `[admin]`'s access settings: the view, the token, the approvals webhook.
    pub admin_access: AdminAccess,
    pub policy: Policy,
    pub credentials: Vec<Credential>,
    /// Variables present at load that capture templates may use (listed by `check`).
    pub capture_variables: Vec<String>,
    /// Client identities; when any exists, every client must authenticate (407).
    pub agents: Vec<Agent>,
    pub telemetry: Telemetry,
    pub jail: JailSettings,
    /// `[cluster]`: shared state in Redis, when set.
    pub cluster: Option<crate::cluster::ClusterSettings>,
    /// `[proxy.dlp]` when enabled: the compiled rules and how much body is held.
    pub dlp: Option<std::sync::Arc<crate::dlp::Settings>>,
}

/// `[admin]` beyond `listen` (SPEC 10).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminAccess {
    /// `ui = true`: the web view at `/`.
    pub ui: bool,
    /// `token_file`: default `admin.token` beside the config file (else in `ca_dir`).
    pub token_file: PathBuf,
    /// `webhook`: approval requests are POSTed here.
    pub webhook: Option<String>,
}

/// What `exec --jail` hides (SPEC section 9).
#[derive(Debug, Clone, Default)]
pub struct JailSettings {
    /// The default list and `[jail] hide`, `~` expanded.
    pub hide: Vec<PathBuf>,
    /// Where this config's secrets come from: the config file itself, `value_file`s,
    /// `credentials_file`s, client keys, agent token files, the HMAC key, `secrets_dir`.
    pub secret_files: Vec<PathBuf>,
}

/// Paths `exec --jail` always hides: other tools' credential stores.
pub const DEFAULT_JAIL_HIDE: &[&str] = &[
    "~/.aws",
    "~/.config/gcloud",
    "~/.ssh",
    "~/.netrc",
    "~/.docker/config.json",
    "~/.config/gh",
    "~/.git-credentials",
];

/// `[telemetry]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Telemetry {
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    pub capture_body_bytes: usize,
}

/// A client identity from `[agents.NAME]`: how it proves who it is. What it may do is
/// in `policy.agents` (same index).
#[derive(Debug)]
pub struct Agent {
    pub name: String,
    pub token: Option<crate::secrets::Secret>,
    /// Variables the token is read from (scrubbed from every `exec` child).
    pub reads: Vec<String>,
    /// Client certificates (SHA-256 of the DER) that identify this agent.
    pub client_certs: Vec<[u8; 32]>,
    /// A CA whose client certificates identify this agent.
    pub client_ca: Option<crate::proxy::agent_auth::ClientCa>,
}

/// Where the config comes from: `--config` > `$LATCHKEY_CONFIG` > XDG default.
/// `None` means no file: built-in defaults.
pub fn find_config(cli: Option<&Path>) -> Result<Option<PathBuf>, ConfigError> {
    let explicit =
        cli.map(Path::to_path_buf).or_else(|| std::env::var_os("LATCHKEY_CONFIG").map(PathBuf::from));
    if let Some(path) = explicit {
        if !path.exists() {
            return Err(plain_error(Some(&path), format!("config file {} does not exist", path.display())));
        }
        return Ok(Some(path));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| home_dir().join(".config"));
    let path = base.join("latchkey").join("config.toml");
    Ok(path.exists().then_some(path))
}

fn plain_error(file: Option<&Path>, message: String) -> ConfigError {
    ConfigError {
        file: file.map(Path::to_path_buf),
        line: 0,
        column: 0,
        key: String::new(),
        message,
        variable: None,
    }
}

/// Load and compile. `env` is the proxy's environment (tests pass their own).
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    let env = |k: &str| std::env::var(k).ok();
    let vars: Vec<String> = std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()).collect();
    match path {
        None => compile("", None, &env, &vars),
        Some(p) => {
            let meta = std::fs::metadata(p).map_err(|e| plain_error(Some(p), e.to_string()))?;
            crate::secrets::owner_only_writable(&meta)
                .map_err(|why| plain_error(Some(p), format!("refusing to load a config that {why}")))?;
            let src = std::fs::read_to_string(p).map_err(|e| plain_error(Some(p), e.to_string()))?;
            compile(&src, Some(p), &env, &vars)
        }
    }
}

/// Parse and compile config text.
pub fn compile(
    src: &str,
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    vars: &[String],
) -> Result<Config, ConfigError> {
    let mut raw: RawConfig = toml::from_str(src).map_err(|e| toml_error(src, file, &e))?;
    let overrides = envvars::apply(&mut raw, env).map_err(|bad| ConfigError {
        file: file.map(Path::to_path_buf),
        line: 0,
        column: 0,
        key: bad.key.to_string(),
        message: bad.message,
        variable: Some(bad.variable),
    })?;
    Compiler { src, file, env, vars, overrides }.config(raw)
}

fn toml_error(src: &str, file: Option<&Path>, e: &toml::de::Error) -> ConfigError {
    let span = e.span().unwrap_or(0..0);
    let (line, column) = locate::line_col(src, span.start);
    let table = locate::table_at(src, span.start);
    let mut message = e.message().trim().to_string();
    let mut key = table.clone();
    let original = message.clone();
    if let Some(rest) = original.strip_prefix("unknown field `") {
        let unknown = rest.split('`').next().unwrap_or("").to_string();
        let known: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
        key = if table.is_empty() { unknown.clone() } else { format!("{table}.{unknown}") };
        message = format!("unknown key `{unknown}`");
        if let Some(s) = locate::suggest(&unknown, &known) {
            message.push_str(&format!(" (did you mean `{s}`?)"));
        }
    } else if let Some(k) = locate::key_at(src, span.start) {
        // The statement the error is in, not the token it points at.
        key = if table.is_empty() { k } else { format!("{table}.{k}") };
    }
    if message.starts_with("invalid basic string") || message.starts_with("invalid literal string") {
        message.push_str(" (the string is not closed on this line)");
    }
    ConfigError { file: file.map(Path::to_path_buf), line, column, key, message, variable: None }
}

struct Compiler<'a> {
    src: &'a str,
    file: Option<&'a Path>,
    env: &'a dyn Fn(&str) -> Option<String>,
    vars: &'a [String],
    /// Keys set by `LATCHKEY_*` variables: their errors name the variable.
    overrides: envvars::Overrides,
}

impl Compiler<'_> {
    /// An error at `key` inside the table at `table` (located by header or span).
    fn on_log_error(&self, l: &raw::RawLogging) -> Result<crate::telemetry::audit::OnLogError, ConfigError> {
        use crate::telemetry::audit::OnLogError;
        match l.on_log_error.as_str() {
            "block" => Ok(OnLogError::Block),
            "continue" => Ok(OnLogError::Continue),
            other => Err(self.err(
                &["proxy", "logging"],
                None,
                "on_log_error",
                format!("{other:?}: expected \"block\" or \"continue\""),
            )),
        }
    }

    fn err(
        &self,
        table: &[&str],
        span: Option<std::ops::Range<usize>>,
        key: &str,
        msg: impl Into<String>,
    ) -> ConfigError {
        // A table's span covers its `[header]`; its keys run to the next header.
        let table_start = span.as_ref().map(|s| s.start).or_else(|| locate::table_offset(self.src, table));
        let offset = table_start.map(|start| {
            let end = locate::next_table(self.src, start);
            locate::key_offset(self.src, start..end, key).unwrap_or(start)
        });
        let (line, column) = offset.map(|o| locate::line_col(self.src, o)).unwrap_or((0, 0));
        let mut path: Vec<&str> = table.to_vec();
        if !key.is_empty() {
            path.push(key);
        }
        let key = path.join(".");
        let variable = self.overrides.variable_for(&key);
        let (line, column) = if variable.is_some() { (0, 0) } else { (line, column) };
        ConfigError {
            file: self.file.map(Path::to_path_buf),
            line,
            column,
            key,
            message: msg.into(),
            variable,
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let p = &raw.proxy;
        let (proxy, intercept_all) = self.proxy_settings(&raw)?;
        let filters = self.filters(&raw.proxy.filters)?;
        let (dlp_policy, dlp) = self.dlp(&raw.proxy.dlp)?;
        let upstream = self.upstream(&raw.upstream)?;
        let admin = match raw.admin.as_ref().and_then(|a| a.listen.as_deref()) {
            None => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|_| self.err(&["admin"], None, "listen", format!("{s:?} is not ip:port")))?,
            ),
        };
        let admin_access = self.admin_access(raw.admin.as_ref(), &proxy.ca_dir)?;

        let mut entries: Vec<(String, RawCredential, Option<std::ops::Range<usize>>, bool)> = Vec::new();
        if raw.credentials.is_none() || p.builtin_providers {
            // Entries without hosts (Kubernetes, Talos) wait for the user to name them.
            for (name, c) in builtin_providers().into_iter().filter(|(_, c)| !c.domains.is_empty()) {
                entries.push((name, c, None, true));
            }
        }
        for (name, c) in raw.credentials.unwrap_or_default() {
            let span = c.span();
            entries.retain(|(n, ..)| *n != name);
            entries.push((name, c.into_inner(), Some(span), false));
        }
        let dirs = SourceDirs { secrets: expand_home(&p.secrets_dir), keys: proxy.ca_dir.clone() };
        let jail = self.jail_settings(&raw.jail, &raw.agents, &raw.proxy.logging, &entries, &dirs.secrets);
        let mut rules = Vec::new();
        let mut credentials: Vec<Credential> = Vec::new();
        for (name, rc, span, builtin) in entries {
            let (rule, cred) = self.credential(&name, rc, span, builtin, &credentials, &dirs)?;
            rules.push(rule);
            credentials.push(cred);
        }
        share_placeholders(&credentials, &mut rules);
        let (agents, agent_rules) = self.agents(&raw.agents, &credentials, raw.proxy.tls)?;
        self.check_command_env(&credentials, &agents)?;
        let cluster = self.cluster(raw.cluster.as_ref())?;
        let telemetry = match &raw.telemetry {
            None => Telemetry { service_name: "latchkey".into(), ..Default::default() },
            Some(t) => Telemetry {
                otlp_endpoint: t.otlp_endpoint.clone(),
                service_name: t.service_name.clone().unwrap_or_else(|| "latchkey".into()),
                capture_body_bytes: t.capture_body_bytes,
            },
        };
        let capture_variables: Vec<String> = self
            .vars
            .iter()
            .filter(|v| {
                credentials.iter().any(|c| {
                    c.reads.iter().any(|r| r.strip_suffix('*').is_some_and(|pre| v.starts_with(pre)))
                })
            })
            .cloned()
            .collect();
        let present = capture_variables.iter().cloned().collect();
        Ok(Config {
            file: self.file.map(Path::to_path_buf),
            proxy,
            upstream,
            admin,
            admin_access,
            policy: Policy {
                credentials: rules,
                agents: agent_rules,
                filters,
                dlp: dlp_policy,
                intercept_all,
                capture_variables: present,
            },
            credentials,
            capture_variables,
            agents,
            telemetry,
            jail,
            cluster,
            dlp,
        })
    }

    /// `[cluster]`: a table without `redis` is an error (nothing would be shared).
    fn cluster(
        &self,
        raw: Option<&raw::RawCluster>,
    ) -> Result<Option<crate::cluster::ClusterSettings>, ConfigError> {
        let Some(c) = raw else { return Ok(None) };
        let err = |key: &str, msg: String| self.err(&["cluster"], None, key, msg);
        let url = c.redis.as_deref().ok_or_else(|| {
            err("redis", "[cluster] needs `redis = \"redis://HOST:6379/0\"` (or remove the table)".into())
        })?;
        crate::cluster::ClusterSettings::parse(
            url,
            c.on_store_error.as_deref(),
            c.timeout_ms,
            c.key_prefix.as_deref(),
            self.env,
        )
        .map(Some)
        .map_err(|bad| err(bad.key, bad.message))
    }

    /// `[proxy]`, `[proxy.logging]` and `[proxy.limits]`; and whether every host is
    /// intercepted (`intercept = "all"`).
    fn proxy_settings(&self, raw: &RawConfig) -> Result<(ProxySettings, bool), ConfigError> {
        let p = &raw.proxy;
        let pe = |key: &str, msg: String| self.err(&["proxy"], None, key, msg);
        let bind: IpAddr =
            p.bind.parse().map_err(|_| pe("bind", format!("{:?} is not an IP address", p.bind)))?;
        let cidrs = |list: &[String], key: &str| -> Result<Vec<IpNet>, ConfigError> {
            list.iter()
                .map(|s| parse_cidr(s).ok_or_else(|| pe(key, format!("{s:?} is not an IP or CIDR"))))
                .collect()
        };
        let allowed_clients = cidrs(&p.allowed_clients, "allowed_clients")?;
        if !bind.is_loopback() && allowed_clients.is_empty() && raw.agents.is_empty() {
            return Err(pe(
                "bind",
                format!(
                    "binding to {bind} (not loopback) needs allowed_clients or [agents]: latchkey will not run an open credential proxy"
                ),
            ));
        }
        let intercept_all = match p.intercept.as_str() {
            "auto" => false,
            "all" => true,
            other => {
                return Err(pe("intercept", format!("{other:?}: expected \"auto\" or \"all\"")));
            }
        };
        if p.connect_timeout == 0 || p.timeout == 0 {
            return Err(pe("timeout", "timeouts must be at least 1 second".into()));
        }
        if let Some(n) = p.threads.filter(|n| !(1..=MAX_THREADS).contains(n)) {
            let msg = format!("{n}: expected 1 to {MAX_THREADS} (leave it out for one per core)");
            return Err(pe("threads", msg));
        }
        let l = &p.limits;
        let limits = Limits {
            max_header_bytes: l.max_header_bytes.max(1024),
            max_headers: l.max_headers.max(8),
            header_read_timeout: Duration::from_secs(l.header_read_timeout.max(1)),
            idle_timeout: Duration::from_secs(l.idle_timeout.max(1)),
            max_connections: l.max_connections.max(1),
            max_connections_per_client: l.max_connections_per_client.max(1),
            inspect_body_bytes: l.inspect_body_bytes,
            tunnel_timeout: Duration::from_secs(l.tunnel_timeout.max(1)),
            shutdown_grace: Duration::from_secs(l.shutdown_grace),
            max_tunnel_bytes: (l.max_tunnel_bytes > 0).then_some(l.max_tunnel_bytes),
            max_upstream_per_connection: l.max_upstream_per_connection.max(1),
            max_upstream_connections: l.max_upstream_connections.max(2),
        };
        let transparent = self.transparent(raw, SocketAddr::new(bind, p.port), &allowed_clients)?;
        let proxy = ProxySettings {
            listen: SocketAddr::new(bind, p.port),
            ca_dir: expand_home(&p.ca_dir),
            generate_certs: p.generate_certs,
            ca_lifetime_days: p.ca_lifetime.max(1),
            timeout: Duration::from_secs(p.timeout),
            connect_timeout: Duration::from_secs(p.connect_timeout.min(p.timeout)),
            allowed_clients,
            allow_private: cidrs(&p.allow_private, "allow_private")?,
            redact_responses: p.redact_responses,
            via: p.via,
            mlock: p.mlock,
            threads: p.threads,
            tls: p.tls,
            tls_names: p.tls_names.clone(),
            ca_export_dir: p.ca_export_dir.as_deref().map(expand_home),
            transparent,
            transparent_agent: p.transparent_agent.clone(),
            log_requests: p.logging.log_requests,
            log_file: expand_home(&p.logging.log_file),
            hmac_key_file: p.logging.hmac_key_file.as_deref().map(expand_home),
            on_log_error: self.on_log_error(&p.logging)?,
            limits,
        };
        Ok((proxy, intercept_all))
    }

    /// `[proxy] transparent` and `transparent_agent`: a fixed port apart from the proxy's,
    /// an open listener only with `allowed_clients`, and with `[agents]` configured the
    /// agent every redirected connection is (it cannot present Proxy-Authorization).
    fn transparent(
        &self,
        raw: &RawConfig,
        listen: SocketAddr,
        allowed_clients: &[IpNet],
    ) -> Result<Option<SocketAddr>, ConfigError> {
        let p = &raw.proxy;
        let pe = |key: &str, msg: String| self.err(&["proxy"], None, key, msg);
        let Some(text) = &p.transparent else {
            if p.transparent_agent.is_some() {
                return Err(pe("transparent_agent", "only means something with [proxy] transparent".into()));
            }
            return Ok(None);
        };
        let addr: SocketAddr = text.parse().map_err(|_| {
            pe("transparent", format!("{text:?} is not an address and port, like \"127.0.0.1:3130\""))
        })?;
        if addr.port() == 0 {
            return Err(pe("transparent", "needs a fixed port: the nftables rules redirect to it".into()));
        }
        let same_ip = addr.ip() == listen.ip() || addr.ip().is_unspecified() || listen.ip().is_unspecified();
        if addr.port() == listen.port() && same_ip {
            return Err(pe("transparent", format!("{addr} is the proxy port; give it a port of its own")));
        }
        if !addr.ip().is_loopback() && allowed_clients.is_empty() {
            return Err(pe(
                "transparent",
                format!(
                    "listening on {} (not loopback) needs allowed_clients: latchkey will not run an open credential proxy",
                    addr.ip()
                ),
            ));
        }
        match (&p.transparent_agent, raw.agents.is_empty()) {
            (None, false) => Err(pe(
                "transparent_agent",
                "[agents] is configured and redirected connections carry no Proxy-Authorization: name the agent they are served as (transparent_agent = \"NAME\")".into(),
            )),
            (Some(name), _) if !raw.agents.contains_key(name) => {
                Err(pe("transparent_agent", format!("{name:?} is not an [agents] entry")))
            }
            _ => Ok(Some(addr)),
        }
    }

    /// `value_command_env` names plain variables, none of which holds a secret latchkey
    /// reads for a credential or an agent: the child must never get one.
    fn check_command_env(&self, credentials: &[Credential], agents: &[Agent]) -> Result<(), ConfigError> {
        let secret_vars: Vec<&String> =
            credentials.iter().flat_map(|c| &c.reads).chain(agents.iter().flat_map(|a| &a.reads)).collect();
        let holds_secret = |name: &str| {
            secret_vars.iter().any(|r| match r.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => r.as_str() == name,
            })
        };
        for c in credentials {
            let e = |msg: String| self.err(&["credentials", &c.name], None, "value_command_env", msg);
            for name in &c.command_env {
                let valid = name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !valid {
                    return Err(e(format!("{name:?} is not an environment variable name")));
                }
                if holds_secret(name) {
                    return Err(e(format!(
                        "{name} holds a secret latchkey reads for a credential or an agent; a value_command never gets one"
                    )));
                }
            }
        }
        Ok(())
    }

    fn jail_settings(
        &self,
        jail: &raw::RawJail,
        agents: &IndexMap<String, toml::Spanned<raw::RawAgent>>,
        logging: &raw::RawLogging,
        entries: &[(String, RawCredential, Option<std::ops::Range<usize>>, bool)],
        secrets_dir: &Path,
    ) -> JailSettings {
        let defaults = DEFAULT_JAIL_HIDE.iter().map(|s| s.to_string());
        let hide = defaults.chain(jail.hide.iter().cloned()).map(|p| expand_home(&p)).collect();
        let mut secret_files: Vec<PathBuf> = self.file.map(Path::to_path_buf).into_iter().collect();
        secret_files.push(secrets_dir.to_path_buf());
        for (_, c, ..) in entries {
            let files = [&c.value_file, &c.credentials_file, &c.client_key];
            secret_files.extend(files.into_iter().flatten().map(|f| expand_home(f)));
        }
        for a in agents.values() {
            secret_files.extend(a.get_ref().token_file.as_deref().map(expand_home));
        }
        secret_files.extend(logging.hmac_key_file.as_deref().map(expand_home));
        JailSettings { hide, secret_files }
    }

    fn agents(
        &self,
        raw: &IndexMap<String, toml::Spanned<raw::RawAgent>>,
        credentials: &[Credential],
        tls: bool,
    ) -> Result<(Vec<Agent>, Vec<AgentRule>), ConfigError> {
        let (mut out, mut rules) = (Vec::new(), Vec::new());
        for (name, spanned) in raw {
            let span = Some(spanned.span());
            let a = spanned.get_ref();
            let e = |key: &str, msg: String| self.err(&["agents", name], span.clone(), key, msg);
            let (client_certs, client_ca) = self.agent_certs(name, a, span.clone(), tls)?;
            let by_cert = !client_certs.is_empty() || client_ca.is_some();
            let source = match (&a.token, &a.token_file) {
                (Some(t), None) => {
                    Some(Source::Value(Template::parse(t).map_err(|x| e("token", x.to_string()))?))
                }
                (None, Some(f)) => Some(Source::File(expand_home(f))),
                (None, None) if by_cert => None,
                _ => {
                    return Err(e(
                        "token",
                        "set one of `token`, `token_file` (or a client certificate: client_cert_sha256, client_ca)"
                            .into(),
                    ));
                }
            };
            // An agent whose token cannot be read can never authenticate (fail closed).
            let token = match source.as_ref().map(|s| s.resolve(self.env, self.vars)) {
                Some(Resolved::Ready(v)) => v.get(&[]),
                _ => None,
            };
            let credentials = match &a.credentials {
                None => None,
                Some(names) => Some(
                    names
                        .iter()
                        .map(|n| {
                            credentials
                                .iter()
                                .position(|c| &c.name == n)
                                .ok_or_else(|| e("credentials", format!("no credential named {n:?}")))
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            let allowed = a
                .allowed_domains
                .iter()
                .map(|p| Pattern::parse(p).map_err(|x| e("allowed_domains", format!("{p:?}: {x}"))))
                .collect::<Result<Vec<_>, _>>()?;
            let limits = crate::limits::Limits {
                requests_per_minute: a.requests_per_minute,
                tokens_per_day: a.tokens_per_day,
            };
            if limits.requests_per_minute == Some(0) {
                return Err(e("requests_per_minute", "must be at least 1 (remove it for no limit)".into()));
            }
            let reads = match &source {
                Some(Source::Value(t)) => t.variables(),
                _ => vec![],
            };
            out.push(Agent { name: name.clone(), token, reads, client_certs, client_ca });
            rules.push(AgentRule { name: name.clone(), credentials, allowed, limits });
        }
        self.check_cert_identities(raw, &out)?;
        Ok((out, rules))
    }

    /// `client_cert_sha256` and `client_ca`: the certificates that identify an agent.
    fn agent_certs(
        &self,
        name: &str,
        a: &raw::RawAgent,
        span: Option<std::ops::Range<usize>>,
        tls: bool,
    ) -> Result<(Vec<[u8; 32]>, Option<crate::proxy::agent_auth::ClientCa>), ConfigError> {
        let e = |key: &str, msg: String| self.err(&["agents", name], span.clone(), key, msg);
        let prints = a.client_cert_sha256.clone().map(raw::OneOrMany::into_vec).unwrap_or_default();
        let client_certs = prints
            .iter()
            .map(|p| {
                crate::proxy::agent_auth::parse_sha256(p).ok_or_else(|| {
                    e(
                        "client_cert_sha256",
                        format!("{p:?} is not a SHA-256 fingerprint (64 hex digits, colons allowed)"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let client_ca = match &a.client_ca {
            None => None,
            Some(path) => Some(
                crate::proxy::agent_auth::ClientCa::load(&expand_home(path))
                    .map_err(|x| e("client_ca", x))?,
            ),
        };
        if (!client_certs.is_empty() || client_ca.is_some()) && !tls {
            let key = if client_certs.is_empty() { "client_ca" } else { "client_cert_sha256" };
            return Err(e(
                key,
                "a client certificate is only seen on a TLS proxy port: set [proxy] tls = true".into(),
            ));
        }
        Ok((client_certs, client_ca))
    }

    /// One certificate, one agent: a fingerprint or a client CA named by two agents would
    /// make the identity a matter of table order.
    fn check_cert_identities(
        &self,
        raw: &IndexMap<String, toml::Spanned<raw::RawAgent>>,
        agents: &[Agent],
    ) -> Result<(), ConfigError> {
        for (i, a) in agents.iter().enumerate() {
            for b in &agents[..i] {
                let span = raw.get(&a.name).map(|s| s.span());
                if a.client_certs.iter().any(|c| b.client_certs.contains(c)) {
                    let msg = format!("the same certificate already identifies agent {}", b.name);
                    return Err(self.err(&["agents", &a.name], span, "client_cert_sha256", msg));
                }
                if let (Some(x), Some(y)) = (&a.client_ca, &b.client_ca)
                    && x.same_roots(y)
                {
                    let msg = format!(
                        "agent {} already trusts this CA; give each agent its own issuing CA, or pin certificates with client_cert_sha256",
                        b.name
                    );
                    return Err(self.err(&["agents", &a.name], span, "client_ca", msg));
                }
            }
        }
        Ok(())
    }

    fn filters(&self, f: &raw::RawFilters) -> Result<Filters, ConfigError> {
        let t = ["proxy", "filters"];
        let patterns = |list: &[String], key: &str| -> Result<Vec<Pattern>, ConfigError> {
            list.iter()
                .map(|s| Pattern::parse(s).map_err(|e| self.err(&t, None, key, format!("{s:?}: {e}"))))
                .collect()
        };
        let on_unlisted = match f.on_unlisted.as_deref() {
            None | Some("deny") => OnUnlisted::Deny,
            Some("ask") => OnUnlisted::Ask,
            Some("warn") => OnUnlisted::Warn,
            Some(other) => {
                let msg = format!("{other:?}: expected \"deny\", \"ask\" or \"warn\"");
                return Err(self.err(&t, None, "on_unlisted", msg));
            }
        };
        if f.ask_timeout == Some(0) {
            return Err(self.err(&t, None, "ask_timeout", "must be at least 1 second"));
        }
        Ok(Filters {
            on_unlisted,
            ask_timeout: Duration::from_secs(f.ask_timeout.unwrap_or(60)),
            blocked: patterns(&f.blocked_domains, "blocked_domains")?,
            allowlist_only: f.allowlist_only,
            allowed: patterns(&f.allowed_domains, "allowed_domains")?,
            content: ContentFilter::new(&f.blocked_patterns)
                .map_err(|e| self.err(&t, None, "blocked_patterns", e.to_string()))?,
        })
    }

    fn admin_access(&self, a: Option<&raw::RawAdmin>, ca_dir: &Path) -> Result<AdminAccess, ConfigError> {
        let default = || self.state_dir(ca_dir).join("admin.token");
        let Some(a) = a else { return Ok(AdminAccess { token_file: default(), ..Default::default() }) };
        if let Some(w) = &a.webhook
            && !(w.starts_with("http://") || w.starts_with("https://"))
        {
            return Err(self.err(
                &["admin"],
                None,
                "webhook",
                format!("{w:?}: expected an http:// or https:// URL"),
            ));
        }
        Ok(AdminAccess {
            ui: a.ui,
            token_file: a.token_file.as_deref().map(expand_home).unwrap_or_else(default),
            webhook: a.webhook.clone(),
        })
    }

    /// Where latchkey keeps what it writes for the user (admin token, approvals):
    /// beside the config file, else in `ca_dir`.
    fn state_dir(&self, ca_dir: &Path) -> PathBuf {
        match self.file.and_then(Path::parent) {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => ca_dir.to_path_buf(),
        }
    }

    /// `[proxy.dlp]`: the policy part (action, allow) and the compiled rules.
    fn dlp(
        &self,
        d: &raw::RawDlp,
    ) -> Result<(crate::policy::DlpPolicy, Option<std::sync::Arc<crate::dlp::Settings>>), ConfigError> {
        use crate::policy::{DlpAction, DlpPolicy};
        let t = ["proxy", "dlp"];
        let e = |key: &str, msg: String| self.err(&t, None, key, msg);
        let action = match d.action.as_str() {
            "block" => DlpAction::Block,
            "redact" => DlpAction::Redact,
            "warn" => DlpAction::Warn,
            other => {
                return Err(e("action", format!("{other:?}: expected \"block\", \"redact\" or \"warn\"")));
            }
        };
        let builtin = match d.rules.as_str() {
            "builtin" => true,
            "none" => false,
            other => return Err(e("rules", format!("{other:?}: expected \"builtin\" or \"none\""))),
        };
        let mut user = Vec::new();
        for r in &d.rule {
            user.push(crate::dlp::user_rule(r, builtin).map_err(|m| e("rule", m))?);
        }
        let known = |id: &str| {
            (builtin && crate::dlp::rules::BUILTIN_IDS.contains(&id)) || d.rule.iter().any(|r| r.id == id)
        };
        let mut allow = Vec::new();
        for a in &d.allow {
            if a.rule == crate::dlp::rules::OWN_SECRET {
                return Err(e("allow", "latchkey's own secrets are never allowed anywhere".into()));
            }
            if !known(&a.rule) {
                return Err(e("allow", format!("{:?} names no rule (see docs/dlp.md for the ids)", a.rule)));
            }
            let hosts = a
                .hosts
                .iter()
                .map(|h| Pattern::parse(h).map_err(|x| e("allow", format!("{h:?}: {x}"))))
                .collect::<Result<Vec<_>, _>>()?;
            allow.push((a.rule.clone(), hosts));
        }
        let policy = DlpPolicy { enabled: d.enabled, action, allow };
        if !d.enabled {
            return Ok((policy, None));
        }
        let scanner = crate::dlp::Scanner::new(builtin, user).map_err(|m| e("rule", m))?;
        let hold_bytes = d.hold_bytes.max(64 * 1024);
        Ok((policy, Some(std::sync::Arc::new(crate::dlp::Settings::new(scanner, hold_bytes)))))
    }

    fn upstream(&self, u: &raw::RawUpstream) -> Result<UpstreamSettings, ConfigError> {
        let mut resolve = HashMap::new();
        for (k, v) in &u.resolve {
            let e = |m: String| self.err(&["upstream", "resolve"], None, "", m);
            let dest = Destination::parse_authority(k, None)
                .map_err(|x| e(format!("{k:?}: {x} (write host:port)")))?;
            let addr: SocketAddr =
                v.parse().map_err(|_| e(format!("{k:?} = {v:?}: the value must be ip:port")))?;
            resolve.insert(dest, addr);
        }
        let proxy = match &u.proxy {
            Some(url) => Some(std::sync::Arc::new(
                crate::proxy::corporate::CorporateProxy::parse(url, &u.no_proxy)
                    .map_err(|m| self.err(&["upstream"], None, "proxy", m))?,
            )),
            None if !u.no_proxy.is_empty() => {
                return Err(self.err(&["upstream"], None, "no_proxy", "no_proxy needs proxy"));
            }
            None => None,
        };
        Ok(UpstreamSettings { ca_file: u.ca_file.as_deref().map(expand_home), resolve, proxy })
    }

    fn credential(
        &self,
        name: &str,
        c: RawCredential,
        span: Option<std::ops::Range<usize>>,
        builtin: bool,
        earlier: &[Credential],
        dirs: &SourceDirs,
    ) -> Result<(CredentialRule, Credential), ConfigError> {
        let e = |key: &str, msg: String| self.err(&["credentials", name], span.clone(), key, msg);
        let routing = self.routing(&c, &e)?;
        let auth_type = match (&c.auth_type, &c.header) {
            (Some(t), _) => t.clone(),
            (None, Some(_)) => "header".into(),
            (None, None) => return Err(e("auth_type", "set `header` or `auth_type`".into())),
        };
        if !c.value_command_env.is_empty() && c.value_command.is_none() {
            return Err(e("value_command_env", "only a value_command takes value_command_env".into()));
        }
        slotted_only(&c, &auth_type, &routing.patterns, &dirs.keys, &e)?;
        let mut sources = Sources::new(&c, self.env, self.vars, &dirs.secrets, &dirs.keys);
        let built = crate::inject::build::builder(&auth_type)
            .and_then(|build| build(&c, &mut sources))
            .map_err(|b| e(b.key, b.message))?;
        let tls = client_tls(&c, &mut sources);
        let env = match c.env.clone() {
            Some(list) => list.into_vec(),
            None => match &built.primary {
                Source::Value(t) => t.sole_variable().map(|v| vec![v.to_string()]).unwrap_or_default(),
                _ => vec![],
            },
        };
        let placeholder = c.placeholder.clone().unwrap_or_else(|| {
            earlier
                .iter()
                .find(|o| o.env.iter().any(|v| env.contains(v)))
                .map(|o| o.placeholder.clone())
                .unwrap_or_else(|| format!("latchkey-{name}"))
        });
        let Sources { reads, captures, state, resolved, .. } = sources;
        let rule = CredentialRule {
            name: name.to_string(),
            state,
            captures,
            never_to: built.never_to,
            vends: built.vends,
            token_slot: slots_in_words(built.injector.as_ref()),
            ..routing
        };
        let slot_headers = built
            .injector
            .slots()
            .into_iter()
            .filter_map(|s| match s {
                // A slot may read `Name: prefix`; the name is what is written.
                crate::inject::Slot::Header { header } => {
                    header.split(':').next().and_then(|n| n.trim().parse().ok())
                }
                crate::inject::Slot::Query { .. } => None,
            })
            .collect();
        let cred = Credential {
            name: name.to_string(),
            label: name.into(),
            injector: built.injector,
            placeholder,
            env,
            reads,
            command_env: c.value_command_env.clone(),
            sources: resolved,
            source: built.primary.describe(),
            inline_secret: built.inline,
            pass_cookies: c.pass_cookies,
            builtin,
            auth_type,
            tls,
            redactor: Default::default(),
            slot_headers,
        };
        Ok((rule, cred))
    }

    /// Where a credential applies (hosts, paths, methods, ports and the rest of its
    /// routing), checked; its name, state and what its builder adds are filled in later.
    fn routing(
        &self,
        c: &RawCredential,
        e: &dyn Fn(&str, String) -> ConfigError,
    ) -> Result<CredentialRule, ConfigError> {
        if c.domains.is_empty() {
            return Err(e("domains", "a credential must name at least one host, IP or CIDR".into()));
        }
        if c.requests_per_minute == Some(0) {
            return Err(e("requests_per_minute", "must be at least 1 (remove it for no limit)".into()));
        }
        let mut patterns = Vec::new();
        for d in &c.domains {
            let p = Pattern::parse(d).map_err(|x| e("domains", format!("{d:?}: {x}")))?;
            if p.matches_everything() {
                return Err(e(
                    "domains",
                    format!("{d:?} matches every host; a credential must name its hosts"),
                ));
            }
            patterns.push(p);
        }
        let paths = c
            .paths
            .iter()
            .map(|p| canonical_prefix(p).map_err(|x| e("paths", x.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let except_paths = c
            .except_paths
            .iter()
            .map(|p| crate::policy::PathPattern::parse(p).map_err(|x| e("except_paths", x.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let methods: Vec<String> = c.methods.iter().map(|m| m.to_ascii_uppercase()).collect();
        if let Some(m) = methods.iter().find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()))
        {
            return Err(e("methods", format!("{m:?} is not an HTTP method")));
        }
        if c.ports.contains(&0) {
            return Err(e("ports", "port 0 is not a port".into()));
        }
        Ok(CredentialRule {
            name: String::new(),
            patterns,
            paths,
            methods,
            ports: c.ports.clone(),
            allow_http: c.allow_http,
            allowed_origins: c.allowed_origins.clone(),
            require_placeholder: c.require_placeholder,
            require_token: c.require_token,
            shares_placeholder_with: vec![],
            token_slot: String::new(),
            except_paths,
            state: CredState::Active,
            captures: vec![],
            never_to: vec![],
            vends: None,
            limits: crate::limits::Limits {
                requests_per_minute: c.requests_per_minute,
                tokens_per_day: c.tokens_per_day,
            },
        })
    }
}

/// A credential's client certificate and extra upstream roots (any auth type may set
/// them; mtls needs them): loaded, or the credential marked inactive or failed.
fn client_tls(
    c: &RawCredential,
    sources: &mut Sources<'_>,
) -> Option<std::sync::Arc<crate::secrets::ClientTls>> {
    if c.client_cert.is_none() && c.client_key.is_none() && c.upstream_ca.is_none() {
        return None;
    }
    let path = |p: &Option<String>| p.as_deref().map(expand_home);
    let (cert, key, ca) = (path(&c.client_cert), path(&c.client_key), path(&c.upstream_ca));
    match crate::secrets::ClientTls::load(cert.as_deref(), key.as_deref(), ca.as_deref()) {
        Ok(t) => Some(std::sync::Arc::new(t)),
        Err(crate::secrets::TlsLoadError::Missing(why)) => {
            sources.missing(why);
            None
        }
        Err(crate::secrets::TlsLoadError::Failed(why)) => {
            sources.failed(why);
            None
        }
    }
}

impl Credential {
    /// Bring every refreshed secret source up to date (off the runtime threads) so the
    /// injector's synchronous read finds a current value, or none (then 502).
    pub async fn ready(&self) {
        for s in &self.sources {
            s.ensure().await;
        }
    }
}

/// Credentials sharing a placeholder are one credential to the client (SPEC 5): each
/// accepts the others' scoped tokens, as it accepts the shared placeholder.
fn share_placeholders(credentials: &[Credential], rules: &mut [CredentialRule]) {
    for (i, rule) in rules.iter_mut().enumerate() {
        let own = &credentials[i];
        rule.shares_placeholder_with = credentials
            .iter()
            .filter(|c| c.name != own.name && c.placeholder == own.placeholder)
            .map(|c| c.name.clone())
            .collect();
    }
}

/// Where an injector writes, in words ("x-api-key or authorization").
fn slots_in_words(injector: &dyn Injector) -> String {
    let slots: Vec<String> = injector
        .slots()
        .into_iter()
        .map(|s| match s {
            crate::inject::Slot::Header { header } => header,
            crate::inject::Slot::Query { query } => format!("query parameter {query}"),
        })
        .collect();
    if slots.is_empty() { "its slot".into() } else { slots.join(" or ") }
}

/// Directories secret sources read: `secrets_dir`, and the CA directory (`seal.key`).
struct SourceDirs {
    secrets: PathBuf,
    keys: PathBuf,
}

/// Scoped tokens and sealed values go where a placeholder or `value` does: only auth
/// types with such a slot take `require_token` or `sealed`; a sealed value is checked
/// against the credential's hosts (and this latchkey's `seal.key`, when readable).
fn slotted_only(
    c: &RawCredential,
    auth_type: &str,
    patterns: &[Pattern],
    key_dir: &Path,
    e: &dyn Fn(&str, String) -> ConfigError,
) -> Result<(), ConfigError> {
    let slotted = matches!(auth_type, "header" | "bearer" | "basic" | "query");
    if c.sealed.is_some() && !slotted {
        return Err(e(
            "sealed",
            format!("auth_type {auth_type:?} takes no sealed value (header, bearer, basic and query do)"),
        ));
    }
    if c.require_token && !slotted {
        return Err(e("require_token", format!("auth_type {auth_type:?} has no slot a token could go in")));
    }
    if let Some(blob) = &c.sealed {
        check_sealed(blob, patterns, &c.ports, key_dir).map_err(|x| e("sealed", x))?;
    }
    Ok(())
}

/// A sealed value must be bound to every host its credential may send it to, and (when
/// this latchkey's `seal.key` is readable here) open with that key: anything else is a
/// mistake in the file, reported as a config error. Without the key here the credential
/// is inactive (or failed) instead, as for any source that cannot be read.
fn check_sealed(blob: &str, domains: &[Pattern], ports: &[u16], key_dir: &Path) -> Result<(), String> {
    let sealed = crate::seal::parse(blob)?;
    let uncovered: Vec<&str> = sealed.uncovered(domains, ports).iter().map(|p| p.source.as_str()).collect();
    if !uncovered.is_empty() {
        return Err(format!(
            "sealed for {} only, which does not cover {}: seal it again with a --host for each of the credential's domains",
            sealed.hosts.join(", "),
            uncovered.join(", ")
        ));
    }
    if let Ok(Some(text)) = crate::token::keys::read_key(key_dir, crate::token::keys::SEAL_KEY) {
        let key = crate::seal::SealKey::from_text(&text)?;
        sealed.open(&key)?;
    }
    Ok(())
}

fn parse_cidr(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// The built-in providers, in table order.
pub fn builtin_providers() -> IndexMap<String, RawCredential> {
    toml::from_str(PROVIDERS_TOML).expect("the embedded provider table parses")
}

impl Config {
    /// The decision for `q` (see `policy::decision`), this config's injectors telling
    /// what a request holds in a credential's slot, and `tokens` (the root key and
    /// revocation list in force, and the verified-token cache) verifying the signatures
    /// of a scoped token found there. The proxy, `explain` and the jail all ask this.
    pub fn decide(&self, q: &Question<'_>, tokens: &TokenState) -> Decision {
        self.policy.decide(q, |i| match q.head {
            Some(head) => self.in_slot(i, q.dest, head, tokens),
            None => InSlot::Other,
        })
    }

    /// What `head` holds where credential `i` writes on `dest`.
    fn in_slot(&self, i: usize, dest: &Destination, head: &RequestHead<'_>, tokens: &TokenState) -> InSlot {
        let c = &self.credentials[i];
        match c.injector.held(dest, head, &c.placeholder) {
            Held::Placeholder => InSlot::Placeholder,
            Held::Presented(Some(v)) if crate::token::looks_like_token(&v) => {
                InSlot::Token(tokens.signed(&v))
            }
            Held::Presented(_) => InSlot::Other,
        }
    }

    /// The name of agent `index`, for logs.
    pub fn agent_name(&self, index: Option<usize>) -> Option<String> {
        index.map(|i| self.agents[i].name.clone())
    }
}

impl Config {
    /// The zero-config defaults (no file).
    pub fn defaults() -> Result<Config, ConfigError> {
        load(None)
    }

    /// `approvals.toml`: the hosts a person allowed or denied `always` (SPEC 10), beside
    /// the admin token (the config file's directory, else `ca_dir`).
    pub fn approvals_path(&self) -> PathBuf {
        let dir = self.admin_access.token_file.parent().map(Path::to_path_buf);
        let beside_config = self.file.as_deref().and_then(Path::parent).filter(|d| !d.as_os_str().is_empty());
        beside_config
            .map(Path::to_path_buf)
            .or(dir)
            .unwrap_or_else(|| self.proxy.ca_dir.clone())
            .join("approvals.toml")
    }

    pub fn ca_cert_path(&self) -> PathBuf {
        self.proxy.ca_dir.join("ca.crt")
    }

    pub fn bundle_path(&self) -> PathBuf {
        self.proxy.ca_dir.join("bundle.pem")
    }

    /// The address clients should use to reach the proxy.
    pub fn client_proxy_addr(&self) -> SocketAddr {
        let ip = match self.proxy.listen.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
            ip => ip,
        };
        SocketAddr::new(ip, self.proxy.listen.port())
    }

    /// The proxy URL clients should use: `https://` on a `[proxy] tls` port.
    pub fn client_proxy_url(&self) -> String {
        let scheme = if self.proxy.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.client_proxy_addr())
    }

    /// Every secret value of every usable credential (leak checks, redaction).
    pub fn secret_values(&self) -> Vec<crate::secrets::Secret> {
        let mut all = Vec::new();
        let active = self
            .credentials
            .iter()
            .zip(&self.policy.credentials)
            .filter(|(_, r)| r.state == CredState::Active);
        for (c, _) in active {
            c.injector.secrets(&mut all);
        }
        all
    }
}

/// `~/` expansion for paths in the config.
pub fn expand_home(raw: &str) -> std::path::PathBuf {
    match raw.strip_prefix("~/") {
        Some(rest) => home_dir().join(rest),
        None if raw == "~" => home_dir(),
        None => raw.into(),
    }
}

pub fn home_dir() -> std::path::PathBuf {
    std::env::var_os("HOME").map(Into::into).unwrap_or_else(|| "/".into())
}

#[cfg(test)]
mod tests;
