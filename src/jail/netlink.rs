//! The jail's routes, set inside its network namespace with two small rtnetlink
//! requests (no `ip` binary needed): loopback up, and every address local to it, so a
//! connection to anywhere is a local one that nftables can hand to latchkey.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const RTM_NEWROUTE: u16 = 24;
const RT_TABLE_LOCAL: u8 = 255;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const RTA_OIF: u16 = 4;
const RTA_PREFSRC: u16 = 7;

/// Bring `lo` up (SIOCSIFFLAGS) and return its interface index.
pub fn loopback_up() -> io::Result<u32> {
    // SAFETY: ioctls on a socket we own, with an ifreq we own.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = OwnedFd::from_raw_fd(sock);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            return Err(io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) != 0 {
            return Err(io::Error::last_os_error());
        }
        let index = libc::if_nametoindex(c"lo".as_ptr());
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(index)
    }
}

/// `ip route add local 0.0.0.0/0 dev lo src 127.0.0.1 table local` (or `::/0` for
/// IPv6, without a source: the kernel picks ::1).
pub fn add_local_default(ifindex: u32, family: IpAddr) -> io::Result<()> {
    let af = if family.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let mut body = vec![
        af as u8,
        0, // dst_len: the default route
        0,
        0,
        RT_TABLE_LOCAL,
        RTPROT_BOOT,
        RT_SCOPE_HOST,
        RTN_LOCAL,
    ];
    body.extend_from_slice(&0u32.to_ne_bytes()); // rtm_flags
    attr(&mut body, RTA_OIF, &ifindex.to_ne_bytes());
    if let IpAddr::V4(src) = family {
        attr(&mut body, RTA_PREFSRC, &src.octets());
    }
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL;
    request(RTM_NEWROUTE, flags as u16, &body)
}

fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// Send one rtnetlink request and read its acknowledgement.
fn request(kind: u16, flags: u16, body: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    msg.extend_from_slice(body);
    // SAFETY: a netlink socket we own; buffers we own, with their lengths.
    unsafe {
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = OwnedFd::from_raw_fd(fd);
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        let sent = libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        );
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ack = [0u8; 1024];
        let n = libc::recv(sock.as_raw_fd(), ack.as_mut_ptr().cast(), ack.len(), 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        parse_ack(&ack[..n as usize])
    }
}

/// An NLMSG_ERROR message carries 0 (success) or a negative errno.
fn parse_ack(b: &[u8]) -> io::Result<()> {
    const NLMSG_ERROR: u16 = 2;
    if b.len() < 20 || u16::from_ne_bytes([b[4], b[5]]) != NLMSG_ERROR {
        return Err(io::Error::other("unexpected netlink answer"));
    }
    match i32::from_ne_bytes([b[16], b[17], b[18], b[19]]) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}
