//! Attaching a jail to the latchkey already running: `exec --jail` passes the jail's
//! sockets (SCM_RIGHTS) over `<ca_dir>/control.sock` (0600 in the 0700 CA directory;
//! each side checks the other is the same user with SO_PEERCRED). The running instance
//! serves them — its log, metrics and live view show the jailed agent — until
//! `exec` closes the connection (the jail has ended, or `exec` died).

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};

use super::SocketKind;
use super::fdpass;
use super::serve::JailSockets;
use crate::proxy::Proxy;

pub fn socket_path(ca_dir: &Path) -> PathBuf {
    ca_dir.join("control.sock")
}

#[derive(Serialize, Deserialize)]
struct Attach {
    kinds: Vec<SocketKind>,
    agent: Option<String>,
}

/// The listening control socket; removed when dropped.
pub struct ControlSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Bind `<ca_dir>/control.sock`, unless another live instance holds it.
pub fn bind(ca_dir: &Path) -> io::Result<ControlSocket> {
    let path = socket_path(ca_dir);
    if StdUnixStream::connect(&path).is_ok() {
        return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("{} is in use", path.display())));
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(ControlSocket { path, listener: Some(listener) })
}

/// Accept jails until the process ends.
pub async fn serve(proxy: Arc<Proxy>, mut socket: ControlSocket) {
    let Some(listener) = socket.listener.take() else { return };
    let _socket = socket;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(attached(proxy.clone(), stream));
    }
}

fn same_user(uid: u32) -> bool {
    // SAFETY: geteuid has no arguments.
    uid == unsafe { libc::geteuid() }
}

async fn attached(proxy: Arc<Proxy>, stream: UnixStream) {
    match stream.peer_cred() {
        Ok(c) if same_user(c.uid()) => {}
        _ => {
            tracing::warn!("control socket: refused a connection from another user");
            return;
        }
    }
    let Ok(std) = stream.into_std() else { return };
    let received = tokio::task::spawn_blocking(move || -> io::Result<_> {
        std.set_nonblocking(false)?;
        std.set_read_timeout(Some(Duration::from_secs(5)))?;
        let (msg, fds) = fdpass::recv(std.as_fd())?;
        let req: Attach = serde_json::from_slice(&msg).map_err(io::Error::other)?;
        if req.kinds.len() != fds.len() {
            return Err(io::Error::other("descriptors do not match their description"));
        }
        (&std).write_all(b"ok\n")?;
        std.set_nonblocking(true)?;
        Ok((std, req, fds))
    })
    .await;
    let (std, req, fds) = match received {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return tracing::warn!("control socket: {e}"),
        Err(_) => return,
    };
    let Ok(mut stream) = UnixStream::from_std(std) else { return };
    let agent = req.agent.clone();
    tracing::info!(agent = agent.as_deref().unwrap_or("-"), "jail attached");
    let sockets = JailSockets { kinds: req.kinds, fds };
    let mut byte = [0u8; 1];
    tokio::select! {
        _ = super::serve::serve(proxy, sockets, agent) => {}
        _ = stream.read(&mut byte) => {}
    }
    tracing::info!("jail ended");
}

/// Hand the jail's sockets to the latchkey running on `ca_dir`. Keep the returned
/// connection open for as long as the jail lives.
pub fn attach(ca_dir: &Path, sockets: &JailSockets, agent: Option<&str>) -> io::Result<StdUnixStream> {
    let mut s = StdUnixStream::connect(socket_path(ca_dir))?;
    if !same_user(peer_uid(&s)?) {
        return Err(io::Error::other("the control socket belongs to another user"));
    }
    let req = Attach { kinds: sockets.kinds.clone(), agent: agent.map(str::to_string) };
    let bytes = serde_json::to_vec(&req).map_err(io::Error::other)?;
    let fds: Vec<_> = sockets.fds.iter().map(|f| f.as_fd()).collect();
    fdpass::send(s.as_fd(), &bytes, &fds)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reply = [0u8; 3];
    s.read_exact(&mut reply)?;
    if &reply != b"ok\n" {
        return Err(io::Error::other("the running latchkey refused the jail"));
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

fn peer_uid(s: &StdUnixStream) -> io::Result<u32> {
    // SAFETY: getsockopt writes a ucred we own.
    unsafe {
        let mut cred: libc::ucred = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        let rc = libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cred.uid)
    }
}
