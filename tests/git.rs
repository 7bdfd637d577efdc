//! `git clone` over HTTPS through latchkey from a local smart-HTTP server that
//! requires the real token, while git itself only ever holds the placeholder.

mod common;
use std::process::Command;

use common::*;

fn git(dir: &std::path::Path, args: &[&str]) {
    let o = Command::new("git").current_dir(dir).args(args).output().unwrap();
    assert!(o.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn git_clone_gets_basic_auth_injected() {
    use base64::Engine;
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("README.md"), "hello from the upstream\n").unwrap();
    git(&work, &["-c", "user.name=t", "-c", "user.email=t@example.com", "add", "."]);
    git(&work, &["-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "init"]);
    std::fs::create_dir_all(root.path().join("org")).unwrap();
    git(root.path(), &["clone", "-q", "--bare", work.to_str().unwrap(), "org/repo.git"]);

    let token = "ghp_REALTOKEN";
    let expect = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"))
    );
    let server = GitServer { root: root.path().to_path_buf(), expect_authorization: expect };
    let up = upstream(true, Some(server));
    // Zero-config: the built-in GitHub provider from GH_TOKEN.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), free_port(), Some(up.addr), "");
    let dest = dir.path().join("clone");
    let o = latchkey_cmd(dir.path(), &[("GH_TOKEN", token), ("GIT_TERMINAL_PROMPT", "0")])
        .args(["exec", "--config"])
        .arg(&config)
        .args([
            "--",
            "sh",
            "-c",
            "test \"$GH_TOKEN\" = latchkey-github && git clone -q https://github.com/org/repo.git \"$0\"",
            dest.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read_to_string(dest.join("README.md")).unwrap(), "hello from the upstream\n");
    assert!(up.requests().iter().all(|r| r.header_all("authorization").len() == 1));

    // Without latchkey's injection the same server refuses: the test can fail.
    let o = Command::new("git")
        .args([
            "-c",
            "http.sslVerify=false",
            "clone",
            "-q",
            &format!("https://127.0.0.1:{}/org/repo.git", up.addr.port()),
        ])
        .arg(dir.path().join("direct"))
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .unwrap();
    assert!(!o.status.success());
}
