//! `auth_type = "github_app"` through the real binary: a loopback GitHub stand-in
//! (tests/py/github_app_server.py) verifies the app JWT with the app's public key and
//! mints installation tokens limited to the repositories asked for; `git clone` and curl
//! run under `latchkey exec` with placeholders only; the installation token never
//! reaches the agent's environment, files, responses or latchkey's log.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn run(dir: &Path, prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog).current_dir(dir).args(args).output().unwrap();
    assert!(o.status.success(), "{prog} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Two bare repositories under `root/org`: `allowed` and `other`.
fn repositories(root: &Path) {
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    run(&work, "git", &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("README.md"), "hello from the app's repository\n").unwrap();
    let id = ["-c", "user.name=t", "-c", "user.email=t@example.com"];
    run(&work, "git", &[&id[..], &["add", "."]].concat());
    run(&work, "git", &[&id[..], &["commit", "-qm", "init"]].concat());
    std::fs::create_dir_all(root.join("org")).unwrap();
    for name in ["allowed", "other"] {
        run(root, "git", &["clone", "-q", "--bare", work.to_str().unwrap(), &format!("org/{name}.git")]);
    }
}

struct Setup {
    _server: PyServer,
    lk: Latchkey,
}

/// The stand-in (both GitHub hosts resolve to it) and latchkey with a github_app
/// credential whose key is a PKCS#1 PEM file, narrowed to `allowed` with contents:read.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let git_root = d.join("git");
    repositories(&git_root);
    let (cert, key) = (d.join("up.crt"), d.join("up.key"));
    std::fs::write(&cert, &pki().cert_pem).unwrap();
    std::fs::write(&key, &pki().key_pem).unwrap();
    // GitHub hands out app keys as PKCS#1 ("BEGIN RSA PRIVATE KEY").
    let app_key = d.join("app.pem");
    run(d, "openssl", &["genrsa", "-traditional", "-out", app_key.to_str().unwrap(), "2048"]);
    set_mode(&app_key, 0o600);
    let public = d.join("app-public.pem");
    run(
        d,
        "openssl",
        &["rsa", "-in", app_key.to_str().unwrap(), "-pubout", "-out", public.to_str().unwrap()],
    );
    assert!(std::fs::read_to_string(&app_key).unwrap().contains("BEGIN RSA PRIVATE KEY"));
    let mut cmd = py("github_app_server.py");
    cmd.args([&cert, &key, &public]).args(["4242", "99"]).arg(&git_root);
    let (server, addr) = python_upstream(cmd);
    let cfg = format!(
        r#"[credentials.gh]
auth_type = "github_app"
app_id = 4242
installation_id = 99
value_file = "{}"
repositories = ["allowed"]
permissions = {{ contents = "read" }}
domains = ["api.github.com", "github.com"]
env = ["GH_TOKEN"]

[proxy.logging]
log_requests = true
log_file = "{}"
"#,
        app_key.display(),
        d.join("requests.log").display()
    );
    let port = free_port();
    let config = write_config(d, port, Some(addr), &cfg);
    Setup { _server: server, lk: Latchkey::spawn(dir, port, config, &[]) }
}

#[test]
fn git_clone_and_the_api_work_with_placeholders_only() {
    let Setup { _server, lk } = setup();
    let work = lk.dir.path().join("agent");
    std::fs::create_dir_all(&work).unwrap();
    // The agent: checks it holds only the placeholder, clones the repository the token
    // covers, fails to clone one it does not, asks the API what its token may reach,
    // and leaves its whole environment and answers in files.
    let script = r#"set -e
test "$GH_TOKEN" = latchkey-gh
env > env.txt
git clone -q https://github.com/org/allowed.git allowed
if git clone -q https://github.com/org/other.git other 2> other.err; then exit 3; fi
curl -sS -H "authorization: Bearer $GH_TOKEN" https://api.github.com/installation/repositories > repos.json
curl -sS https://api.github.com/debug/mints > mints.json
"#;
    let o = latchkey_cmd(lk.dir.path(), &[("GIT_TERMINAL_PROMPT", "0")])
        .current_dir(&work)
        .args(["exec", "--config"])
        .arg(&lk.config_path)
        .args(["--", "sh", "-c", script])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        lk.stderr()
    );
    let read = |p: &str| std::fs::read_to_string(work.join(p)).unwrap();
    assert_eq!(read("allowed/README.md"), "hello from the app's repository\n");
    assert!(
        read("other.err").contains("not found") || read("other.err").contains("404"),
        "{}",
        read("other.err")
    );
    assert_eq!(json(&read("repos.json"))["repositories"], serde_json::json!([{ "name": "allowed" }]));
    let mints = json(&read("mints.json"));
    assert_eq!(
        mints,
        serde_json::json!([{ "repositories": ["allowed"], "permissions": { "contents": "read" } }]),
        "one mint, narrowed, shared by git and the API"
    );
    // No installation token, app key or JWT anywhere the agent or the log can read.
    let mut seen = String::new();
    for entry in walk(&work) {
        seen.push_str(&String::from_utf8_lossy(&std::fs::read(entry).unwrap()));
    }
    seen.push_str(&String::from_utf8_lossy(&o.stdout));
    seen.push_str(&String::from_utf8_lossy(&o.stderr));
    seen.push_str(&lk.stderr());
    seen.push_str(&std::fs::read_to_string(lk.dir.path().join("requests.log")).unwrap());
    assert!(seen.contains("GH_TOKEN=latchkey-gh"), "the check can see the environment");
    for needle in ["ghs_minted", "BEGIN RSA PRIVATE KEY", "eyJhbGciOiJSUzI1NiI"] {
        assert!(!seen.contains(needle), "{needle} leaked to the agent or the log");
    }
}

#[test]
fn without_latchkey_the_stand_in_refuses() {
    let Setup { _server, lk } = setup();
    // The API through latchkey but to a host the credential does not name: no token.
    let ca = lk.dir.path().join("upstream-ca.pem").display().to_string();
    let (code, _) =
        lk.curl(&["--cacert", &ca, "https://raw.githubusercontent.com/installation/repositories"]);
    assert_eq!(code, 401, "the stand-in refuses requests without a minted token");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}
