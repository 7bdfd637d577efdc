//! The command line (SPEC section 4).

mod approvals;
mod check;
mod env;
mod explain;
mod health;
mod jail;
mod providers;
mod run;
mod token;
mod transparent;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::ca::{CaOptions, CertAuthority};
use crate::config::{self, Config};

#[derive(Parser, Debug)]
#[command(
    name = "latchkey",
    version,
    about = "Credential-injecting egress proxy for AI agents",
    long_about = "Credential-injecting egress proxy for AI agents: the agent runs with placeholder keys, \
latchkey writes the real ones into its HTTPS requests.\n\nStart it with `latchkey run` (secrets in its \
environment), run the agent with `latchkey exec -- CMD`.",
    after_help = "Config lookup: --config, then $LATCHKEY_CONFIG, then $XDG_CONFIG_HOME/latchkey/config.toml \
(~/.config/latchkey/config.toml), else built-in defaults. Docs: README.md and docs/."
)]
pub struct Cli {
    /// Operational log level (overrides RUST_LOG): error, warn, info, debug, trace.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// `--config`, shared by every command that reads the config.
const CONFIG_HELP: &str =
    "Config file (default: $LATCHKEY_CONFIG, then ~/.config/latchkey/config.toml, else built-in defaults)";

/// `--scope` of `latchkey approvals`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ScopeArg {
    Once,
    Run,
    Always,
}

impl From<ScopeArg> for crate::approvals::Scope {
    fn from(s: ScopeArg) -> Self {
        match s {
            ScopeArg::Once => crate::approvals::Scope::Once,
            ScopeArg::Run => crate::approvals::Scope::Run,
            ScopeArg::Always => crate::approvals::Scope::Always,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy (secrets come from this process's environment and the config's sources).
    Run {
        #[arg(long, value_name = "PATH", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        /// Port to listen on, instead of [proxy] port (default 3128; 0 picks a free one).
        #[arg(long, value_name = "N")]
        port: Option<u16>,
        /// Address to listen on, instead of [proxy] bind (default 127.0.0.1; other
        /// addresses need [proxy] allowed_clients or [agents]).
        #[arg(long, value_name = "ADDR")]
        bind: Option<std::net::IpAddr>,
        /// Replace the CA with a new one before starting (clients must trust the new ca.crt).
        #[arg(long)]
        regenerate_ca: bool,
        /// Reload only on SIGHUP / `latchkey reload`, not when the config file changes.
        #[arg(long)]
        no_watch: bool,
    },
    /// Ask the running proxy to reload its config (SIGHUP to the pid in ca_dir).
    Reload {
        #[arg(long, value_name = "PATH", help = CONFIG_HELP)]
        config: Option<PathBuf>,
    },
    /// Run a command with the proxy environment and placeholders (no secrets); uses the
    /// latchkey running at the configured address, else starts one in-process. Exits
    /// with the command's status.
    Exec {
        #[arg(long, value_name = "PATH", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        /// Authenticate as this `[agents.NAME]` (its token goes into the proxy URL).
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
        /// Run CMD in a jail: its only way out is latchkey, and the secrets' sources are
        /// hidden from it (Linux; see docs/jail.md).
        #[arg(long)]
        jail: bool,
        /// With --jail: also replace this path by an empty, read-only one (repeatable).
        #[arg(long, requires = "jail", value_name = "PATH")]
        hide: Vec<PathBuf>,
        /// Give the command fresh scoped tokens instead of placeholders, each for its
        /// credential's hosts (and --agent), expiring after DURATION (30s, 5m, 2h, 1d).
        #[arg(long, value_name = "DURATION")]
        token_ttl: Option<String>,
        /// The command and its arguments (put `--` before them).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Print the client-side environment: proxy URL, CA bundle, placeholders (no secrets).
    /// Warns on stderr when no latchkey with this CA answers at the configured address.
    Env {
        #[arg(long, value_name = "PATH", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        /// Authenticate as this `[agents.NAME]` (its token goes into the proxy URL).
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
        /// Output format: sh (export lines), fish (set -gx), json (one object), dotenv.
        #[arg(long, value_enum, default_value = "sh")]
        format: env::Format,
        /// Proxy URL as seen by the client (e.g. http://latchkey:3128 inside a container).
        #[arg(long, value_name = "URL")]
        proxy_url: Option<String>,
        /// Path of the CA bundle as seen by the client (e.g. where it is mounted in a container).
        #[arg(long, value_name = "PATH")]
        ca_path: Option<PathBuf>,
    },
    /// Show the decision for one request (inject, pass, tunnel or block); secrets are
    /// named, never shown. Asks the running latchkey when one answers with this CA.
    Explain {
        #[arg(long, value_name = "PATH", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        /// Request method.
        #[arg(long, default_value = "GET", value_name = "M")]
        method: String,
        /// A request header, 'Name: value' (repeatable), e.g. the placeholder a client sends.
        #[arg(long = "header", short = 'H', value_name = "'NAME: VALUE'")]
        headers: Vec<String>,
        /// Decide as this `[agents.NAME]` would be treated.
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
        /// Print one JSON object: decision, credential, inject, reason, described, instance.
        #[arg(long)]
        json: bool,
        /// Decide from this shell's config even when a latchkey is running (e.g. to try an
        /// edit before reloading).
        #[arg(long)]
        local: bool,
        /// The request URL (http:// or https://).
        url: String,
    },
    /// Validate the config and list credentials (the running instance's state when one
    /// answers): exit 0 ok, 1 warnings, 2 invalid.
    Check {
        #[arg(long, value_name = "PATH", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        /// Report this shell's view of the credentials even when a latchkey is running.
        #[arg(long)]
        local: bool,
    },
    /// CA management: print its path, export the certificate, or replace it.
    Ca {
        #[arg(long, global = true, value_name = "PATH", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: CaAction,
    },
    /// Probe the admin endpoint (a container HEALTHCHECK, where the image has no curl):
    /// exit 0 when it answers 200, 1 when not, 2 when there is no admin endpoint to ask.
    Health {
        #[arg(long, value_name = "PATH", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        /// The admin address (default: $LATCHKEY_ADMIN_LISTEN, else the config's [admin] listen).
        #[arg(long, value_name = "IP:PORT")]
        admin: Option<std::net::SocketAddr>,
        /// What to probe: /readyz (ready to serve) or /healthz (alive).
        #[arg(long, default_value = "/readyz", value_name = "PATH")]
        path: String,
    },
    /// Print the built-in provider table: where each writes its secret, its variables and hosts.
    Providers,
    /// Print the nftables rules that send this network namespace's outbound TCP to
    /// `[proxy] transparent` (load them with `nft -f -`; needs NET_ADMIN, latchkey does not).
    TransparentRules {
        /// The port of `[proxy] transparent`.
        #[arg(long, value_name = "N", default_value_t = transparent::DEFAULT_PORT)]
        port: u16,
        /// latchkey's own uid, whose connections go out directly (default: this user's).
        #[arg(long, value_name = "UID")]
        exclude_uid: Option<u32>,
    },
    /// Pending approvals of the running instance (on_unlisted = "ask"): list, allow or
    /// deny them through its admin API, with the admin token.
    Approvals {
        #[arg(long, global = true, value_name = "PATH", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        /// How long an answer holds: once (the waiting requests), run (until latchkey
        /// restarts; allow only), always (written to approvals.toml).
        #[arg(long, global = true, value_enum, default_value = "once")]
        scope: ScopeArg,
        #[command(subcommand)]
        action: Option<approvals::ApprovalsAction>,
    },
    /// Allowlist tools: `suggest` prints an allowed_domains snippet from the request log.
    Allowlist {
        #[arg(long, global = true, value_name = "PATH", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: approvals::AllowlistAction,
    },
    /// Scoped tokens: mint, attenuate (offline), inspect, revoke, and the public key.
    Token {
        #[arg(long, global = true, value_name = "PATH", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: token::TokenAction,
    },
    /// Seal a secret (read on stdin) for this latchkey's seal.key, bound to --host(s):
    /// prints `lks1:...` for `sealed = "..."` in a config that is safe to commit.
    Seal(token::SealArgs),
    /// Request-log tools.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
}

#[derive(Subcommand, Debug)]
enum AuditAction {
    /// Check a request log's hash chain (and with --hmac-key, every line's HMAC): exit 0
    /// intact, 1 broken (first bad line shown).
    Verify {
        /// The request log (JSON lines, [proxy.logging] log_file).
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The key file of [proxy.logging] hmac_key_file, to check every line's HMAC.
        #[arg(long, value_name = "PATH")]
        hmac_key: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum CaAction {
    /// Print the path of ca.crt.
    Path,
    /// Print ca.crt (PEM). The key is never exported.
    Export,
    /// Replace the CA (clients must trust the new ca.crt).
    Regenerate,
}

pub fn main() -> ExitCode {
    harden_process();
    let _ = crate::ca::crypto_provider().install_default();
    let cli = Cli::parse();
    init_tracing(cli.log_level.as_deref());
    match cli.command {
        Command::Run { config, port, bind, regenerate_ca, no_watch } => {
            run::run(config, port, bind, regenerate_ca, !no_watch)
        }
        Command::Exec { config, agent, jail: true, hide, token_ttl, command } => {
            jail::exec(config, agent, hide, token_ttl, command)
        }
        Command::Exec { config, agent, token_ttl, command, .. } => {
            run::exec(config, agent, token_ttl, command)
        }
        Command::Reload { config } => run::reload(config),
        Command::Env { config, agent, format, proxy_url, ca_path } => {
            env::env(config, agent, format, proxy_url, ca_path)
        }
        Command::Explain { config, method, headers, agent, json, local, url } => {
            explain::explain(config, explain::Args { method, headers, agent, json, local, url })
        }
        Command::Check { config, local } => check::check(config, local),
        Command::Ca { config, action } => ca(config, action),
        Command::Providers => providers::providers(),
        Command::TransparentRules { port, exclude_uid } => transparent::print(port, exclude_uid),
        Command::Approvals { config, scope, action } => approvals::approvals(config, action, scope.into()),
        Command::Allowlist { config, action } => approvals::allowlist(config, action),
        Command::Health { config, admin, path } => health::health(config, admin, &path),
        Command::Token { config, action } => token::token(config, action),
        Command::Seal(args) => token::seal(args),
        Command::Audit { action: AuditAction::Verify { file, hmac_key } } => {
            audit_verify(&file, hmac_key.as_deref())
        }
    }
}

/// Core dumps and ptrace-by-same-user would hand secrets to the agent (invariant 11).
fn harden_process() {
    // SAFETY: plain syscalls with constant arguments.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        libc::setrlimit(libc::RLIMIT_CORE, &none);
    }
}

fn init_tracing(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let base =
        level.map(str::to_string).or_else(|| std::env::var("RUST_LOG").ok()).unwrap_or_else(|| "info".into());
    // Dependencies never log above info: their debug output can carry header values.
    let mut filter = EnvFilter::try_new(&base).unwrap_or_else(|_| EnvFilter::new("info"));
    for dep in ["hyper", "hyper_util", "rustls", "tokio_rustls", "h2", "tower", "mio"] {
        if let Ok(d) = format!("{dep}=info").parse() {
            filter = filter.add_directive(d);
        }
    }
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

/// Load the config or explain why not (exit 2).
/// What `exec` and `exec --jail` start from: the config, the CA, and the child's
/// variables — the proxy at `proxy_url` (the configured address when `None`), with the
/// agent's credentials in it when `--agent` names one, and with `--token-ttl` fresh
/// scoped tokens in place of the placeholders.
pub(crate) struct ChildStart {
    pub config: Config,
    pub ca: Arc<CertAuthority>,
    pub vars: Vec<(String, String)>,
    /// The credentials active in the latchkey already running with this CA, if one answers.
    pub running: Option<Vec<String>>,
}

pub(crate) fn child_start(
    path: Option<PathBuf>,
    agent: Option<&str>,
    token_ttl: Option<&str>,
    proxy_url: impl FnOnce(&Config) -> Option<String>,
) -> Result<ChildStart, ExitCode> {
    let config = load_config(path)?;
    let token_ttl = token_ttl.map(crate::token::parse_duration).transpose().map_err(|e| {
        eprintln!("latchkey: --token-ttl {e}");
        ExitCode::from(2)
    })?;
    let ca = open_ca(&config, false)?;
    let mut url = proxy_url(&config);
    env::with_agent(&config, agent, &mut url)?;
    let running = running_active(&config);
    let mut vars = env::client_env(&config, running.as_deref(), url.clone(), None);
    if let Some(ttl) = token_ttl {
        token::exec_tokens(&config, &mut vars, ttl, agent, url.as_deref(), running.as_deref()).map_err(
            |e| {
                eprintln!("latchkey: {e}");
                ExitCode::from(1)
            },
        )?;
    }
    Ok(ChildStart { config, ca, vars, running })
}

pub(crate) fn load_config(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    let found = config::find_config(path.as_deref()).map_err(config_error)?;
    let config = config::load(found.as_deref()).map_err(config_error)?;
    if config.proxy.tls {
        // One config per command: the local queries below speak TLS to a `[proxy] tls`
        // port, trusting this config's CA.
        let _ = LOCAL_TLS_CA.set(config.ca_cert_path());
    }
    Ok(config)
}

/// The CA to trust when asking the local latchkey over TLS (`[proxy] tls = true`).
static LOCAL_TLS_CA: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn config_error(e: config::ConfigError) -> ExitCode {
    eprintln!("latchkey: config error: {e}");
    ExitCode::from(2)
}

pub(crate) fn open_ca(config: &Config, regenerate: bool) -> Result<Arc<CertAuthority>, ExitCode> {
    let opts = CaOptions {
        dir: &config.proxy.ca_dir,
        generate: config.proxy.generate_certs,
        lifetime_days: config.proxy.ca_lifetime_days,
        regenerate,
    };
    CertAuthority::open(&opts, provider()).map(Arc::new).map_err(|e| {
        eprintln!("latchkey: CA error: {e}");
        ExitCode::from(2)
    })
}

/// GET `path` from a local latchkey at `addr`, over plain HTTP/1.1 with short timeouts:
/// the status and body.
pub(crate) fn fetch_local_status(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(2);
    let s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    let mut s: Box<dyn ReadWrite> = match LOCAL_TLS_CA.get() {
        Some(ca) => Box::new(local_tls(s, addr, ca)?),
        None => Box::new(s),
    };
    write!(s, "GET {path} HTTP/1.1\r\nHost: latchkey\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    // A TLS peer may close without close_notify once the body is complete.
    if let Err(e) = s.read_to_end(&mut buf)
        && (buf.is_empty() || e.kind() != std::io::ErrorKind::UnexpectedEof)
    {
        return None;
    }
    let text = String::from_utf8(buf).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some((status, body.to_string()))
}

trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// A TLS client for the local `[proxy] tls` port, trusting only latchkey's CA.
fn local_tls(
    tcp: std::net::TcpStream,
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
) -> Option<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_file(ca).ok()?).ok()?;
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).ok()?;
    Some(rustls::StreamOwned::new(conn, tcp))
}

/// GET `path` from a local latchkey: the body of a 200.
pub(crate) fn fetch_local(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    fetch_local_status(addr, path).filter(|(status, _)| *status == 200).map(|(_, body)| body)
}

/// The address of the latchkey running at the configured address, if it is ours (it
/// serves this config's CA). `None` when nothing of ours answers there.
pub(crate) fn running_instance(config: &Config) -> Option<std::net::SocketAddr> {
    let ca = std::fs::read_to_string(config.ca_cert_path()).ok()?;
    let addr = config.client_proxy_addr();
    let served = fetch_local(addr, "/ca.crt")?;
    (served.trim() == ca.trim()).then_some(addr)
}

/// The credential names active in the latchkey running at the configured address.
pub(crate) fn running_active(config: &Config) -> Option<Vec<String>> {
    let addr = running_instance(config)?;
    Some(fetch_local(addr, "/latchkey/active")?.lines().map(str::to_string).collect())
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(crate::ca::crypto_provider()))
}

fn ca(config: Option<PathBuf>, action: CaAction) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match action {
        CaAction::Path => println!("{}", config.ca_cert_path().display()),
        CaAction::Export => match open_ca(&config, false) {
            Ok(ca) => print!("{}", ca.cert_pem()),
            Err(code) => return code,
        },
        CaAction::Regenerate => match open_ca(&config, true) {
            Ok(_) => {
                println!("{}", config.ca_cert_path().display());
                eprintln!(
                    "latchkey: new CA written; clients must trust the new ca.crt (run `latchkey env` again)"
                );
            }
            Err(code) => return code,
        },
    }
    ExitCode::SUCCESS
}

fn audit_verify(file: &std::path::Path, hmac_key: Option<&std::path::Path>) -> ExitCode {
    let key = match hmac_key.map(crate::telemetry::audit::read_hmac_key) {
        Some(Err(e)) => {
            eprintln!("latchkey: {e}");
            return ExitCode::from(2);
        }
        Some(Ok(k)) => Some(k),
        None => None,
    };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("latchkey: {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    match crate::telemetry::audit::verify(&text, key.as_deref()) {
        Ok(n) => {
            let signed = if key.is_some() { ", every HMAC valid" } else { "" };
            println!("{}: chain intact ({n} lines{signed})", file.display());
            ExitCode::SUCCESS
        }
        Err((line, why)) => {
            println!("{}:{line}: chain broken: {why}", file.display());
            ExitCode::from(1)
        }
    }
}
