//! `latchkey run` and `latchkey exec`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use super::{load_config, open_ca, provider};
use crate::ca::CertAuthority;
use crate::config::Config;
use crate::policy::CredState;
use crate::proxy::Proxy;

/// A listener for clients, with room for `BACKLOG` connections the kernel has
/// completed and latchkey not yet accepted: the accept loop shares a shard with the
/// connections it serves, and 10,000 clients connecting at once overflowed tokio's
/// default of 128 (dropped SYNs, retried a second or more later).
fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// The kernel caps it at `net.core.somaxconn` (4,096 on current kernels).
const BACKLOG: u32 = 4096;

/// The main runtime: accept loops, the admin listener, reloads and other background
/// work. Connections are served on the shards (`proxy::shards`), so one worker is
/// enough here.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("tokio runtime")
}

pub fn run(
    config: Option<PathBuf>,
    port: Option<u16>,
    bind: Option<IpAddr>,
    regenerate_ca: bool,
    watch_file: bool,
) -> ExitCode {
    let started = Instant::now();
    let overrides = Overrides { port, bind };
    let mut config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    overrides.apply(&mut config);
    if !config.proxy.listen.ip().is_loopback()
        && config.proxy.allowed_clients.is_empty()
        && config.agents.is_empty()
    {
        eprintln!(
            "latchkey: config error: binding to {} (not loopback) needs [proxy] allowed_clients or [agents]: latchkey will not run an open credential proxy",
            config.proxy.listen.ip()
        );
        return ExitCode::from(2);
    }
    if config.proxy.mlock && !lock_memory() {
        return ExitCode::from(1);
    }
    let ca = match open_ca(&config, regenerate_ca) {
        Ok(ca) => ca,
        Err(code) => return code,
    };
    if let Some(dir) = &config.proxy.ca_export_dir
        && let Err(e) = ca.export_public(dir)
    {
        eprintln!("latchkey: [proxy] ca_export_dir: {e}");
        return ExitCode::from(2);
    }
    runtime().block_on(async move {
        let listener = match listen(config.proxy.listen) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("latchkey: cannot listen on {}: {e}", config.proxy.listen);
                return ExitCode::from(1);
            }
        };
        let admin = match config.admin {
            Some(addr) => match TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) => {
                    eprintln!("latchkey: cannot listen on [admin] {addr}: {e}");
                    return ExitCode::from(1);
                }
            },
            None => None,
        };
        let transparent = match config.proxy.transparent {
            Some(addr) => match bind_transparent(addr).await {
                Ok(l) => l,
                Err(code) => return code,
            },
            None => Vec::new(),
        };
        let file = config.file.clone();
        let pid_file = config.proxy.ca_dir.join("latchkey.pid");
        let proxy = match start(config, ca, &listener, &transparent) {
            Ok(p) => p,
            Err(code) => return code,
        };
        if let Some(l) = admin {
            let token_file = proxy.generation().config.admin_access.token_file.clone();
            // Without a token (a read-only config directory in a container, say) the
            // listener still serves the public endpoints, and nothing else.
            let token = match crate::admin::auth::Token::load_or_create(&token_file) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(
                        "{e}; the admin listener serves /healthz, /readyz and /ca.crt only (set [admin] token_file to a writable path, or create the file)"
                    );
                    None
                }
            };
            if let Some(t) = &token {
                let _ = proxy.admin_token.set(t.key());
            }
            tracing::info!("admin endpoint on {}", l.local_addr().map(|a| a.to_string()).unwrap_or_default());
            tokio::spawn(crate::admin::serve(proxy.clone(), token, l));
        }
        let _pid = PidFile::write(pid_file);
        // Where `exec --jail` hands this instance a jail to serve.
        match crate::jail::control::bind(&proxy.generation().config.proxy.ca_dir) {
            Ok(socket) => drop(tokio::spawn(crate::jail::control::serve(proxy.clone(), socket))),
            Err(e) => tracing::warn!("no jail control socket: {e}"),
        }
        tokio::spawn(watch(proxy.clone(), file, overrides, watch_file));
        for l in transparent {
            tracing::info!(
                "transparent listener on {}",
                l.local_addr().map(|a| a.to_string()).unwrap_or_default()
            );
            let p = proxy.clone();
            if let Err(e) = proxy.spawn_accept(l, move |l| p.serve_transparent(l)) {
                eprintln!("latchkey: transparent listener: {e}");
                return ExitCode::from(1);
            }
        }
        proxy.set_ready();
        tracing::info!("ready in {} ms", started.elapsed().as_millis());
        let grace = proxy.generation().config.proxy.limits.shutdown_grace;
        let p = proxy.clone();
        let mut accepting = match proxy.spawn_accept(listener, move |l| p.serve(l)) {
            Ok(handle) => handle,
            Err(e) => {
                eprintln!("latchkey: cannot serve {}: {e}", proxy.generation().config.proxy.listen);
                return ExitCode::from(1);
            }
        };
        tokio::select! {
            r = &mut accepting => {
                eprintln!("latchkey: listener failed: {r:?}");
                return ExitCode::from(1);
            }
            _ = shutdown_signal() => {}
        }
        // Close the listener (dropped with the accept loop); let requests in flight finish.
        accepting.abort();
        let _ = accepting.await;
        tracing::info!(
            "shutting down: no new connections; waiting up to {}s for requests in flight",
            grace.as_secs()
        );
        if !proxy.exchanges.drained(grace).await {
            tracing::warn!("requests still in flight after {}s; exiting anyway", grace.as_secs());
        }
        // The log thread would die with the process: every finished request's line first.
        let audit = proxy.telemetry.audit.clone();
        if !tokio::task::spawn_blocking(move || audit.flush(Duration::from_secs(5))).await.unwrap_or(false) {
            tracing::warn!("the request log could not be flushed before exit");
        }
        ExitCode::SUCCESS
    })
}

/// `[proxy] transparent`'s listeners. On loopback, the other family's loopback too, on
/// the same port: REDIRECT sends IPv4 connections to 127.0.0.1 and IPv6 ones to ::1,
/// and `transparent-rules` redirects both (a kernel without IPv6 gets IPv4 only).
async fn bind_transparent(addr: std::net::SocketAddr) -> Result<Vec<TcpListener>, ExitCode> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    let l = listen(addr).map_err(|e| {
        eprintln!("latchkey: cannot listen on [proxy] transparent {addr}: {e}");
        ExitCode::from(1)
    })?;
    let mut out = vec![l];
    if addr.ip().is_loopback() {
        let other: IpAddr = match addr.ip() {
            IpAddr::V4(_) => Ipv6Addr::LOCALHOST.into(),
            IpAddr::V6(_) => Ipv4Addr::LOCALHOST.into(),
        };
        match listen(SocketAddr::new(other, addr.port())) {
            Ok(l) => out.push(l),
            Err(e) => tracing::warn!("[proxy] transparent: not listening on {other} as well: {e}"),
        }
    }
    Ok(out)
}

/// Report the credentials and build the proxy for a bound listener.
fn start(
    mut config: Config,
    ca: Arc<CertAuthority>,
    listener: &TcpListener,
    transparent: &[TcpListener],
) -> Result<Arc<Proxy>, ExitCode> {
    let local = listener.local_addr().map_err(|_| ExitCode::from(1))?;
    config.proxy.listen = local;
    report_credentials(&config);
    let mut own = vec![local];
    own.extend(config.admin);
    own.extend(transparent.iter().filter_map(|l| l.local_addr().ok()));
    let ca_path = config.ca_cert_path();
    let threads = config.proxy.threads;
    let proxy = Proxy::new(config, ca, provider(), own).map_err(|e| {
        eprintln!("latchkey: {e}");
        ExitCode::from(2)
    })?;
    let shards = match threads {
        Some(n) => crate::proxy::shards::Shards::start(n),
        None => crate::proxy::shards::Shards::per_core(),
    };
    let threads = match shards {
        Ok(shards) => {
            let n = shards.len();
            let _ = proxy.shards.set(shards);
            n
        }
        // Still served, on the main runtime.
        Err(e) => {
            tracing::warn!("no connection shards ({e}); serving on the main runtime");
            1
        }
    };
    let plural = if threads == 1 { "" } else { "s" };
    tracing::info!("latchkey listening on {local} (CA {}; {threads} thread{plural})", ca_path.display());
    Ok(proxy)
}

/// One line per active, failed or user-written inactive credential; the built-in
/// providers whose variables are unset (most of them, on a fresh machine) in one line.
fn report_credentials(config: &Config) {
    let mut idle_builtins = 0;
    for (rule, cred) in config.policy.credentials.iter().zip(&config.credentials) {
        match &rule.state {
            CredState::Active => tracing::info!("credential {} active ({})", rule.name, cred.source),
            CredState::Inactive(_) if cred.builtin => idle_builtins += 1,
            CredState::Inactive(why) => tracing::info!("credential {} inactive: {why}", rule.name),
            CredState::Failed(why) => {
                tracing::warn!("credential {} FAILED: {why}; its requests get 502", rule.name)
            }
        }
    }
    if idle_builtins > 0 {
        let s = if idle_builtins == 1 { "" } else { "s" };
        tracing::info!(
            "{idle_builtins} built-in provider{s} inactive (set their variables to enable them; latchkey providers)"
        );
    }
}

/// `[proxy] mlock`: lock current and future pages so no secret reaches swap. Asked for
/// and impossible is an error (fail closed), with the usual cause named.
fn lock_memory() -> bool {
    // With MCL_FUTURE, an allocation past the limit later would fail and abort the
    // process: refuse up front unless the limit leaves room (root has CAP_IPC_LOCK).
    const ROOM: u64 = 256 << 20;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given; geteuid has no arguments.
    let (got, root) = unsafe { (libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) == 0, libc::geteuid() == 0) };
    if !root && got && lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < ROOM {
        eprintln!(
            "latchkey: mlock = true but RLIMIT_MEMLOCK is {} KiB, too small to lock latchkey's memory (mlockall failed or would fail later): raise it to at least 256 MiB (`ulimit -l unlimited`) or grant CAP_IPC_LOCK",
            lim.rlim_cur / 1024
        );
        return false;
    }
    // SAFETY: mlockall takes flags only.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } == 0 {
        tracing::info!("memory locked (mlock = true)");
        return true;
    }
    eprintln!(
        "latchkey: mlock = true but mlockall failed: {} (raise RLIMIT_MEMLOCK, e.g. `ulimit -l unlimited`, or grant CAP_IPC_LOCK)",
        std::io::Error::last_os_error()
    );
    false
}

/// `--port` / `--bind`, applied to every config loaded, the first and each reload.
#[derive(Clone, Copy)]
struct Overrides {
    port: Option<u16>,
    bind: Option<IpAddr>,
}

impl Overrides {
    fn apply(&self, config: &mut Config) {
        if let Some(p) = self.port {
            config.proxy.listen.set_port(p);
        }
        if let Some(b) = self.bind {
            config.proxy.listen.set_ip(b);
        }
    }
}

/// How often the config file is looked at. Polling the path (not an inotify watch on
/// the file) follows what editors and Kubernetes do: replace the file by rename, or
/// swap the symlink it sits behind.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

fn stamp(path: &std::path::Path) -> Option<(u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// Reload on SIGHUP and when the config file changes.
async fn watch(proxy: Arc<Proxy>, file: Option<PathBuf>, overrides: Overrides, poll: bool) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
    let mut last = file.as_deref().and_then(stamp);
    let mut tick = tokio::time::interval(WATCH_EVERY);
    loop {
        let why = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            _ = tick.tick(), if poll => {
                let now = file.as_deref().and_then(stamp);
                if now == last || now.is_none() {
                    continue;
                }
                last = now;
                "the config file changed"
            }
        };
        // Loading runs value_commands and reads files: keep it off the runtime threads.
        let (p, f) = (proxy.clone(), file.clone());
        let _ = tokio::task::spawn_blocking(move || reload_now(&p, f, overrides, why)).await;
    }
}

fn reload_now(proxy: &Proxy, file: Option<PathBuf>, overrides: Overrides, why: &str) {
    let metrics = &proxy.telemetry.metrics;
    let count =
        |result| metrics.reloads.get_or_create(&crate::telemetry::metrics::ResultLabel { result }).inc();
    let loaded = crate::config::find_config(file.as_deref()).and_then(|f| crate::config::load(f.as_deref()));
    let mut config = match loaded {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("reload ({why}) failed, keeping the running config: {e}");
            count("failed");
            return;
        }
    };
    overrides.apply(&mut config);
    let report: Vec<String> = config
        .policy
        .credentials
        .iter()
        .zip(&config.credentials)
        .filter(|(r, c)| {
            r.state != CredState::Active && !(c.builtin && matches!(r.state, CredState::Inactive(_)))
        })
        .map(|(r, _)| format!("{} {:?}", r.name, r.state))
        .collect();
    match proxy.reload(config) {
        Ok(()) => {
            tracing::info!(
                "reloaded ({why}); not active: {}",
                if report.is_empty() { "none".into() } else { report.join(", ") }
            );
            count("ok");
        }
        Err(e) => {
            tracing::error!("reload ({why}) refused: {e}");
            count("failed");
        }
    }
}

/// `<ca_dir>/latchkey.pid` while `run` lives, for `latchkey reload`.
struct PidFile(PathBuf);

impl PidFile {
    fn write(path: PathBuf) -> Option<PidFile> {
        std::fs::write(&path, format!("{}\n", std::process::id())).ok()?;
        Some(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `latchkey reload`: SIGHUP to the running instance named by the pid file.
pub fn reload(config: Option<PathBuf>) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let path = config.proxy.ca_dir.join("latchkey.pid");
    let pid = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse::<i32>().ok());
    let Some(pid) = pid else {
        eprintln!("latchkey: no running latchkey found ({} is missing)", path.display());
        return ExitCode::from(1);
    };
    // Only signal a process that is latchkey: a stale pid file may name anything.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if !comm.trim().starts_with("latchkey") {
        eprintln!("latchkey: pid {pid} from {} is not latchkey; is it running?", path.display());
        return ExitCode::from(1);
    }
    // SAFETY: kill(2) with a pid and a signal number; no memory is involved.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        eprintln!("latchkey: cannot signal pid {pid}: {}", std::io::Error::last_os_error());
        return ExitCode::from(1);
    }
    println!("latchkey: asked pid {pid} to reload; the outcome is in its log");
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub fn exec(
    config: Option<PathBuf>,
    agent: Option<String>,
    token_ttl: Option<String>,
    command: Vec<String>,
) -> ExitCode {
    let super::ChildStart { config, ca, vars, running } =
        match super::child_start(config, agent.as_deref(), token_ttl.as_deref(), |_| None) {
            Ok(start) => start,
            Err(code) => return code,
        };
    let mut scrub = super::env::scrub_list(&config);
    scrub.extend(super::env::holding_secrets(&config));
    runtime().block_on(async move {
        let addr = config.client_proxy_addr();
        if running.is_some() {
            tracing::debug!("using the latchkey already running at {addr}");
        } else {
            let listener = match listen(config.proxy.listen) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!(
                        "latchkey: {addr} is taken by something that is not this latchkey ({e}); stop it or set [proxy] port"
                    );
                    return ExitCode::from(1);
                }
            };
            // `exec` serves its child through the proxy port: no transparent listener.
            let proxy = match start(config, ca, &listener, &[]) {
                Ok(p) => p,
                Err(code) => return code,
            };
            let p = proxy.clone();
            if let Err(e) = proxy.spawn_accept(listener, move |l| p.serve(l)) {
                eprintln!("latchkey: cannot serve {addr}: {e}");
                return ExitCode::from(1);
            }
        }
        let (program, args) = command.split_first().expect("clap requires a command");
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args);
        for name in &scrub {
            cmd.env_remove(name);
        }
        for (k, v) in &vars {
            cmd.env(k, v);
        }
        let status = match cmd.status().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("latchkey: cannot run {program}: {e}");
                return ExitCode::from(127);
            }
        };
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitCode::from(code as u8),
            (None, Some(sig)) => ExitCode::from(128u8.wrapping_add(sig as u8)),
            _ => ExitCode::from(1),
        }
    })
}
