//! Whether a redirected connection is latchkey's own, come back: the transparent rules
//! must exempt latchkey's uid, and when they do not, every upstream connection latchkey
//! opens is redirected to its own listener (a loop that ends only at the connection
//! limits). The kernel knows who owns the other end: one `sock_diag` query (what `ss`
//! uses; no privilege needed) for the socket with that exact 4-tuple returns its uid.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const INET_DIAG_NOCOOKIE: u32 = !0;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid` (linux/inet_diag.h); ports and addresses big-endian.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_msg`, as far as the uid.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Reply {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

/// The uid owning the TCP socket whose local address is `local` and remote `remote`
/// (as that socket sees them), if there is one in this network namespace.
pub fn tcp_owner(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u32>> {
    let (family, src, dst) = match (local.ip(), remote.ip()) {
        (IpAddr::V4(l), IpAddr::V4(r)) => (libc::AF_INET, padded(&l.octets()), padded(&r.octets())),
        (IpAddr::V6(l), IpAddr::V6(r)) => (libc::AF_INET6, l.octets(), r.octets()),
        _ => return Ok(None),
    };
    let id = SockId {
        sport: local.port().to_be_bytes(),
        dport: remote.port().to_be_bytes(),
        src,
        dst,
        interface: 0,
        cookie: [INET_DIAG_NOCOOKIE; 2],
    };
    let req = Request {
        family: family as u8,
        protocol: libc::IPPROTO_TCP as u8,
        states: !0,
        id,
        ..Default::default()
    };
    let len = std::mem::size_of::<NlMsgHdr>() + std::mem::size_of::<Request>();
    let hdr = NlMsgHdr {
        len: len as u32,
        kind: SOCK_DIAG_BY_FAMILY,
        flags: libc::NLM_F_REQUEST as u16,
        seq: 1,
        pid: 0,
    };
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(bytes_of(&hdr));
    out.extend_from_slice(bytes_of(&req));
    let fd = netlink()?;
    // SAFETY: send/recv read and write the buffers we own, of the lengths given.
    let mut buf = [0u8; 512];
    let n = unsafe {
        if libc::send(fd.as_raw_fd(), out.as_ptr().cast(), out.len(), 0) < 0 {
            return Err(io::Error::last_os_error());
        }
        libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = &buf[..n as usize];
    let hdr_len = std::mem::size_of::<NlMsgHdr>();
    let Some(hdr) = read::<NlMsgHdr>(got) else { return Ok(None) };
    if hdr.kind == NLMSG_ERROR || hdr.kind != SOCK_DIAG_BY_FAMILY {
        // ENOENT: no such socket here (another host's connection, in gateway mode).
        return Ok(None);
    }
    Ok(read::<Reply>(&got[hdr_len..]).map(|r| r.uid))
}

fn padded(v4: &[u8; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(v4);
    a
}

fn netlink() -> io::Result<OwnedFd> {
    // SAFETY: socket has no pointer arguments; a valid fd is owned from here on.
    unsafe {
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        // The kernel answers at once; never let a lost reply hold the connection.
        let tv = libc::timeval { tv_sec: 1, tv_usec: 0 };
        let size = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const tv).cast(), size);
        Ok(fd)
    }
}

fn bytes_of<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a plain #[repr(C)] struct of integers, without padding bytes.
    unsafe { std::slice::from_raw_parts((v as *const T).cast(), std::mem::size_of::<T>()) }
}

fn read<T: Copy + Default>(b: &[u8]) -> Option<T> {
    if b.len() < std::mem::size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    // SAFETY: copies size_of::<T>() bytes into a plain #[repr(C)] integer struct.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&raw mut v).cast(), std::mem::size_of::<T>()) };
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_of_a_connection_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        // SAFETY: geteuid has no arguments.
        let me = unsafe { libc::geteuid() };
        let owner = tcp_owner(c.local_addr().unwrap(), c.peer_addr().unwrap()).unwrap();
        assert_eq!(owner, Some(me));
        // Seen from the other end: that socket's local is the client's remote.
        assert_eq!(tcp_owner(s.local_addr().unwrap(), s.peer_addr().unwrap()).unwrap(), Some(me));
        let nobody: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(tcp_owner(nobody, l.local_addr().unwrap()).unwrap(), None);
        assert_eq!(std::mem::size_of::<Request>(), 56);
        assert_eq!(std::mem::size_of::<Reply>(), 72);
    }
}
