//! Secret sources through the real binary: a slow `value_command` never stalls other
//! traffic, and a `value_command` child never sees a secret latchkey holds.

mod common;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

/// `value_command`s that take as long as the test wants (they wait while a gate file
/// exists) are being re-run for several requests at once, one per runtime thread and
/// more; a request to an unrelated host is served meanwhile, and each command runs once
/// for all the requests waiting on it.
#[test]
fn a_slow_value_command_never_stalls_other_hosts() {
    let up = upstream(true, None);
    let dir = tempfile::tempdir().unwrap();
    let (gate, runs) = (dir.path().join("gate"), dir.path().join("runs"));
    let script = format!(
        "echo run >> {runs}; while [ -e {gate} ]; do sleep 0.05; done; echo slow-REAL",
        runs = runs.display(),
        gate = gate.display()
    );
    // More slow credentials than latchkey has runtime threads (one per core).
    let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) + 1;
    let mut cfg = String::from(
        "[credentials.fast]\nheader = \"x-token\"\nvalue = \"fast-REAL\"\ndomains = [\"other.example.com\"]\n",
    );
    for i in 0..n {
        cfg.push_str(&format!(
            "\n[credentials.slow{i}]\nheader = \"x-token\"\nvalue_command = [\"sh\", \"-c\", \"{script}\"]\nvalue_command_ttl = 1\ndomains = [\"api.example.com\"]\npaths = [\"/p{i}\"]\n"
        ));
    }
    let lk = Latchkey::start(Some(&up), &cfg, &[]);
    assert_eq!(lines(&runs), n, "each ran once at load");
    std::fs::write(&gate, "").unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // past the TTL
    let slow: Vec<_> = (0..2 * n)
        .map(|i| {
            let (port, bundle) = (lk.port, lk.bundle());
            std::thread::spawn(move || {
                let out = std::process::Command::new("curl")
                    .args(["-sS", "--max-time", "60", "-o", "-", "-w", "\n%{http_code}"])
                    .args(["-x", &format!("http://127.0.0.1:{port}"), "--cacert"])
                    .arg(bundle)
                    .arg(format!("https://api.example.com/p{}", i % n))
                    .output()
                    .unwrap();
                parse_curl(out)
            })
        })
        .collect();
    wait_for("every refresh to start", || lines(&runs) == 2 * n);
    std::thread::sleep(Duration::from_millis(300)); // every slow request is waiting now
    let started = Instant::now();
    let (code, body) = lk.curl(&["https://other.example.com/"]);
    let took = started.elapsed();
    eprintln!("unrelated request while {n} value_commands ran: {} ms", took.as_millis());
    assert_eq!(code, 200, "{body}");
    assert_eq!(echoed(&body, "x-token"), ["fast-REAL"]);
    assert!(gate.exists(), "served while the commands were still running");
    assert!(took < Duration::from_secs(2), "{took:?}");
    std::fs::remove_file(&gate).unwrap();
    for t in slow {
        let (code, body) = t.join().unwrap();
        assert_eq!(code, 200, "{body}");
        assert_eq!(echoed(&body, "x-token"), ["slow-REAL"]);
    }
    assert_eq!(lines(&runs), 2 * n, "one run per credential for all its waiting requests");
}

/// The attack: the agent (same uid) reads `/proc/<child>/environ` of a value_command,
/// at load or when it re-runs after its TTL. The command here dumps its own initial
/// environment to a file; no secret latchkey holds may be in it.
#[test]
fn value_command_children_get_no_secret() {
    let up = upstream(true, None);
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("environ");
    let script = format!("tr '\\\\000' '\\\\n' < /proc/$$/environ >> {}; echo vault-REAL", dump.display());
    let cfg = format!(
        r#"[agents.coder]
token = "${{CODER_TOKEN}}"

[credentials.anthropic]
header = "x-api-key"
value = "${{ANTHROPIC_API_KEY}}"
domains = ["api.anthropic.com"]

[credentials.vault]
header = "x-token"
value_command = ["sh", "-c", "{script}"]
value_command_ttl = 1
value_command_env = ["VAULT_ADDR"]
domains = ["api.example.com"]
"#
    );
    let secrets = [
        ("ANTHROPIC_API_KEY", "sk-ant-REAL-environ"),
        ("CODER_TOKEN", "agent-token-REAL"),
        ("DATABASE_URL", "postgres://user:db-REAL@db"),
    ];
    let mut env = secrets.to_vec();
    env.push(("VAULT_ADDR", "https://vault.example"));
    let lk = Latchkey::start(Some(&up), &cfg, &env);
    // Let the TTL pass and make a request, so the command also runs from the runtime.
    std::thread::sleep(Duration::from_millis(1100));
    let proxy = format!("http://coder:agent-token-REAL@127.0.0.1:{}", lk.port);
    let out = std::process::Command::new("curl")
        .args(["-sS", "-x", &proxy, "--cacert"])
        .arg(lk.bundle())
        .arg("https://api.example.com/")
        .output()
        .unwrap();
    assert_eq!(echoed(&String::from_utf8_lossy(&out.stdout), "x-token"), ["vault-REAL"]);
    let seen = std::fs::read_to_string(&dump).unwrap();
    assert_eq!(seen.matches("VAULT_ADDR=").count(), 2, "two runs: {seen}");
    for (name, value) in secrets {
        assert!(!seen.contains(value), "{name} reached the value_command: {seen}");
    }
    let mut names: Vec<&str> = seen.lines().filter_map(|l| l.split_once('=')).map(|(k, _)| k).collect();
    names.sort();
    names.dedup();
    assert_eq!(names, ["HOME", "PATH", "VAULT_ADDR"], "{seen}");
}

/// value_command_env may not hand a credential's or an agent's secret variable over.
#[test]
fn value_command_env_never_names_a_secret_variable() {
    let dir = tempfile::tempdir().unwrap();
    for var in ["ANTHROPIC_API_KEY", "CODER_TOKEN", "BAD-NAME"] {
        let body = format!(
            "[agents.coder]\ntoken = \"${{CODER_TOKEN}}\"\n\n[credentials.anthropic]\nheader = \"x-api-key\"\nvalue = \"${{ANTHROPIC_API_KEY}}\"\ndomains = [\"api.anthropic.com\"]\n\n[credentials.vault]\nheader = \"x-token\"\nvalue_command = [\"echo\", \"v\"]\nvalue_command_env = [\"{var}\"]\ndomains = [\"api.example.com\"]\n"
        );
        let path = write_config(dir.path(), free_port(), None, &body);
        let o = latchkey_cmd(dir.path(), &[]).args(["check", "--config"]).arg(&path).output().unwrap();
        let text = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{var}: {text}");
        assert!(text.contains("credentials.vault.value_command_env"), "{text}");
    }
}
