//! The jail's own side, in a fresh `latchkey` process (re-executed so that it starts
//! single-threaded, as creating a user namespace requires). It makes the namespaces,
//! hides the secret sources, routes the network to latchkey, hands latchkey the jail's
//! sockets, and on "go" starts the jail's init, which runs CMD without capabilities.
//!
//! Processes: `latchkey exec` (serves or attaches) → this helper (parent pid
//! namespace; forwards SIGTERM/SIGHUP) → init (pid 1 of the jail: reaps, forwards,
//! exits with CMD's status, and its exit takes everything else in the jail with it)
//! → CMD. CMD stays in the terminal's foreground process group, so Ctrl-C and job
//! control reach it as they would unjailed.

use super::JailError;
use std::ffi::CString;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};

use serde::{Deserialize, Serialize};

use super::{SocketKind, fdpass, netlink};

/// argv[1] that makes `latchkey` this helper.
pub const HELPER_ARG: &str = "__jail";
/// The descriptor the helper finds its channel to `latchkey exec` on.
pub const CHANNEL_FD: i32 = 3;
/// Where the staging tmpfs (empty file, empty dir, resolv.conf) sits while the hiding
/// mounts are made; the jail's own /proc is mounted there afterwards.
const STAGING: &str = "/proc";

/// What `latchkey exec --jail` asks of the helper.
#[derive(Serialize, Deserialize, Debug)]
pub struct Plan {
    pub argv: Vec<String>,
    pub hide: Vec<PathBuf>,
    /// The explicit proxy port inside the jail (127.0.0.1).
    pub proxy_port: u16,
    pub cwd: PathBuf,
}

/// The helper's answer: the sockets (attached, in this order), or why there is no jail.
#[derive(Serialize, Deserialize, Debug)]
pub enum Report {
    Ready { kinds: Vec<SocketKind> },
    Failed { message: String },
}

pub fn helper_main() -> ExitCode {
    // SAFETY: `latchkey exec` put the channel on this descriptor for us alone.
    let chan = unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) };
    set_cloexec(&chan);
    let plan: Plan = match fdpass::recv(chan.as_fd()).ok().and_then(|(m, _)| serde_json::from_slice(&m).ok())
    {
        Some(p) => p,
        None => return ExitCode::from(1),
    };
    let sockets = match setup(&plan) {
        Ok(s) => s,
        Err(message) => {
            let _ = send_report(&chan, &Report::Failed { message: message.0 }, &[]);
            return ExitCode::from(1);
        }
    };
    let kinds = sockets.iter().map(|(k, _)| *k).collect();
    let fds: Vec<_> = sockets.iter().map(|(_, fd)| fd.as_fd()).collect();
    if send_report(&chan, &Report::Ready { kinds }, &fds).is_err() {
        return ExitCode::from(1);
    }
    drop(fds);
    drop(sockets);
    match fdpass::recv(chan.as_fd()) {
        Ok((m, _)) if m == b"go" => {}
        _ => return ExitCode::from(1),
    }
    drop(chan);
    ExitCode::from(run_init(&plan))
}

fn send_report(chan: &OwnedFd, report: &Report, fds: &[std::os::fd::BorrowedFd<'_>]) -> io::Result<()> {
    let bytes = serde_json::to_vec(report).map_err(io::Error::other)?;
    fdpass::send(chan.as_fd(), &bytes, fds)
}

/// Namespaces, files, network; the jail's sockets on success.
fn setup(plan: &Plan) -> Result<Vec<(SocketKind, OwnedFd)>, JailError> {
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let user_ns = uid != 0;
    // The pid namespace comes last (`enter_pid_namespace`): its first child is its
    // init, and `nft` must not be that child.
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWNET;
    if user_ns {
        flags |= libc::CLONE_NEWUSER;
    }
    // SAFETY: unshare with constant flags; this process is single-threaded.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(super::diagnose::unshare_failed(io::Error::last_os_error(), user_ns).into());
    }
    if user_ns {
        // Before the process is made non-dumpable: that makes /proc/self root's.
        map_ids(uid, gid).map_err(|e| super::diagnose::setup_failed("mapping the jail's user id", &e))?;
    }
    // SAFETY: prctl with constant arguments. The helper and init hold capabilities in
    // the jail's user namespace: nothing in the jail may attach to them.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    hide(&plan.hide)?;
    let sockets = network(plan)?;
    // SAFETY: unshare with a constant flag; still single-threaded.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(super::diagnose::setup_failed(
            "creating the jail's pid namespace",
            &io::Error::last_os_error(),
        )
        .into());
    }
    Ok(sockets)
}

/// Map the caller's uid and gid to themselves: CMD keeps its identity, and holds no
/// capability once it runs a program (it is not root in the namespace).
fn map_ids(uid: u32, gid: u32) -> io::Result<()> {
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1\n"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1\n"))
}

fn mount(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(io::Error::other);
    let src = src.map(c).transpose()?;
    let target = CString::new(target.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let fstype = fstype.map(c).transpose()?;
    let data = data.map(c).transpose()?;
    let p = |o: &Option<CString>| o.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: NUL-terminated strings that outlive the call, or null.
    let rc = unsafe { libc::mount(p(&src), target.as_ptr(), p(&fstype), flags, p(&data).cast()) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Replace every path to hide by an empty, read-only file or directory, and point
/// resolv.conf at the jail's resolver.
fn hide(paths: &[PathBuf]) -> Result<(), JailError> {
    let fail = |what: &str, e: io::Error| super::diagnose::setup_failed(what, &e);
    let staging = Path::new(STAGING);
    // Nothing done here may propagate back to the host's mounts.
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)
        .map_err(|e| fail("making the jail's mounts private", e))?;
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(Some("tmpfs"), staging, Some("tmpfs"), nosuid, Some("mode=0755,size=64k"))
        .map_err(|e| fail("mounting a tmpfs for the hidden files", e))?;
    let (empty_file, empty_dir, resolv) =
        (staging.join("empty"), staging.join("empty.d"), staging.join("resolv.conf"));
    let staged = (|| {
        std::fs::write(&empty_file, "")?;
        std::fs::create_dir(&empty_dir)?;
        std::fs::write(
            &resolv,
            "# latchkey jail: every name is answered by latchkey\nnameserver 127.0.0.1\n",
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&empty_file, std::fs::Permissions::from_mode(0o444))?;
        std::fs::set_permissions(&empty_dir, std::fs::Permissions::from_mode(0o555))?;
        std::fs::set_permissions(&resolv, std::fs::Permissions::from_mode(0o444))
    })();
    staged.map_err(|e| fail("preparing the hidden files", e))?;
    for path in paths {
        hide_one(path, &empty_file, &empty_dir)?;
    }
    // Without a file to cover, DNS still reaches latchkey: every query on port 53 is
    // redirected to it. The file drops search domains, which would rename queries.
    if Path::new("/etc/resolv.conf").exists() {
        cover(Path::new("/etc/resolv.conf"), &resolv).map_err(|e| fail("covering /etc/resolv.conf", e))?;
    }
    // SAFETY: umount2 on a NUL-terminated path. The covers keep the tmpfs alive.
    if unsafe { libc::umount2(c"/proc".as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(fail("detaching the staging tmpfs", io::Error::last_os_error()).into());
    }
    Ok(())
}

fn hide_one(path: &Path, empty_file: &Path, empty_dir: &Path) -> Result<(), JailError> {
    if path.starts_with(STAGING) || !path.is_absolute() {
        return Ok(());
    }
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        // Absent: nothing to hide. Unreachable to this user: unreachable to CMD too.
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied) => {
            return Ok(());
        }
        Err(e) => return Err(format!("latchkey: cannot hide {}: {e}", path.display()).into()),
    };
    let source = if meta.is_dir() { empty_dir } else { empty_file };
    match cover(path, source) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => Ok(()),
        Err(e) => {
            Err(format!("latchkey: cannot hide {} in the jail: {e}; not starting it", path.display()).into())
        }
    }
}

/// Bind `source` over `target`, read-only.
fn cover(target: &Path, source: &Path) -> io::Result<()> {
    let src = source.to_str().ok_or_else(|| io::Error::other("staging path"))?;
    mount(Some(src), target, None, libc::MS_BIND, None)?;
    let ro = libc::MS_REMOUNT
        | libc::MS_BIND
        | libc::MS_RDONLY
        | libc::MS_NOSUID
        | libc::MS_NODEV
        | libc::MS_NOEXEC;
    mount(None, target, None, ro, None)
}

/// Loopback with every address local to it; nftables hands every TCP connection to
/// latchkey's listener and every DNS query to its resolver; the jail's sockets.
fn network(plan: &Plan) -> Result<Vec<(SocketKind, OwnedFd)>, JailError> {
    let fail = |what: &str, e: io::Error| super::diagnose::setup_failed(what, &e);
    let lo = netlink::loopback_up().map_err(|e| fail("bringing up the jail's loopback", e))?;
    netlink::add_local_default(lo, IpAddr::V4(Ipv4Addr::LOCALHOST))
        .map_err(|e| fail("routing the jail's IPv4 to loopback", e))?;
    // IPv6 may be off in this kernel: then the jail has IPv4 only.
    let v6 = netlink::add_local_default(lo, IpAddr::V6(Ipv6Addr::LOCALHOST)).is_ok();
    let mut loopbacks = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    if v6 {
        loopbacks.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
    }
    let bind_err = |what: &str, e: io::Error| fail(what, e);
    let mut out = Vec::new();
    let proxy = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, plan.proxy_port))
        .map_err(|e| bind_err("listening on the jail's proxy port", e))?;
    out.push((SocketKind::Proxy, OwnedFd::from(proxy)));
    let mut transparent_port = 0;
    for ip in &loopbacks {
        let l = std::net::TcpListener::bind(SocketAddr::new(*ip, transparent_port))
            .map_err(|e| bind_err("listening for the jail's connections", e))?;
        transparent_port = l.local_addr().map_err(|e| bind_err("listener address", e))?.port();
        out.push((SocketKind::Transparent, OwnedFd::from(l)));
    }
    for ip in &loopbacks {
        let u = std::net::UdpSocket::bind(SocketAddr::new(*ip, 53))
            .map_err(|e| bind_err("binding DNS (udp/53)", e))?;
        out.push((SocketKind::DnsUdp, OwnedFd::from(u)));
        let t = std::net::TcpListener::bind(SocketAddr::new(*ip, 53))
            .map_err(|e| bind_err("binding DNS (tcp/53)", e))?;
        out.push((SocketKind::DnsTcp, OwnedFd::from(t)));
    }
    super::nft::install(transparent_port)?;
    Ok(out)
}

static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = FORWARD_TO.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Signals `latchkey exec` passes on (the terminal's own reach CMD directly).
const FORWARDED: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2];

fn set_handler(sig: libc::c_int, handler: libc::sighandler_t) {
    // SAFETY: installing a handler that only calls kill(2), or SIG_IGN/SIG_DFL.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
}

/// Fork the jail's init and wait for it; its status is CMD's.
fn run_init(plan: &Plan) -> u8 {
    // The terminal's SIGINT/SIGQUIT are CMD's to handle; the helper stays.
    set_handler(libc::SIGINT, libc::SIG_IGN);
    set_handler(libc::SIGQUIT, libc::SIG_IGN);
    // SAFETY: this process is single-threaded; the child runs only our own code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        eprintln!("latchkey: cannot start the jail: {}", io::Error::last_os_error());
        return 1;
    }
    if pid == 0 {
        init(plan);
    }
    FORWARD_TO.store(pid, Ordering::Relaxed);
    for sig in FORWARDED {
        set_handler(sig, forward as *const () as libc::sighandler_t);
    }
    wait_for(pid)
}

/// waitpid until `pid` ends; its status as a shell reports it (128+N for signal N).
fn wait_for(pid: libc::pid_t) -> u8 {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status we own.
        let got = unsafe { libc::waitpid(pid, &mut status, 0) };
        if got == pid {
            return shell_status(status);
        }
        if got < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return 1;
        }
    }
}

fn shell_status(status: libc::c_int) -> u8 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status) as u8
    } else if libc::WIFSIGNALED(status) {
        128u8.wrapping_add(libc::WTERMSIG(status) as u8)
    } else {
        1
    }
}

/// pid 1 of the jail: its own /proc, then CMD; reaps every orphan; leaves with CMD's
/// status, which ends every other process in the jail.
fn init(plan: &Plan) -> ! {
    // SAFETY: prctl/mount/fork/exit in a single-threaded child.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if libc::mount(c"proc".as_ptr(), c"/proc".as_ptr(), c"proc".as_ptr(), flags, std::ptr::null()) != 0 {
            let e = io::Error::last_os_error();
            let _ = writeln!(
                io::stderr(),
                "latchkey: cannot mount the jail's /proc: {e}; not running the command"
            );
            libc::_exit(1);
        }
        let child = libc::fork();
        if child < 0 {
            libc::_exit(1);
        }
        if child == 0 {
            run_command(plan);
        }
        FORWARD_TO.store(child, Ordering::Relaxed);
        for sig in FORWARDED {
            set_handler(sig, forward as *const () as libc::sighandler_t);
        }
        loop {
            let mut status = 0;
            let got = libc::waitpid(-1, &mut status, 0);
            if got == child {
                libc::_exit(shell_status(status) as i32);
            }
            if got < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                libc::_exit(1);
            }
        }
    }
}

/// CMD: default signal handling, no inherited descriptors beyond stdio, no capability
/// left (bounding, ambient, permitted, effective, inheritable), no_new_privs, the
/// caller's working directory as seen through the jail's mounts.
fn run_command(plan: &Plan) -> ! {
    reset_signals();
    // SAFETY: close_range with constant bounds.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if let Err(e) = super::caps::drop_all() {
        let _ = writeln!(io::stderr(), "latchkey: cannot drop capabilities in the jail: {e}");
        // SAFETY: _exit in a forked child.
        unsafe { libc::_exit(126) };
    }
    let _ = std::env::set_current_dir(&plan.cwd);
    use std::os::unix::process::CommandExt;
    let (program, args) = plan.argv.split_first().expect("exec requires a command");
    let e = std::process::Command::new(program).args(args).exec();
    let _ = writeln!(io::stderr(), "latchkey: cannot run {program}: {e}");
    let code = if e.kind() == io::ErrorKind::NotFound { 127 } else { 126 };
    // SAFETY: _exit in a forked child.
    unsafe { libc::_exit(code) }
}

fn reset_signals() {
    for sig in 1..32 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            set_handler(sig, libc::SIG_DFL);
        }
    }
    // SAFETY: an empty set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

fn set_cloexec(fd: &OwnedFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
}
