//! `value_keyring = "SERVICE/ACCOUNT"` against Debian's gnome-keyring (Secret Service)
//! in a private D-Bus session: the secret stored with `secret-tool` is injected; locking
//! the keyring makes the credential's requests 502 (never the stale value).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "kr-REAL-keyring-secret";

/// A `dbus-run-session` with an unlocked gnome-keyring holding SECRET under
/// latchkey-test/api; the whole process group is killed on drop.
struct Session {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this test started.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn need(prog: &str, package: &str) {
    let found =
        Command::new("sh").args(["-c", &format!("command -v {prog}")]).output().unwrap().status.success();
    assert!(found, "{prog} is not installed: apt-get install {package} (scripts/test.sh does)");
}

fn session() -> Session {
    use std::os::unix::process::CommandExt;
    need("dbus-run-session", "dbus-daemon");
    need("gnome-keyring-daemon", "gnome-keyring");
    need("secret-tool", "libsecret-tools");
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "echo -n keyring-pw | gnome-keyring-daemon --unlock >/dev/null && sleep 0.5 && \
         echo -n {SECRET} | secret-tool store --label=latchkey-test service latchkey-test username api && \
         echo \"$DBUS_SESSION_BUS_ADDRESS\" > {0}/address.tmp && mv {0}/address.tmp {0}/address && exec sleep 600",
        dir.path().display()
    );
    let child = Command::new("dbus-run-session")
        .args(["--", "sh", "-c", &script])
        .env("HOME", dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let address = loop {
        if let Ok(a) = std::fs::read_to_string(dir.path().join("address")) {
            break a.trim().to_string();
        }
        assert!(Instant::now() < deadline, "gnome-keyring did not start in dbus-run-session");
        std::thread::sleep(Duration::from_millis(100));
    };
    Session { child, address, _dir: dir }
}

impl Session {
    /// Lock the login collection over the Secret Service API.
    fn lock(&self) {
        let o = Command::new("dbus-send")
            .env("DBUS_SESSION_BUS_ADDRESS", &self.address)
            .args([
                "--session",
                "--print-reply",
                "--dest=org.freedesktop.secrets",
                "/org/freedesktop/secrets",
            ])
            .args([
                "org.freedesktop.Secret.Service.Lock",
                "array:objpath:/org/freedesktop/secrets/collection/login",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn a_keyring_secret_is_injected_and_a_locked_keyring_is_a_502() {
    let session = session();
    let up = upstream(true, None);
    let body = "[credentials.api]\nauth_type = \"bearer\"\nvalue_keyring = \"latchkey-test/api\"\ndomains = [\"api.example.com\"]\n\n\
                [credentials.absent]\nauth_type = \"bearer\"\nvalue_keyring = \"latchkey-test/nobody\"\ndomains = [\"other.example.com\"]\n";
    let lk = Latchkey::start(Some(&up), body, &[("DBUS_SESSION_BUS_ADDRESS", &session.address)]);
    let (code, text) = lk.curl(&["https://api.example.com/from-keyring"]);
    assert_eq!(code, 200, "{text}\n{}", lk.stderr());
    assert_eq!(echoed(&text, "authorization"), vec![format!("Bearer {SECRET}")]);
    // A missing entry leaves its credential inactive (as an unset variable would).
    let check = lk.cli(&["check"], &[("DBUS_SESSION_BUS_ADDRESS", &session.address)]);
    let said = String::from_utf8_lossy(&check.stdout).into_owned() + &String::from_utf8_lossy(&check.stderr);
    assert!(said.contains("latchkey-test/nobody"), "{said}");
    assert!(!said.contains(SECRET));

    session.lock();
    std::thread::sleep(Duration::from_millis(2500)); // KEYRING_RECHECK, and a margin
    let (code, text) = lk.curl(&["https://api.example.com/locked"]);
    assert_eq!(code, 502, "a locked keyring fails closed: {text}");
    assert!(text.contains("credential api"), "{text}");
    assert!(lk.stderr().contains("keyring entry latchkey-test/api"), "the cause is logged: {}", lk.stderr());
    assert!(!lk.stderr().contains(SECRET), "the value is never logged");
    assert_eq!(up.count(), 1, "nothing went upstream after the lock");
}
