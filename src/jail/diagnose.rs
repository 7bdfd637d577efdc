//! Why a jail cannot be made, naming the setting at fault (SPEC section 9: latchkey
//! exits 1 and never runs CMD unjailed).

use std::io;

fn sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn seccomp_filtered() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Seccomp:") && l.trim_end().ends_with('2')))
        .unwrap_or(false)
}

/// The setting that forbids unprivileged user namespaces here, as a sentence.
pub fn userns_culprit() -> String {
    if sysctl("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        return "the sysctl user.max_user_namespaces is 0 (as root: sysctl -w user.max_user_namespaces=15000)".into();
    }
    if sysctl("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        return "the sysctl kernel.unprivileged_userns_clone is 0 (as root: sysctl -w kernel.unprivileged_userns_clone=1)".into();
    }
    if sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
        return "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns = 1): give latchkey an AppArmor profile that allows `userns,`, or set that sysctl to 0".into();
    }
    if seccomp_filtered() {
        return "a seccomp filter on this process forbids it (inside a container, its seccomp profile: run latchkey outside it, or use transparent mode there)".into();
    }
    "the kernel refused (is CONFIG_USER_NS enabled?)".into()
}

pub fn unshare_failed(e: io::Error, user_ns: bool) -> String {
    if user_ns {
        format!(
            "latchkey: exec --jail needs an unprivileged user namespace, and this system does not allow one ({e}): {}; not running the command",
            userns_culprit()
        )
    } else {
        format!("latchkey: cannot create the jail's namespaces: {e}; not running the command")
    }
}

/// A step after the namespaces were made failed; EPERM there is usually AppArmor's
/// user-namespace restriction, which lets the namespace be made but strips its powers.
pub fn setup_failed(what: &str, e: &io::Error) -> String {
    let hint = if e.raw_os_error() == Some(libc::EPERM)
        && sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1")
    {
        format!(" ({})", userns_culprit())
    } else {
        String::new()
    };
    format!("latchkey: {what} failed: {e}{hint}; not running the command")
}
