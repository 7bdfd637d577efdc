//! Capabilities: the helper lends `nft` CAP_NET_ADMIN; CMD ends with none at all.

use std::io;

const CAP_NET_ADMIN: u32 = 12;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// SECBIT_NOROOT, its lock, SECBIT_NO_CAP_AMBIENT_RAISE and its lock: uid 0 (when
/// latchkey runs as root) gains nothing by exec, and no ambient capability comes back.
const SECUREBITS: libc::c_ulong = 0x01 | 0x02 | 0x40 | 0x80;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capget() -> io::Result<[Data; 2]> {
    let mut hdr = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget fills the two structs we own.
    if unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(data)
}

fn capset(data: &[Data; 2]) -> io::Result<()> {
    let mut hdr = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    // SAFETY: capset reads the two structs we own.
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// For a child about to exec `nft` as a non-root user in the jail's user namespace:
/// keep CAP_NET_ADMIN across exec (ambient), nothing else.
pub fn lend_net_admin() -> io::Result<()> {
    let mut data = capget()?;
    data[0].inheritable |= 1 << CAP_NET_ADMIN;
    capset(&data)?;
    // SAFETY: prctl with constant arguments.
    let rc = unsafe {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, CAP_NET_ADMIN as libc::c_ulong, 0, 0)
    };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Drop every capability for good: bounding set, ambient, inheritable, permitted,
/// effective; lock uid 0 out of regaining them; set no_new_privs.
pub fn drop_all() -> io::Result<()> {
    // SAFETY: prctl calls with constant arguments.
    unsafe {
        // Needs CAP_SETPCAP, which the jail's init holds; best effort for the locks.
        libc::prctl(libc::PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0);
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(io::Error::last_os_error());
            }
        }
        if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    capset(&[Data::default(); 2])?;
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
