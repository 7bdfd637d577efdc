//! `latchkey transparent-rules`: the nftables ruleset that makes latchkey a network
//! namespace's only way out (SPEC 9, transparent mode). Printed, never installed:
//! whoever holds NET_ADMIN (a Kubernetes init container, root on a host) loads it with
//! `nft -f -`, and latchkey itself needs no capability.

use std::process::ExitCode;

/// The port `[proxy] transparent` listens on in the docs and the sidecar manifests.
pub const DEFAULT_PORT: u16 = 3130;

pub fn print(port: u16, exclude_uid: Option<u32>) -> ExitCode {
    // SAFETY: geteuid has no arguments.
    let uid = exclude_uid.unwrap_or_else(|| unsafe { libc::geteuid() });
    print!("{}", ruleset(port, uid));
    ExitCode::SUCCESS
}

/// Output hook only: what this namespace's processes open. The table is replaced whole
/// (created, deleted, defined in one transaction), so loading it twice is harmless.
///
/// - nat: every new TCP connection goes to latchkey's listener on `port` (IPv4 to
///   127.0.0.1, IPv6 to ::1), except `uid`'s (latchkey's own upstream connections,
///   which would otherwise come back to it) and those to the namespace's own addresses
///   (loopback, where latchkey's proxy and admin ports are; a pod's local services).
/// - filter: nothing else leaves: DNS (UDP 53) is let through (the name a client then
///   connects to is checked by latchkey, not the address it resolved), other UDP is
///   refused at once (QUIC falls back to TCP), ICMP dropped; ICMPv6 passes (neighbour
///   discovery), and replies on connections that came in.
pub fn ruleset(port: u16, uid: u32) -> String {
    format!(
        "# latchkey transparent mode: this network namespace's outbound TCP goes to latchkey's
# [proxy] transparent listener on port {port}; uid {uid} (latchkey's own) is exempt.
# Load with: latchkey transparent-rules --port {port} --exclude-uid {uid} | nft -f -
table inet latchkey_transparent {{}}
delete table inet latchkey_transparent
table inet latchkey_transparent {{
  chain nat_output {{
    type nat hook output priority -100; policy accept;
    meta skuid {uid} return
    fib daddr type local return
    meta l4proto tcp redirect to :{port}
  }}
  chain filter_output {{
    type filter hook output priority 0; policy drop;
    meta skuid {uid} accept
    ct state established,related accept
    fib daddr type local accept
    udp dport 53 accept
    meta l4proto ipv6-icmp accept
    meta l4proto udp reject
  }}
}}
"
    )
}
