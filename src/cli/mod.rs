//! The command line (SPEC section 4).

mod check;
mod env;
mod explain;
mod jail;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::ca::{CaOptions, CertAuthority};
use crate::config::{self, Config};

#[derive(Parser, Debug)]
#[command(name = "latchkey", version, about = "Credential-injecting egress proxy for AI agents")]
pub struct Cli {
    /// Operational log level (overrides RUST_LOG): error, warn, info, debug, trace.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        port: Option<u16>,
        #[arg(long)]
        bind: Option<std::net::IpAddr>,
        /// Replace the CA with a new one before starting.
        #[arg(long)]
        regenerate_ca: bool,
        /// Reload only on SIGHUP / `latchkey reload`, not when the config file changes.
        #[arg(long)]
        no_watch: bool,
    },
    /// Ask the running proxy to reload its config (SIGHUP to the pid in ca_dir).
    Reload {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run a command with the proxy environment and placeholders; exits with its status.
    Exec {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Authenticate as this `[agents.NAME]` (its token goes into the proxy URL).
        #[arg(long)]
        agent: Option<String>,
        /// Run CMD in a jail: its only way out is latchkey, and the secrets' sources are
        /// hidden from it (Linux; see docs/jail.md).
        #[arg(long)]
        jail: bool,
        /// With --jail: also replace this path by an empty, read-only one (repeatable).
        #[arg(long, requires = "jail", value_name = "PATH")]
        hide: Vec<PathBuf>,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Print the client-side environment (no secrets).
    Env {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Authenticate as this `[agents.NAME]` (its token goes into the proxy URL).
        #[arg(long)]
        agent: Option<String>,
        #[arg(long, value_enum, default_value = "sh")]
        format: env::Format,
        /// Proxy URL as seen by the client (e.g. inside a container).
        #[arg(long)]
        proxy_url: Option<String>,
        /// Path of the CA bundle as seen by the client.
        #[arg(long)]
        ca_path: Option<PathBuf>,
    },
    /// Show the decision for one request; secrets are named, never shown.
    Explain {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "GET")]
        method: String,
        /// A request header, 'Name: value' (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        #[arg(long)]
        json: bool,
        url: String,
    },
    /// Validate the config: exit 0 ok, 1 warnings, 2 invalid.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// CA management.
    Ca {
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: CaAction,
    },
    /// Print the built-in provider table.
    Providers,
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
        file: PathBuf,
        #[arg(long)]
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
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    init_tracing(cli.log_level.as_deref());
    match cli.command {
        Command::Run { config, port, bind, regenerate_ca, no_watch } => {
            run::run(config, port, bind, regenerate_ca, !no_watch)
        }
        Command::Exec { config, agent, jail: true, hide, command } => {
            jail::exec(config, agent, hide, command)
        }
        Command::Exec { config, agent, command, .. } => run::exec(config, agent, command),
        Command::Reload { config } => run::reload(config),
        Command::Env { config, agent, format, proxy_url, ca_path } => {
            env::env(config, agent, format, proxy_url, ca_path)
        }
        Command::Explain { config, method, headers, json, url } => {
            explain::explain(config, &method, &headers, json, &url)
        }
        Command::Check { config } => check::check(config),
        Command::Ca { config, action } => ca(config, action),
        Command::Providers => providers(),
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
pub(crate) fn load_config(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    let found = config::find_config(path.as_deref()).map_err(config_error)?;
    config::load(found.as_deref()).map_err(config_error)
}

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

/// GET `path` from a local latchkey at `addr`, over plain HTTP/1.1 with short timeouts.
pub(crate) fn fetch_local(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: latchkey\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8(buf).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The credential names active in the latchkey running at the configured address, if
/// it is ours (same CA). `None` when nothing of ours answers there.
pub(crate) fn running_active(config: &Config) -> Option<Vec<String>> {
    let ca = std::fs::read_to_string(config.ca_cert_path()).ok()?;
    let addr = config.client_proxy_addr();
    let served = fetch_local(addr, "/ca.crt")?;
    if served.trim() != ca.trim() {
        return None;
    }
    Some(fetch_local(addr, "/latchkey/active")?.lines().map(str::to_string).collect())
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
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
    let key = match hmac_key.map(crate::audit::read_hmac_key) {
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
    match crate::audit::verify(&text, key.as_deref()) {
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

fn providers() -> ExitCode {
    // Placeholders as a config would assign them (shared variables share one).
    let compiled = config::compile("", None, &|_| None, &[]).ok();
    let placeholder = |name: &str| {
        compiled
            .as_ref()
            .and_then(|c| c.credentials.iter().find(|c| c.name == name))
            .map(|c| c.placeholder.clone())
            .unwrap_or_else(|| "-".into())
    };
    println!("{:<13} {:<34} {:<7} {:<38} {:<52} placeholder", "name", "provider", "auth", "env", "domains");
    for (name, p) in config::builtin_providers() {
        let auth = p.auth_type.clone().unwrap_or_else(|| "header".into());
        let env = p.env.clone().map(|e| e.into_vec()).unwrap_or_else(|| {
            p.value
                .as_deref()
                .and_then(|v| crate::secrets::Template::parse(v).ok())
                .and_then(|t| t.sole_variable().map(str::to_string))
                .into_iter()
                .collect()
        });
        let domains =
            if p.domains.is_empty() { "(your cluster hosts)".to_string() } else { p.domains.join(",") };
        println!(
            "{:<13} {:<34} {:<7} {:<38} {:<52} {}",
            name,
            p.provider.as_deref().unwrap_or(""),
            auth,
            env.join(","),
            domains,
            placeholder(&name)
        );
    }
    ExitCode::SUCCESS
}
