//! `latchkey health`: probe the admin endpoint's `/readyz` (or `/healthz`) and exit 0 or
//! 1, for a container `HEALTHCHECK` or an exec probe where the image has no curl. It
//! reads only where the admin endpoint is: no secret source is touched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{self, envvars, raw::RawConfig};

pub fn health(config: Option<PathBuf>, admin: Option<SocketAddr>, path: &str) -> ExitCode {
    let addr = match admin.map(Ok).unwrap_or_else(|| admin_from_config(config)) {
        Ok(a) => local(a),
        Err(e) => {
            eprintln!("latchkey: {e}");
            return ExitCode::from(2);
        }
    };
    // Plain HTTP: the admin endpoint never speaks TLS.
    match super::fetch_local_status(addr, path) {
        Some((200, body)) => {
            println!("{}", body.trim());
            ExitCode::SUCCESS
        }
        Some((status, body)) => {
            eprintln!("latchkey: {path} at {addr} answered {status}: {}", body.trim());
            ExitCode::from(1)
        }
        None => {
            eprintln!("latchkey: nothing answers at {addr} (admin endpoint)");
            ExitCode::from(1)
        }
    }
}

/// `[admin] listen` as the config file and `LATCHKEY_ADMIN_LISTEN` set it.
fn admin_from_config(path: Option<PathBuf>) -> Result<SocketAddr, String> {
    let file = config::find_config(path.as_deref()).map_err(|e| format!("config error: {e}"))?;
    let src = match &file {
        Some(f) => std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?,
        None => String::new(),
    };
    let mut raw: RawConfig = toml::from_str(&src).map_err(|e| format!("config error: {e}"))?;
    envvars::apply(&mut raw, &|k| std::env::var(k).ok())
        .map_err(|bad| format!("config error: {} (overrides {}): {}", bad.variable, bad.key, bad.message))?;
    let listen = raw.admin.and_then(|a| a.listen).ok_or(
        "no admin endpoint to probe: set [admin] listen (or LATCHKEY_ADMIN_LISTEN), or pass --admin IP:PORT",
    )?;
    listen.parse().map_err(|_| format!("[admin] listen {listen:?} is not ip:port"))
}

/// A wildcard listen address is probed on loopback.
pub(super) fn local(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(v6) if v6.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    }
}
