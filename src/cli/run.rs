//! `latchkey run` and `latchkey exec`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;

use super::{load_config, open_ca, provider};
use crate::ca::CertAuthority;
use crate::config::Config;
use crate::policy::CredState;
use crate::proxy::Proxy;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime")
}

pub fn run(
    config: Option<PathBuf>,
    port: Option<u16>,
    bind: Option<IpAddr>,
    regenerate_ca: bool,
) -> ExitCode {
    let started = Instant::now();
    let mut config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(p) = port {
        config.proxy.listen.set_port(p);
    }
    if let Some(b) = bind {
        config.proxy.listen.set_ip(b);
    }
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
    let ca = match open_ca(&config, regenerate_ca) {
        Ok(ca) => ca,
        Err(code) => return code,
    };
    runtime().block_on(async move {
        let listener = match TcpListener::bind(config.proxy.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("latchkey: cannot listen on {}: {e}", config.proxy.listen);
                return ExitCode::from(1);
            }
        };
        let proxy = match start(config, ca, &listener) {
            Ok(p) => p,
            Err(code) => return code,
        };
        tracing::info!("ready in {} ms", started.elapsed().as_millis());
        let grace = proxy.generation().config.proxy.limits.shutdown_grace;
        tokio::select! {
            r = proxy.clone().serve(listener) => {
                eprintln!("latchkey: listener failed: {r:?}");
                return ExitCode::from(1);
            }
            _ = shutdown_signal() => {}
        }
        // The listener is closed (dropped with `serve`); let requests in flight finish.
        tracing::info!(
            "shutting down: no new connections; waiting up to {}s for requests in flight",
            grace.as_secs()
        );
        if !proxy.exchanges.drained(grace).await {
            tracing::warn!("requests still in flight after {}s; exiting anyway", grace.as_secs());
        }
        ExitCode::SUCCESS
    })
}

/// Report the credentials and build the proxy for a bound listener.
fn start(mut config: Config, ca: Arc<CertAuthority>, listener: &TcpListener) -> Result<Arc<Proxy>, ExitCode> {
    let local = listener.local_addr().map_err(|_| ExitCode::from(1))?;
    config.proxy.listen = local;
    for (rule, cred) in config.policy.credentials.iter().zip(&config.credentials) {
        match &rule.state {
            CredState::Active => tracing::info!("credential {} active ({})", rule.name, cred.source),
            CredState::Inactive(why) => tracing::info!("credential {} inactive: {why}", rule.name),
            CredState::Failed(why) => {
                tracing::warn!("credential {} FAILED: {why}; its requests get 502", rule.name)
            }
        }
    }
    let mut own = vec![local];
    own.extend(config.admin);
    let ca_path = config.ca_cert_path();
    let proxy = Proxy::new(config, ca, provider(), own).map_err(|e| {
        eprintln!("latchkey: {e}");
        ExitCode::from(2)
    })?;
    tracing::info!("latchkey listening on {local} (CA {})", ca_path.display());
    Ok(proxy)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub fn exec(config: Option<PathBuf>, agent: Option<String>, command: Vec<String>) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let ca = match open_ca(&config, false) {
        Ok(ca) => ca,
        Err(code) => return code,
    };
    let proxy_url = match super::env::agent_proxy_url(&config, agent.as_deref(), None) {
        Ok(u) => u,
        Err(code) => return code,
    };
    let running = super::running_active(&config);
    let vars = super::env::client_env(&config, running.as_deref(), proxy_url, None);
    let scrub = super::env::scrub_list(&config);
    runtime().block_on(async move {
        let addr = config.client_proxy_addr();
        if running.is_some() {
            tracing::debug!("using the latchkey already running at {addr}");
        } else {
            let listener = match TcpListener::bind(config.proxy.listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!(
                        "latchkey: {addr} is taken by something that is not this latchkey ({e}); stop it or set [proxy] port"
                    );
                    return ExitCode::from(1);
                }
            };
            let proxy = match start(config, ca, &listener) {
                Ok(p) => p,
                Err(code) => return code,
            };
            tokio::spawn(proxy.serve(listener));
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
