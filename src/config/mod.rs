//! Configuration: find the file, parse it (unknown keys are errors), resolve secrets,
//! and compile it into one immutable `Config` that the proxy swaps whole.

pub mod envvars;
mod locate;
pub mod raw;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indexmap::IndexMap;
use ipnet::IpNet;

use crate::fsutil::expand_home;
use crate::inject::{HeaderInjector, HeaderSlot, HeaderValueSource, Injector, QueryInjector};
use crate::policy::{
    ContentFilter, CredState, CredentialRule, Destination, Filters, Pattern, Policy, canonical_prefix,
};
use crate::secrets::{Resolved, SecretValue, Source, Template};
use raw::{RawConfig, RawCredential};

/// The built-in provider table (SPEC section 5), kept as data.
pub const PROVIDERS_TOML: &str = include_str!("../providers.toml");

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
    /// `[proxy] tls`: the proxy port speaks TLS; the names its certificate covers.
    pub tls: bool,
    pub tls_names: Vec<String>,
    /// `[proxy] ca_export_dir`: where the public half of the CA is copied for agents.
    pub ca_export_dir: Option<PathBuf>,
    pub log_requests: bool,
    pub log_file: PathBuf,
    pub hmac_key_file: Option<PathBuf>,
    pub limits: Limits,
}

#[derive(Debug, Clone, Default)]
pub struct UpstreamSettings {
    pub ca_file: Option<PathBuf>,
    /// `host:port` → address, like curl --resolve.
    pub resolve: HashMap<Destination, SocketAddr>,
}

/// A credential as the proxy uses it. Its routing lives in `policy.credentials[i]`.
#[derive(Debug)]
pub struct Credential {
    pub name: String,
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
    /// Refuse requests whose slot holds no valid scoped token (`crate::token::gate`).
    pub require_token: bool,
    pub builtin: bool,
    pub auth_type: String,
    /// Client certificate and/or extra roots for this credential's upstream connections.
    pub tls: Option<std::sync::Arc<crate::secrets::ClientTls>>,
    /// Masks this credential's secrets in the responses to its requests; shared with the
    /// same-named credential of the next config on reload (rotated values stay masked).
    pub redactor: std::sync::Arc<crate::redact::Cache>,
    pub limits: crate::limits::Limits,
}

#[derive(Debug)]
pub struct Config {
    pub file: Option<PathBuf>,
    pub proxy: ProxySettings,
    pub upstream: UpstreamSettings,
    pub admin: Option<SocketAddr>,
    pub policy: Policy,
    pub credentials: Vec<Credential>,
    /// Variables present at load that capture templates may use (listed by `check`).
    pub capture_variables: Vec<String>,
    /// Client identities; when any exists, every client must authenticate (407).
    pub agents: Vec<Agent>,
    pub telemetry: Telemetry,
    pub jail: JailSettings,
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

/// A client identity from `[agents.NAME]`.
#[derive(Debug)]
pub struct Agent {
    pub name: String,
    pub token: Option<crate::secrets::Secret>,
    /// Variables the token is read from (scrubbed from every `exec` child).
    pub reads: Vec<String>,
    /// Credential indexes it may use; `None`: all.
    pub credentials: Option<Vec<usize>>,
    pub allowed: Vec<Pattern>,
    pub limits: crate::limits::Limits,
    /// Client certificates (SHA-256 of the DER) that identify this agent.
    pub client_certs: Vec<[u8; 32]>,
    /// A CA whose client certificates identify this agent.
    pub client_ca: Option<crate::proxy::identity::ClientCa>,
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
        .unwrap_or_else(|| crate::fsutil::home_dir().join(".config"));
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
            crate::fsutil::owner_only_writable(&meta)
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
            tls: p.tls,
            tls_names: p.tls_names.clone(),
            ca_export_dir: p.ca_export_dir.as_deref().map(expand_home),
            log_requests: p.logging.log_requests,
            log_file: expand_home(&p.logging.log_file),
            hmac_key_file: p.logging.hmac_key_file.as_deref().map(expand_home),
            limits,
        };
        let filters = self.filters(&raw.proxy.filters)?;
        let upstream = self.upstream(&raw.upstream)?;
        let admin = match raw.admin.as_ref().and_then(|a| a.listen.as_deref()) {
            None => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|_| self.err(&["admin"], None, "listen", format!("{s:?} is not ip:port")))?,
            ),
        };

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
        let agents = self.agents(&raw.agents, &credentials, raw.proxy.tls)?;
        self.check_command_env(&credentials, &agents)?;
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
            policy: Policy { credentials: rules, filters, intercept_all, capture_variables: present },
            credentials,
            capture_variables,
            agents,
            telemetry,
            jail,
        })
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
    ) -> Result<Vec<Agent>, ConfigError> {
        let mut out = Vec::new();
        for (name, spanned) in raw {
            let span = Some(spanned.span());
            let a = spanned.get_ref();
            let e = |key: &str, msg: String| self.err(&["agents", name], span.clone(), key, msg);
            let (client_certs, client_ca) = self.agent_certs(name, a, span.clone(), tls)?;
            let by_cert = !client_certs.is_empty() || client_ca.is_some();
            let source = match (&a.token, &a.token_file) {
                (Some(t), None) => Some(Source::Value(Template::parse(t).map_err(|x| e("token", x))?)),
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
            out.push(Agent {
                name: name.clone(),
                token,
                reads,
                credentials,
                allowed,
                limits,
                client_certs,
                client_ca,
            });
        }
        self.check_cert_identities(raw, &out)?;
        Ok(out)
    }

    /// `client_cert_sha256` and `client_ca`: the certificates that identify an agent.
    fn agent_certs(
        &self,
        name: &str,
        a: &raw::RawAgent,
        span: Option<std::ops::Range<usize>>,
        tls: bool,
    ) -> Result<(Vec<[u8; 32]>, Option<crate::proxy::identity::ClientCa>), ConfigError> {
        let e = |key: &str, msg: String| self.err(&["agents", name], span.clone(), key, msg);
        let prints = a.client_cert_sha256.clone().map(raw::OneOrMany::into_vec).unwrap_or_default();
        let client_certs = prints
            .iter()
            .map(|p| {
                crate::proxy::identity::parse_sha256(p).ok_or_else(|| {
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
                crate::proxy::identity::ClientCa::load(&expand_home(path)).map_err(|x| e("client_ca", x))?,
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
        Ok(Filters {
            blocked: patterns(&f.blocked_domains, "blocked_domains")?,
            allowlist_only: f.allowlist_only,
            allowed: patterns(&f.allowed_domains, "allowed_domains")?,
            content: ContentFilter::new(&f.blocked_patterns)
                .map_err(|e| self.err(&t, None, "blocked_patterns", e))?,
        })
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
        Ok(UpstreamSettings { ca_file: u.ca_file.as_deref().map(expand_home), resolve })
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
        let secrets_dir = dirs.secrets.as_path();
        let table = ["credentials", name];
        let e = |key: &str, msg: String| self.err(&table, span.clone(), key, msg);
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
            .map(|p| canonical_prefix(p).map_err(|x| e("paths", x)))
            .collect::<Result<Vec<_>, _>>()?;
        let except_paths = c
            .except_paths
            .iter()
            .map(|p| crate::policy::PathPattern::parse(p).map_err(|x| e("except_paths", x)))
            .collect::<Result<Vec<_>, _>>()?;
        let methods: Vec<String> = c.methods.iter().map(|m| m.to_ascii_uppercase()).collect();
        if let Some(m) = methods.iter().find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()))
        {
            return Err(e("methods", format!("{m:?} is not an HTTP method")));
        }
        if c.ports.contains(&0) {
            return Err(e("ports", "port 0 is not a port".into()));
        }

        let auth_type = match (&c.auth_type, &c.header) {
            (Some(t), _) => t.clone(),
            (None, Some(_)) => "header".into(),
            (None, None) => return Err(e("auth_type", "set `header` or `auth_type`".into())),
        };
        // Tokens and sealed values go where a placeholder or `value` does.
        let slotted = matches!(auth_type.as_str(), "header" | "bearer" | "basic" | "query");
        if c.sealed.is_some() && !slotted {
            return Err(e(
                "sealed",
                format!("auth_type {auth_type:?} takes no sealed value (header, bearer, basic and query do)"),
            ));
        }
        if c.require_token && !slotted {
            return Err(e(
                "require_token",
                format!("auth_type {auth_type:?} has no slot a token could go in"),
            ));
        }
        if let Some(blob) = &c.sealed {
            check_sealed(blob, &patterns, &c.ports, &dirs.keys).map_err(|x| e("sealed", x))?;
        }
        let template = |key: &str, v: &str| Template::parse(v).map_err(|x| e(key, x));
        let source =
            |c: &RawCredential, value_key: &str, value: Option<&String>| -> Result<Source, ConfigError> {
                let given =
                    [value.is_some(), c.value_file.is_some(), c.value_command.is_some(), c.sealed.is_some()];
                match given.iter().filter(|g| **g).count() {
                    1 => {}
                    0 => {
                        return Err(e(
                            value_key,
                            format!("set one of `{value_key}`, `value_file`, `value_command`, `sealed`"),
                        ));
                    }
                    _ => {
                        return Err(e(
                            value_key,
                            format!("set only one of `{value_key}`, `value_file`, `value_command`, `sealed`"),
                        ));
                    }
                }
                Ok(if let Some(v) = value {
                    Source::Value(template(value_key, v)?)
                } else if let Some(blob) = &c.sealed {
                    let sealed = crate::seal::parse(blob).map_err(|x| e("sealed", x))?;
                    Source::Sealed { sealed: Box::new(sealed), key_dir: dirs.keys.clone() }
                } else if let Some(f) = &c.value_file {
                    Source::File(expand_home(f))
                } else {
                    let argv = c.value_command.clone().unwrap_or_default();
                    if argv.is_empty() {
                        return Err(e("value_command", "the command is empty".into()));
                    }
                    Source::Command(crate::secrets::CommandSpec {
                        argv,
                        ttl: c.value_command_ttl.map(Duration::from_secs),
                        env: c.value_command_env.clone(),
                    })
                })
            };
        let slots = |default: &str, prefix: Option<&str>| -> Result<Vec<HeaderSlot>, ConfigError> {
            let names = c.header.clone().map(|h| h.into_vec()).unwrap_or_else(|| vec![default.to_string()]);
            if names.is_empty() {
                return Err(e("header", "name at least one header".into()));
            }
            names
                .iter()
                .map(|n| {
                    let mut slot = HeaderSlot::parse(n).map_err(|x| e("header", x))?;
                    if slot.prefix.is_none() {
                        slot.prefix = prefix.map(str::to_string);
                    }
                    Ok(slot)
                })
                .collect()
        };

        if !c.value_command_env.is_empty() && c.value_command.is_none() {
            return Err(e("value_command_env", "only a value_command takes value_command_env".into()));
        }
        let mut reads = Vec::new();
        let mut captures = Vec::new();
        let mut state = CredState::Active;
        let mut sources = Vec::new();
        let mut resolve = |src: &Source| -> Option<SecretValue> {
            if let Source::Value(t) = src {
                reads.extend(t.variables());
                captures.extend(t.capture_refs());
            }
            match with_secrets_dir(
                src.resolve(self.env, self.vars),
                src,
                secrets_dir,
                c.secret_file.as_deref(),
            ) {
                Resolved::Ready(v) => {
                    sources.push(v.clone());
                    Some(v)
                }
                Resolved::Missing(why) => {
                    if state == CredState::Active {
                        state = CredState::Inactive(why);
                    }
                    None
                }
                Resolved::Failed(why) => {
                    state = CredState::Failed(why);
                    None
                }
            }
        };
        let placeholder_dummy = || SecretValue::Static(crate::secrets::Secret::new("unset".into()));

        let (injector, primary, inline): (Box<dyn Injector>, Source, bool) = match auth_type.as_str() {
            "header" | "bearer" => {
                if auth_type == "header" && c.header.is_none() {
                    return Err(e("header", "auth_type \"header\" needs `header`".into()));
                }
                let prefix = (auth_type == "bearer").then_some("Bearer");
                let slots = slots("Authorization", prefix)?;
                let src = source(&c, "value", c.value.as_ref())?;
                let v = resolve(&src).unwrap_or_else(placeholder_dummy);
                let inj = HeaderInjector::new(slots, HeaderValueSource::Raw(v)).map_err(|x| e("value", x))?;
                let inline = matches!(&src, Source::Value(t) if t.is_inline());
                (Box::new(inj), src, inline)
            }
            "basic" => {
                let user =
                    c.username.clone().ok_or_else(|| e("username", "basic auth needs `username`".into()))?;
                let user_src = Source::Value(template("username", &user)?);
                let username = resolve(&user_src).unwrap_or_else(placeholder_dummy);
                if c.value.is_some() {
                    return Err(e(
                        "value",
                        "basic auth takes `password` (or value_file / value_command)".into(),
                    ));
                }
                let src = source(&c, "password", c.password.as_ref())?;
                let password = resolve(&src).unwrap_or_else(placeholder_dummy);
                let slots = slots("Authorization", Some("Basic"))?;
                let inj = HeaderInjector::new(slots, HeaderValueSource::Basic { username, password })
                    .map_err(|x| e("password", x))?;
                let inline = matches!(&src, Source::Value(t) if t.is_inline());
                (Box::new(inj), src, inline)
            }
            "query" => {
                let param = c.param.clone().ok_or_else(|| e("param", "query auth needs `param`".into()))?;
                if c.header.is_some() {
                    return Err(e("header", "query auth writes `param`, not a header".into()));
                }
                let src = source(&c, "value", c.value.as_ref())?;
                let v = resolve(&src).unwrap_or_else(placeholder_dummy);
                let inline = matches!(&src, Source::Value(t) if t.is_inline());
                (Box::new(QueryInjector::new(param, v)), src, inline)
            }
            "mtls" => {
                if c.client_cert.is_none() || c.client_key.is_none() {
                    return Err(e(
                        "client_cert",
                        "auth_type \"mtls\" needs client_cert and client_key".into(),
                    ));
                }
                let cert = Source::File(expand_home(c.client_cert.as_deref().unwrap_or_default()));
                (Box::new(crate::inject::NoInjection), cert, false)
            }
            "aws_sigv4" => {
                if c.value.is_some() || c.header.is_some() {
                    return Err(e("value", "aws_sigv4 takes access_key_id and secret_access_key".into()));
                }
                let need = |key: &str, v: &Option<String>| -> Result<Source, ConfigError> {
                    let v = v.as_deref().ok_or_else(|| e(key, format!("aws_sigv4 needs `{key}`")))?;
                    Ok(Source::Value(template(key, v)?))
                };
                let akid_src = need("access_key_id", &c.access_key_id)?;
                let secret_src = need("secret_access_key", &c.secret_access_key)?;
                let token_src = match &c.session_token {
                    Some(v) => Some(Source::Value(template("session_token", v)?)),
                    None => None,
                };
                let access_key_id = resolve(&akid_src).unwrap_or_else(placeholder_dummy);
                let secret_access_key = resolve(&secret_src).unwrap_or_else(placeholder_dummy);
                // The session token is optional: an unset variable means "no token".
                let session_token = match &token_src {
                    Some(src @ Source::Value(t)) => match src.resolve(self.env, self.vars) {
                        Resolved::Ready(v) => {
                            sources.push(v.clone());
                            Some(v)
                        }
                        Resolved::Missing(_) if !t.is_inline() => None,
                        _ => return Err(e("session_token", "cannot be resolved".into())),
                    },
                    _ => None,
                };
                let inline = matches!(&secret_src, Source::Value(t) if t.is_inline());
                let injector = crate::inject::sigv4::SigV4Injector {
                    access_key_id,
                    secret_access_key,
                    session_token,
                    region: c.region.clone(),
                    service: c.service.clone(),
                    max_body: c.max_signed_body.unwrap_or(32 * 1024 * 1024),
                };
                (Box::new(injector), secret_src, inline)
            }
            "gcp" => {
                if c.value.is_some() || c.header.is_some() {
                    return Err(e(
                        "value",
                        "gcp mints its own tokens: set credentials_file (or nothing, for ADC)".into(),
                    ));
                }
                let path = match &c.credentials_file {
                    Some(p) => Some(expand_home(p)),
                    None => crate::inject::gcp::discover_adc(self.env),
                };
                let file = Source::File(path.clone().unwrap_or_default());
                let source = match path {
                    Some(p) if p.exists() => match std::fs::metadata(&p)
                        .map_err(|e| e.to_string())
                        .and_then(|m| {
                            crate::fsutil::owner_only_writable(&m).map_err(|w| format!("{} {w}", p.display()))
                        })
                        .and_then(|_| crate::inject::gcp::TokenSource::from_file(&p, &c.scopes))
                    {
                        Ok(ts) => Some(std::sync::Arc::new(ts)),
                        Err(why) => {
                            state = CredState::Failed(why);
                            None
                        }
                    },
                    Some(p) => {
                        state = CredState::Inactive(format!("{} does not exist", p.display()));
                        None
                    }
                    None => {
                        state = CredState::Inactive("no Google credentials found".into());
                        None
                    }
                };
                let injector: Box<dyn Injector> = match source {
                    Some(source) => Box::new(crate::inject::gcp::GcpInjector { source }),
                    None => Box::new(crate::inject::NoInjection),
                };
                (injector, file, false)
            }
            other => {
                return Err(e(
                    "auth_type",
                    format!("{other:?}: expected header, bearer, basic, query, mtls or aws_sigv4"),
                ));
            }
        };

        if let Some(t) = c.session_token.as_deref().and_then(|v| Template::parse(v).ok()) {
            reads.extend(t.variables());
        }
        let tls = match (&c.client_cert, &c.client_key, &c.upstream_ca) {
            (None, None, None) => None,
            (cert, key, ca) => {
                let path = |p: &Option<String>| p.as_deref().map(expand_home);
                let (cert, key, ca) = (path(cert), path(key), path(ca));
                match crate::secrets::ClientTls::load(cert.as_deref(), key.as_deref(), ca.as_deref()) {
                    Ok(t) => Some(std::sync::Arc::new(t)),
                    Err(crate::secrets::TlsLoadError::Missing(why)) => {
                        if state == CredState::Active {
                            state = CredState::Inactive(why);
                        }
                        None
                    }
                    Err(crate::secrets::TlsLoadError::Failed(why)) => {
                        state = CredState::Failed(why);
                        None
                    }
                }
            }
        };
        let env = match c.env.clone() {
            Some(list) => list.into_vec(),
            None => match &primary {
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
        let rule = CredentialRule {
            name: name.to_string(),
            patterns,
            paths,
            methods,
            ports: c.ports.clone(),
            allow_http: c.allow_http,
            allowed_origins: c.allowed_origins.clone(),
            require_placeholder: c.require_placeholder,
            except_paths,
            state,
            captures,
        };
        let cred = Credential {
            name: name.to_string(),
            injector,
            placeholder,
            env,
            reads,
            command_env: c.value_command_env.clone(),
            sources,
            source: primary.describe(),
            inline_secret: inline,
            pass_cookies: c.pass_cookies,
            require_token: c.require_token,
            builtin,
            auth_type,
            tls,
            redactor: Default::default(),
            limits: crate::limits::Limits {
                requests_per_minute: c.requests_per_minute,
                tokens_per_day: c.tokens_per_day,
            },
        };
        Ok((rule, cred))
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

/// Directories secret sources read: `secrets_dir`, and the CA directory (`seal.key`).
struct SourceDirs {
    secrets: PathBuf,
    keys: PathBuf,
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

/// Seed 001's convention: a `${VAR}` credential whose variable is unset reads
/// `<secrets_dir>/<var in lowercase>` (or the provider's `secret_file`) when it exists.
fn with_secrets_dir(resolved: Resolved, src: &Source, dir: &Path, hint: Option<&str>) -> Resolved {
    let (Resolved::Missing(_), Source::Value(t)) = (&resolved, src) else { return resolved };
    let Some(names) = t.only_variables() else { return resolved };
    let candidates = hint.into_iter().map(str::to_string).chain(names.iter().map(|n| n.to_ascii_lowercase()));
    match candidates.map(|f| dir.join(f)).find(|p| p.is_file()) {
        Some(path) => Source::File(path).resolve(&|_| None, &[]),
        None => resolved,
    }
}

fn parse_cidr(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// The built-in providers, in table order.
pub fn builtin_providers() -> IndexMap<String, RawCredential> {
    toml::from_str(PROVIDERS_TOML).expect("the embedded provider table parses")
}

impl Config {
    /// The zero-config defaults (no file).
    pub fn defaults() -> Result<Config, ConfigError> {
        load(None)
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
        self.credentials
            .iter()
            .zip(&self.policy.credentials)
            .filter(|(_, r)| r.state == CredState::Active)
            .flat_map(|(c, _)| c.injector.secrets())
            .collect()
    }
}

#[cfg(test)]
mod tests;
