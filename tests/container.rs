//! The container image (Containerfile) and deploy/compose.yaml, for real with podman
//! (issue 16.2, 16.3). No registry is reachable, so the test images are built FROM
//! bases made of this machine's own files (tests/podman/rootfs.sh): a distroless/cc
//! equivalent (glibc, libgcc, passwd with nonroot 65532) for latchkey, and a tools image
//! (curl, python3, sleep) for the agent and the TLS upstream. compose.yaml is brought up
//! by podman-compose as it is written; the test only adds the upstream that stands for
//! the Internet, on the compose project's egress network (made internal here).
//!
//! Needs podman, runc and podman-compose (scripts/test.sh installs them); fails with
//! that message when they are missing. Base images are cached in podman's storage
//! under a tag derived from their content.

mod common;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// podman as this machine runs it: runc, cgroupfs, bounded ulimits — set through a
/// containers.conf so podman-compose's own podman calls get the same.
fn containers_conf() -> &'static Path {
    static CONF: OnceLock<PathBuf> = OnceLock::new();
    CONF.get_or_init(|| {
        for tool in ["podman", "runc", "podman-compose"] {
            let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap();
            assert!(
                found.status.success(),
                "{tool} is not installed: the container tests need podman, runc and podman-compose (scripts/test.sh installs them: apt-get install podman runc podman-compose)"
            );
        }
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("containers.conf");
        std::fs::write(
            &path,
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        path
    })
}

fn podman(args: &[&str]) -> Output {
    Command::new("podman").env("CONTAINERS_CONF", containers_conf()).args(args).output().unwrap()
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(out.status.success(), "podman {}: {}", args.join(" "), text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Hash of the content a test image is made from: a changed input is a new tag.
fn content_tag(parts: &[&[u8]]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_le_bytes());
        ctx.update(p);
    }
    ctx.finish().as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// An image imported from a rootfs of this machine's `files`, cached by content.
fn rootfs_image(name: &str, files: &[&str]) -> String {
    let mut stamp = Vec::new();
    for f in files {
        let m = std::fs::metadata(f).unwrap_or_else(|e| panic!("{f}: {e}"));
        stamp.extend(format!("{f}:{}:{:?};", m.len(), m.modified().ok()).into_bytes());
    }
    let script = std::fs::read(repo().join("tests/podman/rootfs.sh")).unwrap();
    let tag = format!("localhost/latchkey-test/{name}:{}", content_tag(&[&stamp, &script]));
    if podman(&["image", "exists", &tag]).status.success() {
        return tag;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    let out = Command::new("sh")
        .arg(repo().join("tests/podman/rootfs.sh"))
        .arg(&root)
        .args(files)
        .output()
        .unwrap();
    assert!(out.status.success(), "rootfs.sh: {}", text(&out));
    let import = format!("tar -C {} -c . | podman import - {tag}", root.display());
    let out =
        Command::new("sh").args(["-c", &import]).env("CONTAINERS_CONF", containers_conf()).output().unwrap();
    assert!(out.status.success(), "podman import: {}", text(&out));
    tag
}

/// The distroless/cc stand-in: the C runtime latchkey links against, nothing else.
fn cc_base() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let libs = ldd(bin());
        let files: Vec<&str> = libs.iter().map(String::as_str).collect();
        rootfs_image("cc-base", &files)
    })
}

/// curl, python3 (with its standard library) and sleep: the agent and the upstream.
fn tools_image() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        rootfs_image(
            "tools",
            &["/usr/bin/curl", "/usr/bin/python3.11", "/usr/lib/python3.11", "/usr/bin/sleep"],
        )
    })
}

fn ldd(path: &str) -> Vec<String> {
    let out = Command::new("ldd").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(str::to_string)
        .collect()
}

/// The latchkey image, built by the repository's Containerfile from the test binary
/// (`--build-arg BINARY=context`) on the cc base. Built once per run.
fn latchkey_image() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let base = cc_base();
        let ctx = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(ctx.path().join("dist")).unwrap();
        let stripped = ctx.path().join("dist/latchkey");
        let out = Command::new("strip").arg("-o").arg(&stripped).arg(bin()).output().unwrap();
        assert!(out.status.success(), "strip: {}", text(&out));
        let containerfile = std::fs::read(repo().join("Containerfile")).unwrap();
        std::fs::write(ctx.path().join("Containerfile"), &containerfile).unwrap();
        let out = Command::new("cp")
            .args(["-a"])
            .arg(repo().join("deploy"))
            .arg(ctx.path().join("deploy"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let binary = std::fs::read(&stripped).unwrap();
        let tag = format!(
            "localhost/latchkey-test/latchkey:{}",
            content_tag(&[&binary, &containerfile, base.as_bytes()])
        );
        // Earlier builds (another binary) are of no further use.
        let old = podman_ok(&[
            "images",
            "--format",
            "{{.Repository}}:{{.Tag}}",
            "localhost/latchkey-test/latchkey",
        ]);
        for stale in old.lines().filter(|t| *t != tag) {
            let _ = podman(&["rmi", stale]);
        }
        let ctx_path = ctx.path().to_str().unwrap().to_string();
        podman_ok(&[
            "build",
            "--format",
            "docker",
            "--build-arg",
            &format!("BASE={base}"),
            "--build-arg",
            "BINARY=context",
            "-t",
            &tag,
            &ctx_path,
        ]);
        tag
    })
}

/// Containers, networks and volumes a test made, removed whatever happens.
#[derive(Default)]
struct Cleanup {
    containers: Vec<String>,
    networks: Vec<String>,
    volumes: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = podman(&["rm", "-f", "-t", "0", c]);
        }
        for n in &self.networks {
            let _ = podman(&["network", "rm", "-f", n]);
        }
        for v in &self.volumes {
            let _ = podman(&["volume", "rm", "-f", v]);
        }
    }
}

/// Wait until `podman healthcheck run` (the image's HEALTHCHECK: `latchkey health`)
/// says healthy.
fn wait_healthy(container: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = podman(&["healthcheck", "run", container]);
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{container} never became healthy: {}\n{}",
            text(&out),
            text(&podman(&["logs", container]))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The image: non-root, the binary only, read-only root, HEALTHCHECK answered by the
/// binary itself. Reports its size.
#[test]
fn the_image_runs_as_nonroot_on_a_read_only_root_with_a_healthcheck() {
    let image = latchkey_image();
    let inspect = podman_ok(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.User}}|{{json .Config.Healthcheck}}|{{.Size}}",
        image,
    ]);
    let mut parts = inspect.splitn(3, '|');
    let (user, health, size) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
    assert_eq!(user, "65532:65532");
    assert!(health.contains("latchkey") && health.contains("health"), "HEALTHCHECK: {health}");
    let base_size = podman_ok(&["image", "inspect", "--format", "{{.Size}}", cc_base()]);
    eprintln!("image {image}: {size} bytes (base {base_size} bytes)");

    let mut clean = Cleanup::default();
    let name = format!("latchkey-image-{}", std::process::id());
    let state = format!("{name}-state");
    clean.containers.push(name.clone());
    clean.volumes.push(state.clone());
    // Read-only root, no capabilities, a named volume for the state; the loopback
    // clients are allowed (the proxy port binds 0.0.0.0 in the image).
    podman_ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "-v",
        &format!("{state}:/var/lib/latchkey"),
        "-e",
        "LATCHKEY_ALLOWED_CLIENTS=127.0.0.1",
        image,
    ]);
    wait_healthy(&name);
    let top = podman_ok(&["top", &name, "user", "args"]);
    assert!(top.contains("65532") || top.contains("nonroot"), "runs as nonroot: {top}");
    // The CA was created on the volume, by uid 65532, key private.
    let mount = podman_ok(&["volume", "inspect", "--format", "{{.Mountpoint}}", &state]);
    use std::os::unix::fs::MetadataExt;
    let key = std::fs::metadata(Path::new(&mount).join("ca/ca.key")).unwrap();
    assert_eq!((key.uid(), key.mode() & 0o777), (65532, 0o600));

    // Without the volume on a read-only root, it says why it cannot start.
    let out = podman(&[
        "run",
        "--rm",
        "--read-only",
        "--read-only-tmpfs=false",
        "-e",
        "LATCHKEY_ALLOWED_CLIENTS=127.0.0.1",
        image,
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("/var/lib/latchkey/ca"), "{}", text(&out));
    // And an open proxy is refused, naming the variable to set.
    let out = podman(&["run", "--rm", "-v", &format!("{state}:/var/lib/latchkey"), image]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("LATCHKEY_LISTEN (overrides proxy.bind): binding to 0.0.0.0"),
        "{}",
        text(&out)
    );
}

/// deploy/compose.yaml as written: the agent's curl reaches a TLS upstream through
/// latchkey with the key injected; the agent cannot reach the upstream directly, cannot
/// use the proxy without its token, and never sees the CA key.
#[test]
fn compose_agent_gets_out_only_through_latchkey() {
    let image = latchkey_image();
    let tools = tools_image();
    let project = format!("lk{}", std::process::id());
    let mut clean = Cleanup::default();
    for c in ["latchkey_1", "agent_1", "upstream"] {
        clean.containers.push(format!("{project}_{c}"));
    }
    for n in ["agents", "egress"] {
        clean.networks.push(format!("{project}_{n}"));
    }
    for v in ["latchkey-state", "latchkey-ca"] {
        clean.volumes.push(format!("{project}_{v}"));
    }
    // The egress network stands for the Internet: made here, internal, with a known
    // subnet; compose finds it by name and uses it.
    let octet = 100 + std::process::id() % 150;
    let subnet = format!("10.231.{octet}.0/24");
    podman_ok(&["network", "create", "--internal", "--subnet", &subnet, &format!("{project}_egress")]);

    // latchkey's config: the repository's, plus what the test upstream needs.
    let files = tempfile::tempdir().unwrap();
    set_mode(files.path(), 0o755);
    let conf_dir = files.path().join("latchkey");
    std::fs::create_dir(&conf_dir).unwrap();
    set_mode(&conf_dir, 0o755);
    let mut cfg = std::fs::read_to_string(repo().join("deploy/latchkey/config.toml")).unwrap();
    cfg.push_str(&format!(
        "\n[proxy]\nallow_private = [\"{subnet}\"]\n\n[upstream]\nca_file = \"/etc/latchkey/upstream-ca.pem\"\n"
    ));
    std::fs::write(conf_dir.join("config.toml"), cfg).unwrap();
    set_mode(&conf_dir.join("config.toml"), 0o644);
    std::fs::write(conf_dir.join("upstream-ca.pem"), &pki().ca_pem).unwrap();
    set_mode(&conf_dir.join("upstream-ca.pem"), 0o644);
    let pki_dir = files.path().join("pki");
    std::fs::create_dir(&pki_dir).unwrap();
    std::fs::write(pki_dir.join("cert.pem"), &pki().cert_pem).unwrap();
    std::fs::write(pki_dir.join("key.pem"), &pki().key_pem).unwrap();

    let token = "agent-token-0123456789";
    let compose = |args: &[&str]| {
        Command::new("podman-compose")
            .env("CONTAINERS_CONF", containers_conf())
            .env("LATCHKEY_IMAGE", image)
            .env("AGENT_IMAGE", tools)
            .env("LATCHKEY_CONFIG_DIR", &conf_dir)
            .env("ANTHROPIC_API_KEY", "sk-ant-REAL-compose")
            .env("LATCHKEY_AGENT_TOKEN", token)
            .args(["-p", &project, "-f"])
            .arg(repo().join("deploy/compose.yaml"))
            .args(args)
            .output()
            .unwrap()
    };
    let up = compose(&["up", "-d"]);
    assert!(up.status.success(), "podman-compose up: {}", text(&up));
    let lk = format!("{project}_latchkey_1");
    let agent = format!("{project}_agent_1");
    wait_healthy(&lk);

    // The Internet's stand-in: a TLS echo server that answers as api.anthropic.com.
    let upstream = format!("{project}_upstream");
    podman_ok(&[
        "run",
        "-d",
        "--name",
        &upstream,
        "--network",
        &format!("{project}_egress"),
        "--network-alias",
        "api.anthropic.com",
        "-v",
        &format!("{}:/pki:ro", pki_dir.display()),
        "-v",
        &format!("{}:/py:ro", repo().join("tests/py").display()),
        tools,
        "python3.11",
        "/py/echo_tls.py",
        "/pki/cert.pem",
        "/pki/key.pem",
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !podman_ok(&["logs", &upstream]).contains("listening") {
        assert!(
            Instant::now() < deadline,
            "the upstream did not start: {}",
            text(&podman(&["logs", &upstream]))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let upstream_ip = podman_ok(&[
        "inspect",
        "--format",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &upstream,
    ]);

    let in_agent = |args: &[&str]| {
        let mut all = vec!["exec", agent.as_str()];
        all.extend_from_slice(args);
        podman(&all)
    };
    // Through latchkey: the placeholder is replaced by the real key.
    let out = in_agent(&[
        "curl",
        "-sS",
        "--max-time",
        "20",
        "-H",
        "x-api-key: latchkey-anthropic",
        "https://api.anthropic.com/v1/models",
    ]);
    assert!(out.status.success(), "{}\n{}", text(&out), text(&podman(&["logs", &lk])));
    let body = String::from_utf8_lossy(&out.stdout);
    // The upstream got the real key and no proxy token; the agent sees the echo of the
    // key masked (response redaction, on by default).
    let seen = podman_ok(&["logs", &upstream]);
    let request = seen.lines().find(|l| l.contains("/v1/models")).unwrap_or_else(|| panic!("{seen}"));
    assert_eq!(echoed(request, "x-api-key"), ["sk-ant-REAL-compose"], "{request}");
    assert!(echoed(request, "proxy-authorization").is_empty(), "the agent's token never goes upstream");
    assert!(!body.contains("sk-ant-REAL"), "the key never reaches the agent: {body}");
    assert_eq!(echoed(&body, "x-api-key"), ["*******************"], "{body}");

    // The agents network is internal: the agent has no default route, only its subnet.
    let internal =
        podman_ok(&["network", "inspect", "--format", "{{.Internal}}", &format!("{project}_agents")]);
    assert_eq!(internal, "true", "compose.yaml's agents network must be internal");
    let routes = in_agent(&["python3.11", "-c", "print(open('/proc/net/route').read())"]);
    let default = String::from_utf8_lossy(&routes.stdout)
        .lines()
        .skip(1)
        .any(|l| l.split_whitespace().nth(1) == Some("00000000"));
    assert!(!default, "the agent has a default route: {}", text(&routes));
    // Directly: no route from the agents network to the upstream, by address or name.
    let url = format!("https://{upstream_ip}/");
    let out = in_agent(&["curl", "-sS", "--noproxy", "*", "--max-time", "5", "-k", &url]);
    assert!(!out.status.success(), "the agent reached the upstream directly: {}", text(&out));
    let out = in_agent(&["curl", "-sS", "--noproxy", "*", "--max-time", "5", "https://api.anthropic.com/"]);
    assert!(!out.status.success(), "the agent reached the upstream directly by name: {}", text(&out));

    // Without its token the agent is refused (the proxy port is on a network).
    let out = in_agent(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--proxy",
        "http://latchkey:3128",
        "http://api.anthropic.com/",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "407", "{}", text(&out));

    // The agent sees the public CA, never the key.
    let out = in_agent(&["python3.11", "-c", "import os; print(sorted(os.listdir('/etc/latchkey-ca')))"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "['README', 'bundle.pem', 'ca.crt']",
        "{}",
        text(&out)
    );

    // latchkey logged the request with the agent's name.
    let mount = podman_ok(&[
        "volume",
        "inspect",
        "--format",
        "{{.Mountpoint}}",
        &format!("{project}_latchkey-state"),
    ]);
    let log = std::fs::read_to_string(Path::new(&mount).join("requests.log")).unwrap_or_default();
    assert!(log.contains("\"agent\":\"agent\"") && log.contains("api.anthropic.com"), "{log}");
    let down = compose(&["down"]);
    assert!(down.status.success(), "podman-compose down: {}", text(&down));
}
