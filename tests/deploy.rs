//! Deployment without a container runtime (issue 16.8, 16.4): configuration by
//! `LATCHKEY_*` variables through the real binary, `latchkey health` (the image's
//! HEALTHCHECK), a CA mounted as Kubernetes mounts a Secret, the systemd unit, and the
//! Kubernetes manifests validated offline and rendered with kustomize.

mod common;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The allowlist, the clients and the CA directory from variables, the upstream mapping
/// from the file: both apply, and the variables win over the file.
#[test]
fn variables_override_the_file_in_a_running_proxy() {
    let up = upstream(true, None);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = write_config(
        dir.path(),
        free_port(),
        Some(up.addr),
        "[credentials.x]\nheader = \"x-key\"\nvalue = \"REAL\"\ndomains = [\"api.example.com\"]\n",
    );
    let ca_dir = dir.path().join("ca-from-env");
    let public = dir.path().join("public");
    let listen = format!("127.0.0.1:{port}");
    let env = [
        ("LATCHKEY_LISTEN", listen.as_str()),
        ("LATCHKEY_CA_DIR", ca_dir.to_str().unwrap()),
        ("LATCHKEY_CA_EXPORT_DIR", public.to_str().unwrap()),
        ("LATCHKEY_ALLOWED_DOMAINS", "api.example.com"),
        ("LATCHKEY_ALLOWED_CLIENTS", "127.0.0.1"),
    ];
    let lk = Latchkey::spawn(dir, port, cfg, &env);
    assert!(ca_dir.join("ca.crt").exists(), "the CA is made in LATCHKEY_CA_DIR");
    // The export directory gets the public half only, readable by the agent's uid.
    let mut exported: Vec<String> =
        std::fs::read_dir(&public).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    exported.sort();
    assert_eq!(exported, ["bundle.pem", "ca.crt"], "never the key");
    assert_eq!(std::fs::read(public.join("ca.crt")).unwrap(), std::fs::read(ca_dir.join("ca.crt")).unwrap());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(public.join("ca.crt")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
    let curl = |url: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}", "-x", &lk.proxy_url()])
            .arg("--cacert")
            .arg(ca_dir.join("bundle.pem"))
            .arg(url)
            .output()
            .unwrap();
        parse_curl(out)
    };
    let (code, body) = curl("https://api.example.com/x");
    assert_eq!(code, 200, "{body}\n{}", lk.stderr());
    assert_eq!(echoed(&body, "x-key"), ["REAL"]);
    let (code, body) = curl("http://other.example.com/x");
    assert_eq!(code, 403, "LATCHKEY_ALLOWED_DOMAINS is enforced: {body}");
    assert!(body.contains("allowed_domains"), "{body}");
}

/// A bad value in a variable stops the start (exit 2) with the variable named, like a
/// bad value in the file; nothing listens.
#[test]
fn a_bad_variable_is_a_config_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "LATCHKEY_ALLOWED_CLIENTS",
            "10.0.0.0/8,not-a-net",
            "LATCHKEY_ALLOWED_CLIENTS (overrides proxy.allowed_clients): \"not-a-net\" is not an IP or CIDR",
        ),
        (
            "LATCHKEY_LISTEN",
            "0.0.0.0:3128",
            "LATCHKEY_LISTEN (overrides proxy.bind): binding to 0.0.0.0 (not loopback) needs allowed_clients",
        ),
        (
            "LATCHKEY_LISTEN",
            "latchkey:3128",
            "LATCHKEY_LISTEN (overrides proxy.bind): \"latchkey:3128\" is not ip:port",
        ),
        (
            "LATCHKEY_LOG_REQUESTS",
            "sometimes",
            "LATCHKEY_LOG_REQUESTS (overrides proxy.logging.log_requests): \"sometimes\" is not a boolean",
        ),
    ];
    for (var, value, expected) in cases {
        let out = latchkey_cmd(dir.path(), &[(var, value)]).args(["run"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}={value}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("latchkey: config error: {expected}")), "{var}={value}: {err}");
    }
}

#[test]
fn health_probes_the_admin_endpoint() {
    let admin = free_port();
    let lk = Latchkey::start(None, &format!("[admin]\nlisten = \"0.0.0.0:{admin}\"\n"), &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let ok = loop {
        let out = lk.cli(&["health"], &[]);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(ok.status.success(), "{}", text(&ok));
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "ready");
    let alive = lk.cli(&["health", "--path", "/healthz"], &[]);
    assert_eq!(String::from_utf8_lossy(&alive.stdout).trim(), "ok", "{}", text(&alive));
    // Nothing there: 1, and the address is named.
    let dead = free_port();
    let out = latchkey_cmd(lk.dir.path(), &[])
        .args(["health", "--admin", &format!("127.0.0.1:{dead}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains(&format!("127.0.0.1:{dead}")), "{}", text(&out));
    // The variable wins over the file.
    let var = format!("127.0.0.1:{dead}");
    let out = lk.cli(&["health"], &[("LATCHKEY_ADMIN_LISTEN", &var)]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // No admin endpoint at all: 2, saying what to set.
    let dir = tempfile::tempdir().unwrap();
    let out = latchkey_cmd(dir.path(), &[]).arg("health").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("set [admin] listen"), "{}", text(&out));
}

/// The probe runs every few seconds: it must not run value_commands or read secrets.
#[test]
fn health_touches_no_secret_source() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("command-ran");
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[admin]\nlisten = \"127.0.0.1:{}\"\n[credentials.c]\nheader = \"k\"\nvalue_command = [\"touch\", \"{}\"]\ndomains = [\"a.example\"]\n",
            free_port(),
            marker.display()
        ),
    )
    .unwrap();
    set_mode(&cfg, 0o600);
    let out = latchkey_cmd(dir.path(), &[]).args(["health", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "nothing listens: {}", text(&out));
    assert!(!marker.exists(), "latchkey health ran a value_command");
}

/// A CA mounted the way Kubernetes mounts a Secret for a pod with `fsGroup`: a sticky,
/// world-writable tmpfs, mounted read-only, the files behind `..data` symlinks, owned by
/// root, mode 0440, group = the pod's fsGroup. latchkey runs as another uid in that group
/// and must serve with that CA; a world-readable key is still refused.
#[test]
fn a_ca_mounted_like_a_kubernetes_secret_is_used() {
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    // A CA to mount, made the usual way.
    let made = dir.path().join("made");
    let cfg = write_cfg(dir.path(), "make.toml", &made, free_port());
    let out =
        latchkey_cmd(dir.path(), &[]).args(["ca", "regenerate", "--config"]).arg(&cfg).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let serve = |key_mode: &str| -> (bool, String) {
        let mount = dir.path().join(format!("secret-{key_mode}"));
        std::fs::create_dir_all(&mount).unwrap();
        let port = free_port();
        let cfg = write_cfg(dir.path(), &format!("run-{key_mode}.toml"), &mount, port);
        let script = format!(
            r#"set -e
mount -t tmpfs -o mode=1777 tmpfs {m}
mkdir {m}/..2026_01_01
cp {made}/ca.crt {made}/ca.key {m}/..2026_01_01/
chown -R 0:65532 {m}/..2026_01_01
chmod 0440 {m}/..2026_01_01/ca.crt
chmod {key_mode} {m}/..2026_01_01/ca.key
ln -s ..2026_01_01 {m}/..data
ln -s ..data/ca.crt {m}/ca.crt
ln -s ..data/ca.key {m}/ca.key
mount -o remount,bind,ro {m}
exec setpriv --reuid 65532 --regid 65532 --groups 65532 --inh-caps=-all --bounding-set=-all {bin} run --config {cfg}
"#,
            m = mount.display(),
            made = made.display(),
            bin = bin(),
            cfg = cfg.display(),
        );
        let log = dir.path().join(format!("stderr-{key_mode}"));
        let mut child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .env("HOME", dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut served = false;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                drop(s);
                let ca = std::fs::read_to_string(made.join("ca.crt")).unwrap();
                let got = Command::new("curl")
                    .args(["-sS", "--max-time", "5", &format!("http://127.0.0.1:{port}/ca.crt")])
                    .output()
                    .unwrap();
                served = String::from_utf8_lossy(&got.stdout).trim() == ca.trim();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        (served, std::fs::read_to_string(&log).unwrap_or_default())
    };
    let (served, log) = serve("0440");
    assert!(served, "latchkey must serve with a CA mounted like a Kubernetes Secret:\n{log}");
    let (served, log) = serve("0444");
    assert!(!served, "a world-readable ca.key must still be refused");
    assert!(log.contains("readable by other users"), "{log}");
}

fn write_cfg(dir: &Path, name: &str, ca_dir: &Path, port: u16) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("[proxy]\nport = {port}\nca_dir = \"{}\"\n", ca_dir.display())).unwrap();
    set_mode(&path, 0o644);
    path
}

/// kustomize: `kubectl kustomize` (Debian's kubernetes-client has it), else the
/// `kustomize` binary; neither is a failure that says what to install.
fn kustomize(dir: &Path) -> String {
    let have = |tool: &str| {
        Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap().status.success()
    };
    let out = if have("kubectl") {
        Command::new("kubectl").arg("kustomize").arg(dir).output().unwrap()
    } else if have("kustomize") {
        Command::new("kustomize").arg("build").arg(dir).output().unwrap()
    } else {
        panic!(
            "neither kubectl nor kustomize is installed: apt-get install kubernetes-client (scripts/test.sh does)"
        );
    };
    assert!(out.status.success(), "kustomize {}: {}", dir.display(), text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// Every manifest, as the overlays render them, against the Kubernetes schemas
/// (kubernetes-validate, offline, strict: unknown fields are errors), for the oldest
/// version the sidecar needs (1.29: native sidecars) and the newest known.
#[test]
fn kubernetes_manifests_render_and_validate() {
    let k8s = repo().join("deploy/kubernetes");
    let out = Command::new("kubernetes-validate").arg("--version").output();
    assert!(
        out.is_ok_and(|o| o.status.success()),
        "kubernetes-validate is not installed: python3 -m pip install kubernetes-validate (scripts/test.sh does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut rendered = std::collections::HashMap::new();
    for name in ["overlays/gateway", "overlays/sidecar", "agent-policy"] {
        let yaml = kustomize(&k8s.join(name));
        let file = dir.path().join(format!("{}.yaml", name.replace('/', "-")));
        std::fs::write(&file, &yaml).unwrap();
        for version in ["1.29.0", "latest"] {
            let mut cmd = Command::new("kubernetes-validate");
            cmd.args(["--strict", "--no-warn"]);
            if version != "latest" {
                cmd.args(["-k", version]);
            }
            let out = cmd.arg(&file).output().unwrap();
            assert!(out.status.success(), "{name} against Kubernetes {version}:\n{}", text(&out));
            assert!(!text(&out).contains("ERROR"), "{name}: {}", text(&out));
        }
        rendered.insert(name, yaml);
    }
    let gateway = &rendered["overlays/gateway"];
    for must in [
        "kind: Deployment",
        "replicas: 3",
        "kind: Service",
        "kind: PodDisruptionBudget",
        "kind: NetworkPolicy",
        "kind: ConfigMap",
        "secretName: latchkey-ca",
        "secretName: latchkey-credentials",
        "path: /readyz",
        "path: /healthz",
        "readOnlyRootFilesystem: true",
        "runAsNonRoot: true",
        "namespace: latchkey",
    ] {
        assert!(gateway.contains(must), "the gateway lacks {must:?}");
    }
    let sidecar = &rendered["overlays/sidecar"];
    for must in ["transparent = \"127.0.0.1:3130\"", "- NET_ADMIN", "restartPolicy: Always", "latchkey-rules"]
    {
        assert!(sidecar.contains(must), "the sidecar lacks {must:?}");
    }
    // The init container is the only one with a capability, and it has only NET_ADMIN.
    assert_eq!(sidecar.matches("add:").count(), 1, "{sidecar}");
    // Its rules redirect to the port latchkey listens on and exempt the uid it runs as.
    assert_eq!(env_value(sidecar, "LATCHKEY_TRANSPARENT_PORT").as_deref(), Some("3130"), "{sidecar}");
    assert_eq!(env_value(sidecar, "LATCHKEY_UID").as_deref(), Some("65532"), "{sidecar}");
    assert!(sidecar.contains("runAsUser: 65532") && sidecar.contains("runAsUser: 1000"), "{sidecar}");
}

/// The value of the first `- name: NAME` / `value: "..."` pair in rendered YAML.
fn env_value(yaml: &str, name: &str) -> Option<String> {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("- name: {name}"));
    lines.next()?;
    let value = lines.next()?.trim().strip_prefix("value: ")?;
    Some(value.trim_matches('"').to_string())
}

/// The config.toml a ConfigMap manifest carries.
fn config_map_toml(rel: &str) -> String {
    let yaml = std::fs::read_to_string(repo().join(rel)).unwrap();
    let body = yaml.split("config.toml: |\n").nth(1).expect("config.toml in the ConfigMap");
    body.lines().map(|l| l.strip_prefix("    ").unwrap_or(l)).map(|l| format!("{l}\n")).collect()
}

/// The gateway's and the sidecar's config.toml, as the ConfigMaps carry them, are valid.
#[test]
fn the_gateway_config_map_holds_a_valid_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    for rel in ["deploy/kubernetes/base/config.yaml", "deploy/kubernetes/overlays/sidecar/config.yaml"] {
        let toml = config_map_toml(rel);
        std::fs::write(&cfg, format!("{toml}\n[admin]\nlisten = \"127.0.0.1:0\"\n")).unwrap();
        set_mode(&cfg, 0o600);
        let out =
            latchkey_cmd(dir.path(), &[]).args(["check", "--local", "--config"]).arg(&cfg).output().unwrap();
        assert_ne!(out.status.code(), Some(2), "{rel}: the ConfigMap's config is invalid: {}", text(&out));
    }
    // And the compose example's.
    let cfg = repo().join("deploy/latchkey/config.toml");
    let out = latchkey_cmd(dir.path(), &[("LATCHKEY_AGENT_TOKEN", "t")])
        .args(["check", "--local", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(2), "deploy/latchkey/config.toml is invalid: {}", text(&out));
}

/// The systemd unit: clean under `systemd-analyze verify` (no warning either), with the
/// isolation it promises.
#[test]
fn the_systemd_unit_verifies_and_isolates() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/latchkey.service")).unwrap();
    for must in [
        "User=latchkey",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "MemoryDenyWriteExecute=yes",
        "\nCapabilityBoundingSet=\n",
        "StateDirectory=latchkey",
        "Environment=LATCHKEY_CA_DIR=/var/lib/latchkey/ca",
    ] {
        assert!(unit.contains(must), "the unit lacks {must:?}");
    }
    let found = Command::new("sh").args(["-c", "command -v systemd-analyze"]).output().unwrap();
    assert!(
        found.status.success(),
        "systemd-analyze is not installed (apt-get install systemd; scripts/test.sh does)"
    );
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latchkey.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/latchkey", bin())).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "systemd-analyze verify: {}", text(&out));
}

/// MemoryDenyWriteExecute: the kernel's own version of it (prctl PR_SET_MDWE, inherited
/// across exec) on `latchkey run`, and a credentialed HTTPS request through it — TLS
/// both ways, injection, redaction. A JIT or a writable-executable mapping would kill
/// the process or fail the request.
#[test]
fn latchkey_works_under_memory_deny_write_execute() {
    let up = upstream(true, None);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = write_config(
        dir.path(),
        port,
        Some(up.addr),
        "[credentials.x]\nheader = \"x-key\"\nvalue = \"REAL\"\ndomains = [\"api.example.com\"]\n",
    );
    // PR_SET_MDWE = 65, PR_MDWE_REFUSE_EXEC_GAIN = 1 (Linux 6.3+).
    let wrapper = "import ctypes, os, sys\nlibc = ctypes.CDLL(None, use_errno=True)\nif libc.prctl(65, 1, 0, 0, 0) != 0:\n    sys.exit('PR_SET_MDWE failed: errno %d (Linux 6.3+ needed)' % ctypes.get_errno())\nos.execv(sys.argv[1], sys.argv[1:])\n";
    let stderr = dir.path().join("stderr.log");
    let mut child = Command::new("python3")
        .args(["-c", wrapper, bin(), "run", "--config"])
        .arg(&cfg)
        .env("HOME", dir.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("latchkey exited under MDWE ({status}): {}", std::fs::read_to_string(&stderr).unwrap());
        }
        assert!(Instant::now() < deadline, "latchkey did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The wrapper really enforces it on what it execs: a writable+executable mapping fails.
    let probe = "import mmap\ntry:\n    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n    print('mapped')\nexcept OSError as e:\n    print('refused', e.errno)\n";
    let py =
        String::from_utf8(Command::new("sh").args(["-c", "command -v python3"]).output().unwrap().stdout)
            .unwrap();
    let out = Command::new("python3").args(["-c", wrapper, py.trim(), "-c", probe]).output().unwrap();
    assert!(text(&out).starts_with("refused"), "MDWE is not enforced across exec here: {}", text(&out));
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-x",
            &format!("http://127.0.0.1:{port}"),
        ])
        .arg("--cacert")
        .arg(dir.path().join("ca/bundle.pem"))
        .args(["-H", "x-key: placeholder", "https://api.example.com/mdwe"])
        .output()
        .unwrap();
    let (code, body) = parse_curl(out);
    assert_eq!(code, 200, "{body}\n{}", std::fs::read_to_string(&stderr).unwrap());
    assert_eq!(echoed(&body, "x-key"), ["REAL"]);
    assert!(child.try_wait().unwrap().is_none(), "latchkey died under MDWE");
    let _ = child.kill();
    let _ = child.wait();
}
