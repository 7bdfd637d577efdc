//! `latchkey exec --jail`: the command line side. Computes CMD's environment and what
//! to hide, starts the jail (`crate::jail`), and serves it — by the latchkey already
//! running with this CA when there is one, else in this process — until CMD exits.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::provider;
use crate::config::Config;
use crate::jail::{self, Plan};
use crate::proxy::Proxy;

pub fn exec(
    config: Option<PathBuf>,
    agent: Option<String>,
    hide: Vec<PathBuf>,
    token_ttl: Option<String>,
    command: Vec<String>,
) -> ExitCode {
    // The jail reads ca.crt and bundle.pem; in-process serving needs the key too. The
    // proxy port inside the jail is on its own loopback.
    let inside = |config: &Config| Some(format!("http://127.0.0.1:{}", jail_proxy_port(config)));
    let super::ChildStart { config, ca, vars, running } =
        match super::child_start(config, agent.as_deref(), token_ttl.as_deref(), inside) {
            Ok(start) => start,
            Err(code) => return code,
        };
    let env = child_env(&super::env::scrub_list(&config), &vars);
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let port = jail_proxy_port(&config);
    let plan = Plan { argv: command, hide: hide_list(&config, &hide, &cwd), proxy_port: port, cwd };
    let foreground = Terminal::foreground();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let code = rt.block_on(async move {
        let serving = Serving { config, ca, attach: running.is_some(), agent };
        run(plan, env, serving).await
    });
    if foreground {
        Terminal::reclaim();
    }
    code
}

struct Serving {
    config: Config,
    ca: std::sync::Arc<crate::ca::CertAuthority>,
    attach: bool,
    agent: Option<String>,
}

async fn run(plan: Plan, env: Vec<(OsString, OsString)>, serving: Serving) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    // Ctrl-C and Ctrl-\ from the terminal reach CMD directly (same process group);
    // latchkey stays to serve it and to return its status.
    let (Ok(mut int), Ok(mut quit), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::quit()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        eprintln!("latchkey: cannot handle signals");
        return ExitCode::from(1);
    };
    let (mut started, sockets) = match jail::start(&plan, env).await {
        Ok(x) => x,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(1);
        }
    };
    let ca_dir = serving.config.proxy.ca_dir.clone();
    let mut _attached = None;
    let mut _served = None;
    if serving.attach {
        match jail::control::attach(&ca_dir, &sockets, serving.agent.as_deref()) {
            Ok(conn) => _attached = Some(conn),
            Err(e) => tracing::warn!(
                "the running latchkey did not take the jail ({e}); serving it from this process, with the secrets this process can read"
            ),
        }
    }
    if _attached.is_none() {
        let proxy = match Proxy::new(serving.config, serving.ca, provider(), vec![]) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("latchkey: {e}");
                return ExitCode::from(2);
            }
        };
        _served = Some(tokio::spawn(jail::serve::serve(proxy, sockets, serving.agent)));
    }
    if let Err(e) = started.go() {
        eprintln!("latchkey: the jail went away before it started: {e}");
        return ExitCode::from(1);
    }
    let pid = started.child.id().map(|p| p as i32);
    let status = loop {
        tokio::select! {
            s = started.child.wait() => break s,
            _ = int.recv() => {}
            _ = quit.recv() => {}
            _ = term.recv() => forward(pid, libc::SIGTERM),
            _ = hup.recv() => forward(pid, libc::SIGHUP),
        }
    };
    if let Some(t) = _served {
        t.abort();
    }
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => ExitCode::from(code as u8),
            (None, Some(sig)) => ExitCode::from(128u8.wrapping_add(sig as u8)),
            _ => ExitCode::from(1),
        },
        Err(_) => ExitCode::from(1),
    }
}

fn forward(pid: Option<i32>, sig: libc::c_int) {
    if let Some(pid) = pid {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, sig) };
    }
}

/// latchkey's environment without anything a credential source reads, plus the
/// client side (proxy, CA bundle, placeholders). The SSH agent socket is hidden in the
/// jail, so its variable goes too.
fn child_env(scrub: &[String], vars: &[(String, String)]) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            k != "SSH_AUTH_SOCK" && !scrub.iter().any(|s| *s == k)
        })
        .collect();
    for (k, v) in vars {
        env.retain(|(name, _)| name.as_os_str() != k.as_str());
        env.push((k.into(), v.into()));
    }
    env
}

/// Everything replaced by an empty, read-only file or directory inside the jail.
fn hide_list(config: &Config, extra: &[PathBuf], cwd: &Path) -> Vec<PathBuf> {
    let ca_dir = &config.proxy.ca_dir;
    let mut out: Vec<PathBuf> = config.jail.hide.clone();
    out.extend(config.jail.secret_files.iter().cloned());
    out.extend(["ca.key", "latchkey.pid", "control.sock"].map(|f| ca_dir.join(f)));
    out.extend(extra.iter().map(|p| cwd.join(crate::config::expand_home(&p.to_string_lossy()))));
    // Credential files other tools are pointed at.
    for var in [
        "GOOGLE_APPLICATION_CREDENTIALS",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AZURE_CLIENT_CERTIFICATE_PATH",
    ] {
        out.extend(std::env::var_os(var).map(PathBuf::from));
    }
    // Ways out of the jail that are files, not network: the SSH agent (signs with the
    // user's keys), the session bus and systemd --user (start processes outside),
    // Docker (runs containers outside), X11 (types into other windows).
    out.extend(std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from));
    // SAFETY: geteuid has no arguments.
    let runtime_dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("/run/user/{}", unsafe { libc::geteuid() })));
    out.push(runtime_dir);
    out.extend(["/run/docker.sock", "/var/run/docker.sock", "/tmp/.X11-unix"].map(PathBuf::from));
    out.retain(|p| p.is_absolute());
    out.sort();
    out.dedup();
    out
}

/// The terminal's foreground process group: CMD (or a shell in the jail) may take it;
/// latchkey gives it back to its own group when the jail ends.
struct Terminal;

impl Terminal {
    fn foreground() -> bool {
        // SAFETY: plain queries on stdin.
        unsafe { libc::isatty(0) == 1 && libc::tcgetpgrp(0) == libc::getpgrp() }
    }

    fn reclaim() {
        // SAFETY: SIGTTOU is ignored around tcsetpgrp so a background caller is not stopped.
        unsafe {
            if libc::tcgetpgrp(0) == libc::getpgrp() {
                return;
            }
            let old = libc::signal(libc::SIGTTOU, libc::SIG_IGN);
            libc::tcsetpgrp(0, libc::getpgrp());
            libc::signal(libc::SIGTTOU, old);
        }
    }
}

/// The proxy port inside the jail: the configured one (3128 when it is 0).
fn jail_proxy_port(config: &Config) -> u16 {
    match config.proxy.listen.port() {
        0 => 3128,
        p => p,
    }
}
