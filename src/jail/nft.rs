//! The jail's nftables rules, installed inside its network namespace with `nft -f -`
//! (one atomic transaction). Every TCP connection to a non-loopback address goes to
//! latchkey's listener (which reads the original destination); every DNS query, to
//! whatever server, goes to latchkey's resolver; other UDP is refused at once (QUIC
//! falls back to TCP without waiting), ICMP and every other protocol dropped.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

pub fn ruleset(transparent_port: u16) -> String {
    format!(
        "table inet latchkey {{
  chain nat_out {{
    type nat hook output priority -100; policy accept;
    meta l4proto {{ tcp, udp }} th dport 53 redirect to :53
    ip daddr 127.0.0.0/8 return
    ip6 daddr ::1 return
    meta l4proto tcp redirect to :{transparent_port}
  }}
  chain filter_out {{
    type filter hook output priority 0; policy drop;
    ip daddr 127.0.0.0/8 accept
    ip6 daddr ::1 accept
    meta l4proto udp reject
  }}
}}
"
    )
}

/// `nft` on PATH, else where distributions put it (often off a user's PATH).
fn nft_program() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join("nft"))
        .find(|p| p.is_file())
}

pub fn install(transparent_port: u16) -> Result<(), super::JailError> {
    let Some(nft) = nft_program() else {
        return Err("latchkey: exec --jail needs nftables' `nft` program to send the jail's connections to latchkey, and it is not installed (Debian/Ubuntu: apt install nftables; Fedora: dnf install nftables); not running the command".into());
    };
    let mut cmd = Command::new(&nft);
    cmd.args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::process::CommandExt;
        // SAFETY: the hook only makes syscalls (capget/capset/prctl).
        unsafe { cmd.pre_exec(super::caps::lend_net_admin) };
    }
    let mut child = cmd.spawn().map_err(|e| format!("latchkey: cannot run {}: {e}", nft.display()))?;
    let mut stdin = child.stdin.take().expect("piped");
    let _ = stdin.write_all(ruleset(transparent_port).as_bytes());
    drop(stdin);
    let out = child.wait_with_output().map_err(|e| format!("latchkey: {}: {e}", nft.display()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(super::JailError(format!(
        "latchkey: the jail's nftables rules were refused ({}): {}. The kernel needs nf_tables with NAT (modules nf_tables, nft_chain_nat, nft_redir, nft_reject_inet: as root, `modprobe` them); not running the command",
        nft.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}
