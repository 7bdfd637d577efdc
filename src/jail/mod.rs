//! `latchkey exec --jail` (SPEC section 9): CMD in its own user (when not root), mount,
//! pid and network namespaces, where every TCP connection reaches latchkey, DNS is
//! latchkey's, and the secrets' sources are not there. docs/jail.md has the design.

pub mod caps;
pub mod control;
mod diagnose;
pub mod dns;
pub mod fdpass;
mod helper;
mod netlink;
mod nft;
pub mod serve;

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};

use serde::{Deserialize, Serialize};

pub use helper::{HELPER_ARG, Plan, Report, helper_main};
pub use serve::JailSockets;

/// What each socket the helper hands over is for.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketKind {
    /// The explicit proxy port inside the jail (HTTP_PROXY points here).
    Proxy,
    /// Where nftables redirects every TCP connection (IPv4 and IPv6).
    Transparent,
    DnsUdp,
    DnsTcp,
}

/// A jail being made: the helper process and the channel to it.
pub struct Started {
    pub child: tokio::process::Child,
    chan: OwnedFd,
}

message_error! {
    /// Why a jail could not be made, in words for the user (the command never runs then).
    pub JailError
}

/// Start the helper with CMD's environment, hand it the plan, and wait for the jail's
/// sockets. On failure the message says why (the helper has exited or will).
pub async fn start(plan: &Plan, env: Vec<(OsString, OsString)>) -> Result<(Started, JailSockets), JailError> {
    let (ours, theirs) = fdpass::seqpacket_pair().map_err(|e| format!("latchkey: socketpair: {e}"))?;
    let mut cmd = tokio::process::Command::new("/proc/self/exe");
    cmd.arg0("latchkey").arg(HELPER_ARG).env_clear().envs(env).kill_on_drop(true);
    let theirs_fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
    // SAFETY: getpid has no arguments.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the hook makes async-signal-safe syscalls only.
    unsafe {
        cmd.pre_exec(move || {
            // The jail dies with latchkey: it must never outlive the proxy serving it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            // dup2 clears close-on-exec on the copy.
            if libc::dup2(theirs_fd, helper::CHANNEL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| format!("latchkey: cannot start the jail helper: {e}"))?;
    drop(theirs);
    let plan_bytes = serde_json::to_vec(plan).map_err(|e| e.to_string())?;
    fdpass::send(ours.as_fd(), &plan_bytes, &[]).map_err(|e| format!("latchkey: jail helper: {e}"))?;
    let (msg, fds) = tokio::task::spawn_blocking({
        let chan = ours.try_clone().map_err(|e| e.to_string())?;
        move || fdpass::recv(chan.as_fd())
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("latchkey: jail helper: {e}"))?;
    let mut started = Started { child, chan: ours };
    let failed = match serde_json::from_slice::<Report>(&msg) {
        Ok(Report::Ready { kinds }) if kinds.len() == fds.len() => {
            return Ok((started, JailSockets { kinds, fds }));
        }
        Ok(Report::Failed { message }) => message,
        _ => "latchkey: the jail helper failed before making the jail; not running the command".into(),
    };
    // The helper exits after saying why; nothing of it outlives `exec`.
    drop(started.chan);
    if tokio::time::timeout(std::time::Duration::from_secs(5), started.child.wait()).await.is_err() {
        let _ = started.child.kill().await;
    }
    Err(JailError(failed))
}

impl Started {
    /// Let CMD run: latchkey now serves the jail's sockets.
    pub fn go(&self) -> std::io::Result<()> {
        fdpass::send(self.chan.as_fd(), b"go", &[])
    }
}
