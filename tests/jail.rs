//! `latchkey exec --jail` through the real binary, as root and as `nobody`: real clients
//! that ignore the proxy variables still reach nothing but latchkey, the secrets'
//! sources are not readable inside, and CMD behaves as it would unjailed.
//!
//! The `nobody` runs need these tests to run as root (as CI does): they drop to uid
//! 65534 with setpriv, in directories handed to that user.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "sk-ant-REAL-jail-0123456789";
const NOBODY: u32 = 65534;

#[derive(Clone, Copy, PartialEq, Debug)]
enum User {
    Root,
    Nobody,
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn require_root() {
    // SAFETY: geteuid has no arguments.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the jail tests run as root (they also drop to nobody with setpriv)"
    );
}

/// Give a tree to `uid` (the jail's user must own its config: latchkey refuses others').
fn chown_r(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
    if path.is_dir() && !path.is_symlink() {
        for e in std::fs::read_dir(path).unwrap() {
            chown_r(&e.unwrap().path(), uid);
        }
    }
}

/// The binary, reachable by nobody (every directory above it searchable by others).
fn binary_for(user: User) -> PathBuf {
    let bin = PathBuf::from(bin());
    if user == User::Nobody {
        for dir in bin.ancestors().skip(1) {
            let mode = std::fs::metadata(dir).unwrap().mode();
            assert!(
                mode & 0o001 != 0,
                "{} is not searchable by nobody; the nobody jail tests cannot run latchkey",
                dir.display()
            );
        }
    }
    bin
}

/// A config directory (HOME too) owned by the user the jail runs as.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    user: User,
}

impl Setup {
    fn new(user: User, upstream: Option<SocketAddr>, body: &str) -> Setup {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), free_port(), upstream, body);
        Setup { dir, config, user }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write(&self, rel: &str, content: &str, mode: u32) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        set_mode(&p, mode);
        p
    }

    /// `latchkey exec --jail --config ... EXTRA -- bash -c SCRIPT` as this setup's user.
    fn cmd(&self, env: &[(&str, &str)], extra: &[&str], script: &str) -> Command {
        if self.user == User::Nobody {
            chown_r(self.dir.path(), NOBODY);
        }
        let mut c = match self.user {
            User::Root => Command::new(binary_for(User::Root)),
            User::Nobody => {
                let mut c = Command::new("setpriv");
                c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(binary_for(User::Nobody));
                c
            }
        };
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("RUST_LOG", "info")
            .current_dir(self.dir.path());
        for (k, v) in env {
            c.env(k, v);
        }
        c.args(["exec", "--jail", "--config"])
            .arg(&self.config)
            .args(extra)
            .args(["--", "bash", "-c", script]);
        c
    }

    fn exec(&self, env: &[(&str, &str)], extra: &[&str], script: &str) -> Output {
        self.cmd(env, extra, script).stdin(Stdio::null()).output().unwrap()
    }
}

/// Unset every proxy variable: these clients must be caught without them.
const NO_PROXY_ENV: &str = "JAIL_PROXY=$HTTPS_PROXY; unset HTTP_PROXY HTTPS_PROXY http_proxy https_proxy NODE_USE_ENV_PROXY ALL_PROXY all_proxy";

fn git(dir: &Path, args: &[&str]) {
    let o = Command::new("git").current_dir(dir).args(args).output().unwrap();
    assert!(o.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// A bare repository served at /org/repo.git behind basic auth with `token`.
fn git_server(token: &str) -> (tempfile::TempDir, GitServer) {
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
    let expect = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"))
    );
    let server = GitServer { root: root.path().to_path_buf(), expect_authorization: expect };
    (root, server)
}

fn clients_that_ignore_the_proxy_get_the_key(user: User) {
    let token = "ghp_REALJAILTOKEN";
    let (_repo, server) = git_server(token);
    let up = upstream(true, Some(server));
    // An IPv6 literal goes through the IPv6 redirect (IP6T_SO_ORIGINAL_DST), to loopback.
    let s = Setup::new(user, Some(up.addr), &format!("\"[2001:db8::5]:443\" = \"{}\"\n", up.addr));
    let node = "fetch('https://api.anthropic.com/v1/messages', {method: 'POST', headers: {'x-api-key': process.env.ANTHROPIC_API_KEY}}).then(r => r.text()).then(t => console.log('node', t.length > 0))";
    let script = format!(
        r#"set -e
{NO_PROXY_ENV}
test "$ANTHROPIC_API_KEY" = latchkey-anthropic && test "$GH_TOKEN" = latchkey-github
curl -sS --noproxy '*' -o /dev/null -w 'curl %{{http_code}}\n' -H "x-api-key: $ANTHROPIC_API_KEY" https://api.anthropic.com/v1/messages
node -e "$NODE_SCRIPT"
GIT_TERMINAL_PROMPT=0 git clone -q https://github.com/org/repo.git "$HOME/clone"
cat "$HOME/clone/README.md"
curl -sS --noproxy '*' -k -o /dev/null -w 'v6 %{{http_code}}\n' 'https://[2001:db8::5]/v6'
"#
    );
    let o =
        s.exec(&[("ANTHROPIC_API_KEY", SECRET), ("GH_TOKEN", token), ("NODE_SCRIPT", node)], &[], &script);
    let out = stdout(&o);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.contains("curl 200") && out.contains("node true"), "{out}");
    assert!(out.contains("hello from the upstream"), "git clone through the jail: {out}");
    assert!(out.contains("v6 200") && up.requests().iter().any(|r| r.path == "/v6"), "{out}");
    let keys: Vec<String> = up.requests().iter().flat_map(|r| r.header_all("x-api-key")).collect();
    assert_eq!(keys, [SECRET, SECRET], "curl and node, each with the real key injected");
    assert!(!out.contains(SECRET) && !String::from_utf8_lossy(&o.stderr).contains(SECRET));
}

#[test]
fn clients_that_ignore_the_proxy_get_the_key_as_root() {
    clients_that_ignore_the_proxy_get_the_key(User::Root);
}

#[test]
fn clients_that_ignore_the_proxy_get_the_key_as_nobody() {
    clients_that_ignore_the_proxy_get_the_key(User::Nobody);
}

#[test]
fn python_requests_without_trust_env_and_the_proxy_port_still_work() {
    let up = upstream(true, None);
    let s = Setup::new(User::Root, Some(up.addr), "");
    let py = "import os, requests\ns = requests.Session(); s.trust_env = False\nr = s.get('https://api.anthropic.com/v1/models', headers={'x-api-key': os.environ['ANTHROPIC_API_KEY']}, verify=os.environ['REQUESTS_CA_BUNDLE'])\nprint('requests', r.status_code)";
    // The explicit proxy port inside the jail serves proxy-aware clients unchanged.
    let script = "set -e\npython3 -c \"$0\"\ncurl -sS -o /dev/null -w 'proxied %{http_code}\\n' -H \"x-api-key: $ANTHROPIC_API_KEY\" https://api.anthropic.com/v1/models\n";
    let o = s.cmd(&[("ANTHROPIC_API_KEY", SECRET)], &[], script).arg(py).output().unwrap();
    let out = stdout(&o);
    assert!(
        o.status.success() && out.contains("requests 200") && out.contains("proxied 200"),
        "{}",
        text(&o)
    );
    let keys: Vec<String> = up.requests().iter().flat_map(|r| r.header_all("x-api-key")).collect();
    assert_eq!(keys, [SECRET, SECRET]);
}

fn blocked_however_reached(user: User) {
    let up = upstream(true, None);
    let plain = upstream(false, None);
    let body = format!(
        "\"203.0.113.9:443\" = \"{up}\"\n\"203.0.113.9:80\" = \"{plain}\"\n[proxy.logging]\nlog_requests = true\nlog_file = \"LOG\"\n[proxy.filters]\nblocked_domains = [\"evil.example.net\"]\n",
        up = up.addr,
        plain = plain.addr
    );
    let s = Setup::new(user, None, "");
    let log = s.path("requests.log");
    let config = write_config2(
        s.dir.path(),
        free_port(),
        Some(up.addr),
        Some(plain.addr),
        &body.replace("LOG", log.to_str().unwrap()),
    );
    assert_eq!(config, s.config);
    let c = "curl -sS --noproxy '*' --max-time 10";
    let script = format!(
        r#"{NO_PROXY_ENV}
ip=$(getent hosts api.example.com | cut -d' ' -f1)
echo "fake $ip"
{c} -k -o /dev/null -w 'allowed %{{http_code}}\n' https://api.example.com/ok
{c} -k -o /dev/null https://evil.example.net/x; echo "by-name-tls rc=$?"
{c} -o /dev/null -w 'by-name-http %{{http_code}}\n' http://evil.example.net/x
{c} -k -o /dev/null --resolve evil.example.net:443:203.0.113.9 https://evil.example.net/x; echo "literal-ip-sni rc=$?"
{c} -k -o /dev/null --resolve evil.example.net:443:$ip https://evil.example.net/x; echo "fronted-sni rc=$?"
{c} -o /dev/null -w 'literal-ip-http %{{http_code}}\n' --resolve evil.example.net:80:203.0.113.9 http://evil.example.net/x
curl -sS --max-time 10 -x "$JAIL_PROXY" -o /dev/null https://evil.example.net/x; echo "explicit-proxy rc=$?"
"#
    );
    let o = s.exec(&[], &[], &script);
    let out = stdout(&o);
    assert!(out.contains("fake 198.18."), "{}", text(&o));
    assert!(out.contains("allowed 200"), "a blind tunnel through the jail works: {}", text(&o));
    for refused in ["by-name-tls rc=35", "literal-ip-sni rc=35", "fronted-sni rc=35", "explicit-proxy rc=56"]
    {
        assert!(out.contains(refused), "{refused}: {}", text(&o));
    }
    assert!(out.contains("by-name-http 403"), "{}", text(&o));
    assert!(out.contains("literal-ip-http 421"), "{}", text(&o));
    let paths: Vec<String> =
        up.requests().iter().chain(plain.requests().iter()).map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/ok"], "nothing but the allowed request reached an upstream");
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let blocked = logged.lines().filter(|l| l.contains("\"blocked\"")).count();
    assert!(blocked >= 6, "each refusal is a blocked log line:\n{logged}");
}

#[test]
fn a_blocked_domain_is_refused_however_it_is_reached_as_root() {
    blocked_however_reached(User::Root);
}

#[test]
fn a_blocked_domain_is_refused_however_it_is_reached_as_nobody() {
    blocked_however_reached(User::Nobody);
}

/// An address of this machine outside loopback, if it has one.
fn host_address() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("10.255.255.254:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

fn nothing_else_leaves(user: User) {
    let tcp = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let udp = std::net::UdpSocket::bind(("0.0.0.0", port)).unwrap();
    let mut targets = vec!["127.0.0.1".to_string()];
    // Only a private address: latchkey's SSRF rule must refuse it (a public one would
    // be a legitimate CONNECT).
    if let Some(ip) = host_address().filter(|ip| latchkey::policy::ssrf::non_public_reason(*ip).is_some()) {
        targets.push(ip.to_string());
    }
    let s = Setup::new(user, None, "");
    let mut script = String::from(NO_PROXY_ENV);
    script.push('\n');
    for t in &targets {
        script.push_str(&format!(
            "(echo tcp > /dev/tcp/{t}/{port}) 2>/dev/null && echo \"tcp {t} connected\"\n(echo udp > /dev/udp/{t}/{port}) 2>&1 | head -1\n"
        ));
    }
    script.push_str(
        r#"ip=$(getent hosts quic.example.com | cut -d' ' -f1)
(echo quic > /dev/udp/$ip/443) 2>&1 | sed 's/^/quic: /'
getent ahosts api.anthropic.com github.com example.org | awk '{print "addr", $1}' | sort -u
getent ahostsv6 github.com | head -1 | sed 's/^/v6 /'
echo done
"#,
    );
    let o = s.exec(&[], &[], &script);
    let out = stdout(&o);
    assert!(out.contains("done"), "{}", text(&o));
    assert!(
        out.contains("quic:") && out.contains("Operation not permitted"),
        "UDP refused at once (QUIC falls back): {}",
        text(&o)
    );
    let addrs: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("addr ")).collect();
    assert!(!addrs.is_empty(), "{out}");
    for a in &addrs {
        let a = a.trim_start_matches("::ffff:");
        assert!(a.starts_with("198.18.") || a.starts_with("198.19."), "DNS revealed {a}: {out}");
    }
    // Latchkey's own log may carry the refusals; what matters is the far side.
    tcp.set_nonblocking(true).unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(tcp.accept().is_err(), "a TCP connection from the jail arrived outside: {out}");
    let mut buf = [0u8; 64];
    assert!(udp.recv_from(&mut buf).is_err(), "a UDP datagram from the jail arrived outside: {out}");
}

#[test]
fn no_packet_leaves_except_through_latchkey_as_root() {
    nothing_else_leaves(User::Root);
}

#[test]
fn no_packet_leaves_except_through_latchkey_as_nobody() {
    nothing_else_leaves(User::Nobody);
}

#[test]
fn a_socket_inherited_from_outside_does_not_cross_into_the_jail() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = Setup::new(User::Root, None, "");
    // The caller holds a connected socket on descriptor 5 (no close-on-exec) and runs
    // the jail: that socket lives in the host's network namespace.
    let jail = s.cmd(&[], &[], "echo leaked >&5 && echo WROTE");
    let argv: Vec<String> = std::iter::once(jail.get_program().to_string_lossy().into_owned())
        .chain(jail.get_args().map(|a| format!("'{}'", a.to_string_lossy().replace('\'', "'\\''"))))
        .collect();
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!("exec 5<>/dev/tcp/127.0.0.1/{port} && exec {}", argv.join(" ")))
        .env_clear()
        .envs(jail.get_envs().filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))))
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    assert!(!stdout(&o).contains("WROTE"), "{}", text(&o));
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut got = Vec::new();
    let _ = conn.read_to_end(&mut got);
    assert!(
        got.is_empty(),
        "the jail wrote through an inherited socket: {:?}",
        String::from_utf8_lossy(&got)
    );
}

fn secrets_are_not_there(user: User) {
    let up = upstream(true, None);
    let s = Setup::new(user, Some(up.addr), "");
    let value_file = s.write("secrets/anthropic", SECRET, 0o600);
    let body = format!(
        "[credentials.anthropic]\nheader = \"x-api-key\"\nvalue_file = \"{}\"\ndomains = [\"api.anthropic.com\"]\n",
        value_file.display()
    );
    write_config(s.dir.path(), free_port(), Some(up.addr), &body);
    s.write(".ssh/id_ed25519", "PRIVATE KEY", 0o600);
    s.write(".aws/credentials", "[default]\naws_secret_access_key = AKIASECRET\n", 0o600);
    let extra = s.write("project/.env", "TOKEN=hunter2\n", 0o600);
    let ca_key = s.path("ca/ca.key");
    let script = format!(
        r#"{NO_PROXY_ENV}
for f in "{config}" "{ca_key}" "{value}" "{extra}" ~/.aws/credentials ~/.ssh/id_ed25519; do
  if [ -e "$f" ]; then echo "size $(wc -c < "$f") $f"; fi
  cat "$f" 2>/dev/null
done
echo "ssh entries $(ls -A ~/.ssh | wc -l)"
(echo x >> "{config}") 2>/dev/null && echo WROTE-CONFIG
test -s "{bundle}" && echo bundle-readable
cat /proc/[0-9]*/environ 2>/dev/null | tr '\0' '\n' | grep -c . | sed 's/^/environ lines /'
cat /proc/[0-9]*/environ 2>/dev/null | tr '\0' '\n'
/usr/sbin/ip route add 10.9.9.9 dev lo 2>/dev/null && echo ROUTE-ADDED
/usr/sbin/ip link set lo down 2>/dev/null && echo LINK-DOWN
/usr/sbin/nft add table ip evil 2>/dev/null && echo NFT-CHANGED
umount /etc/resolv.conf 2>/dev/null && echo UNMOUNTED
grep -E '^Cap(Eff|Prm|Bnd|Amb)' /proc/self/status
curl -sS --noproxy '*' -o /dev/null -w 'injected %{{http_code}}\n' https://api.anthropic.com/v1/models
"#,
        config = s.config.display(),
        ca_key = ca_key.display(),
        value = value_file.display(),
        extra = extra.display(),
        bundle = s.path("ca/bundle.pem").display(),
    );
    let o = s.exec(&[], &["--hide", "project/.env"], &script);
    let out = stdout(&o);
    assert!(out.contains("injected 200"), "{}", text(&o));
    assert_eq!(up.requests()[0].header_all("x-api-key"), [SECRET], "latchkey read the value_file");
    for hidden in [&s.config, &ca_key, &value_file, &extra] {
        assert!(
            out.contains(&format!("size 0 {}", hidden.display())),
            "{} not emptied: {out}",
            hidden.display()
        );
    }
    for leaked in [SECRET, "PRIVATE KEY", "AKIASECRET", "hunter2", "BEGIN"] {
        assert!(!out.contains(leaked), "{leaked} readable in the jail: {out}");
    }
    assert!(out.contains("ssh entries 0"), "{out}");
    assert!(out.contains("bundle-readable"), "{out}");
    for changed in ["WROTE-CONFIG", "ROUTE-ADDED", "LINK-DOWN", "NFT-CHANGED", "UNMOUNTED"] {
        assert!(!out.contains(changed), "{changed}: {out}");
    }
    for cap in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        assert!(out.contains(&format!("{cap}:\t0000000000000000")), "{cap}: {out}");
    }
    // Outside, the files are as they were.
    assert_eq!(std::fs::read_to_string(&value_file).unwrap(), SECRET);
    assert!(std::fs::read_to_string(&ca_key).unwrap().contains("PRIVATE KEY"));
}

#[test]
fn the_secrets_sources_are_not_there_as_root() {
    secrets_are_not_there(User::Root);
}

#[test]
fn the_secrets_sources_are_not_there_as_nobody() {
    secrets_are_not_there(User::Nobody);
}

#[test]
fn a_running_latchkey_serves_the_jail() {
    let up = upstream(true, None);
    let admin = free_port();
    let log = tempfile::tempdir().unwrap();
    let log_file = log.path().join("requests.log");
    let body = format!(
        "[proxy.logging]\nlog_requests = true\nlog_file = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n",
        log_file.display()
    );
    let lk = Latchkey::start(Some(&up), &body, &[("ANTHROPIC_API_KEY", SECRET)]);
    let pid = lk.child.id();
    let script = format!(
        r#"{NO_PROXY_ENV}
test "$ANTHROPIC_API_KEY" = latchkey-anthropic || echo NO-PLACEHOLDER
curl -sS --noproxy '*' -o /dev/null -w 'jailed %{{http_code}}\n' -H "x-api-key: $ANTHROPIC_API_KEY" https://api.anthropic.com/v1/models
cat /proc/{pid}/environ 2>/dev/null | tr '\0' '\n'
test -e /proc/{pid}/environ && echo LATCHKEY-VISIBLE
curl -sS --noproxy '*' -k --max-time 5 -o /dev/null https://198.19.255.200/ 2>/dev/null || echo stale-address-refused
curl -sS --max-time 5 http://127.0.0.1:{admin}/healthz && echo ADMIN-REACHED
curl -sS --max-time 5 --noproxy '*' http://127.0.0.1:{admin}/healthz && echo ADMIN-REACHED
echo done
"#
    );
    // This exec has no secret: only the running instance can inject it.
    let o = latchkey_cmd(lk.dir.path(), &[])
        .args(["exec", "--jail", "--config"])
        .arg(&lk.config_path)
        .args(["--", "bash", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(out.contains("jailed 200") && out.contains("done"), "{}", text(&o));
    assert!(!out.contains("NO-PLACEHOLDER") && !out.contains("ADMIN-REACHED"), "{out}");
    assert!(!out.contains("LATCHKEY-VISIBLE"), "latchkey's process is visible in the jail: {out}");
    assert!(out.contains("stale-address-refused"), "{out}");
    assert!(!out.contains(SECRET), "latchkey's environment read from the jail: {out}");
    assert_eq!(up.requests()[0].header_all("x-api-key"), [SECRET]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&log_file).unwrap_or_default().contains("api.anthropic.com")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let logged = std::fs::read_to_string(&log_file).unwrap_or_default();
    assert!(
        logged.contains("\"injected\"") && logged.contains("api.anthropic.com"),
        "the running instance logged the jail's request:\n{logged}"
    );
    assert!(lk.stderr().contains("jail attached"), "{}", lk.stderr());
    assert!(
        logged.lines().any(|l| l.contains("198.19.255.200") && l.contains("\"blocked\"")),
        "an address the jail never handed out is refused (SSRF), not dialled:\n{logged}"
    );
}

#[test]
fn with_agents_the_jail_is_the_agent_it_was_started_as() {
    let up = upstream(true, None);
    let body = "[agents.coder]\ntoken = \"${CODER_TOKEN}\"\ncredentials = [\"anthropic\"]\n[credentials.anthropic]\nheader = \"x-api-key\"\nvalue = \"${ANTHROPIC_API_KEY}\"\ndomains = [\"api.anthropic.com\"]\n";
    let s = Setup::new(User::Root, Some(up.addr), body);
    let script = format!(
        "{NO_PROXY_ENV}\ncurl -sS --noproxy '*' -o /dev/null https://api.anthropic.com/v1/models; echo \"rc=$?\""
    );
    let env = [("ANTHROPIC_API_KEY", SECRET), ("CODER_TOKEN", "coder-token-1")];
    let o = s.exec(&env, &["--agent", "coder"], &script);
    assert!(stdout(&o).contains("rc=0"), "{}", text(&o));
    assert_eq!(up.requests()[0].header_all("x-api-key"), [SECRET]);
    // No identity: with [agents] every client must be one, so the jail's connections
    // are refused (they cannot present Proxy-Authorization).
    let o = s.exec(&env, &[], &script);
    assert!(stdout(&o).contains("rc=35"), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("proxy-auth"), "{}", text(&o));
    assert_eq!(up.count(), 1);
}

fn status_signals_and_orphans(user: User) {
    let s = Setup::new(user, None, "");
    assert_eq!(s.exec(&[], &[], "exit 7").status.code(), Some(7));
    assert_eq!(s.exec(&[], &[], "kill -TERM $$").status.code(), Some(143), "a signal death is 128+N");
    let uid = if user == User::Root { "0" } else { "65534" };
    let o = s.exec(&[("EXPECT_UID", uid)], &[], "test \"$(id -u)\" = \"$EXPECT_UID\" && echo same-uid; pwd");
    assert!(
        stdout(&o).contains("same-uid") && stdout(&o).contains(s.dir.path().to_str().unwrap()),
        "{}",
        text(&o)
    );
    // Everything CMD started goes with it. The marker differs per user: the root and
    // nobody variants run at once, and with one marker each found (and killed) the
    // other's sleeps while its jail still ran them.
    let base = if user == User::Root { 900_000 } else { 950_000 };
    let marker = format!("{}", base + std::process::id() % 50_000);
    // (Their output goes nowhere: a survivor holding a pipe would hang the test.)
    let status =
        s.cmd(&[], &[], &format!("sleep {marker} & sleep {marker} & exit 0")).stdout(Stdio::null()).status();
    assert!(status.unwrap().success());
    std::thread::sleep(Duration::from_millis(200));
    let survivors: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmd).contains(&marker).then(|| e.file_name().to_str()?.parse().ok())?
        })
        .collect();
    for pid in &survivors {
        // SAFETY: kill(2) on a process this test started (its unique argument).
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    assert!(survivors.is_empty(), "processes started in the jail outlived it: {survivors:?}");
    // SIGTERM to latchkey reaches CMD.
    let mut child = s
        .cmd(&[], &[], "trap 'echo got-term; exit 42' TERM; echo ready; while :; do sleep 0.1; done")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(lines.next().unwrap().unwrap(), "got-term");
    assert_eq!(child.wait().unwrap().code(), Some(42));
}

#[test]
fn status_signals_and_orphans_as_root() {
    status_signals_and_orphans(User::Root);
}

#[test]
fn status_signals_and_orphans_as_nobody() {
    status_signals_and_orphans(User::Nobody);
}

/// Under `script` (a real pseudo-terminal): CMD has the terminal, reads what is typed,
/// and Ctrl-C interrupts it, not latchkey.
fn terminal(user: User) {
    let s = Setup::new(user, None, "");
    let inner = "test -t 0 && test -t 1 && echo TTY-OK; read -r line; echo \"typed [$line]\"; trap 'echo GOT-INT; exit 3' INT; echo READY; while :; do sleep 0.1; done";
    let mut jail = s.cmd(&[], &[], inner);
    let argv: Vec<String> = std::iter::once(jail.get_program().to_string_lossy().into_owned())
        .chain(jail.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect();
    let quoted: Vec<String> = argv.iter().map(|a| format!("'{}'", a.replace('\'', "'\\''"))).collect();
    let envs: Vec<(std::ffi::OsString, std::ffi::OsString)> =
        jail.get_envs().filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))).collect();
    let _ = &mut jail;
    let mut script = Command::new("script");
    // script runs the line with $SHELL; bash execs the last command as dash may not.
    script.args(["-qfec", &quoted.join(" "), "/dev/null"]).env_clear().envs(envs).env("SHELL", "/bin/bash");
    script.current_dir(s.dir.path());
    let mut child =
        script.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut seen = String::new();
    let wait_for = |what: &str, seen: &mut String| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !seen.contains(what) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(b) => seen.push_str(&String::from_utf8_lossy(&b)),
                Err(_) => panic!("no {what:?} from the jailed terminal program: {seen}"),
            }
        }
    };
    wait_for("TTY-OK", &mut seen);
    stdin.write_all(b"hello tty\n").unwrap();
    wait_for("typed [hello tty]", &mut seen);
    wait_for("READY", &mut seen);
    stdin.write_all(b"\x03").unwrap();
    wait_for("GOT-INT", &mut seen);
    assert_eq!(child.wait().unwrap().code(), Some(3), "{seen}");
}

#[test]
fn a_terminal_program_behaves_as_unjailed_as_root() {
    terminal(User::Root);
}

#[test]
fn a_terminal_program_behaves_as_unjailed_as_nobody() {
    terminal(User::Nobody);
}

#[test]
fn without_user_namespaces_the_command_never_runs() {
    // A user namespace (made by root, ids 0-65535 mapped) whose user.max_user_namespaces
    // is 0: inside it, nobody cannot create one, as on a system that forbids them.
    let s = Setup::new(User::Nobody, None, "");
    chown_r(s.dir.path(), NOBODY);
    let marker = s.path("ran");
    let jail = format!(
        "exec setpriv --reuid=65534 --regid=65534 --clear-groups env HOME={home} {bin} exec --jail --config {config} -- touch {marker}",
        home = s.dir.path().display(),
        bin = binary_for(User::Nobody).display(),
        config = s.config.display(),
        marker = marker.display()
    );
    // unshare makes the namespace and waits; this (root) process maps ids 0-65535 into
    // it; the second shell, root there with every capability, sets the limit.
    let inner = format!("echo 0 > /proc/sys/user/max_user_namespaces && {jail}");
    let mut child = Command::new("unshare")
        .args(["--user", "--", "sh", "-c", "read _ && exec sh -c \"$0\""])
        .arg(inner)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let ours = std::fs::read_link("/proc/self/ns/user").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_link(format!("/proc/{pid}/ns/user")).is_ok_and(|ns| ns == ours) {
        assert!(Instant::now() < deadline, "unshare did not make a user namespace");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(format!("/proc/{pid}/uid_map"), "0 0 65536\n").unwrap();
    std::fs::write(format!("/proc/{pid}/gid_map"), "0 0 65536\n").unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(!marker.exists(), "CMD ran unjailed: {}", text(&o));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("user.max_user_namespaces"), "names the setting at fault: {err}");
    assert!(err.contains("not running the command"), "{err}");
}

/// `claude` from npm (@anthropic-ai/claude-code), real, jailed, with only a placeholder.
#[test]
fn claude_code_runs_jailed_against_a_fake_messages_api() {
    require_root();
    let claude = Command::new("sh").args(["-c", "command -v claude"]).output().unwrap();
    assert!(
        claude.status.success(),
        "the Claude Code CLI is not installed (npm install -g @anthropic-ai/claude-code; scripts/test.sh does)"
    );
    let (s, fake, log) = fake_anthropic();
    // Proxy variables unset: Claude Code is caught by the jail, not by its own proxy support.
    let script = format!("{NO_PROXY_ENV}\nclaude -p 'say hi' --model claude-sonnet-4-5 < /dev/null");
    let env = [
        ("ANTHROPIC_API_KEY", SECRET),
        ("DISABLE_TELEMETRY", "1"),
        ("DISABLE_AUTOUPDATER", "1"),
        ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
    ];
    let o = s.cmd(&env, &[], &script).stdin(Stdio::null()).output().unwrap();
    drop(fake);
    let requests = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(stdout(&o).contains("hi from the fake API"), "{}\nrequests:\n{requests}", text(&o));
    assert!(
        requests.lines().any(|l| l.contains("/v1/messages") && l.contains("\"key_ok\": true")),
        "{requests}"
    );
    assert!(!requests.contains("\"key_ok\": false"), "a request reached the API without the key: {requests}");
}

#[test]
fn the_anthropic_python_sdk_without_trust_env_runs_jailed() {
    require_root();
    let (s, fake, log) = fake_anthropic();
    // The SDK's own HTTP client, told to ignore every proxy variable.
    let py = "import os, anthropic\nc = anthropic.Anthropic(http_client=anthropic.DefaultHttpxClient(trust_env=False, verify=os.environ['SSL_CERT_FILE']))\nwith c.messages.stream(model='claude-sonnet-4-5', max_tokens=64, messages=[{'role': 'user', 'content': 'say hi'}]) as st:\n    print(st.get_final_text())";
    let o = s
        .cmd(&[("ANTHROPIC_API_KEY", SECRET)], &[], "python3 -c \"$0\"")
        .arg(py)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    drop(fake);
    let requests = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(stdout(&o).contains("hi from the fake API"), "{}\nrequests:\n{requests}", text(&o));
    assert!(!requests.contains("\"key_ok\": false"), "{requests}");
}

/// A jail setup whose api.anthropic.com is `tests/py/anthropic_fake.py` (which wants
/// SECRET), and nothing else reachable.
fn fake_anthropic() -> (Setup, PyServer, PathBuf) {
    let s = Setup::new(User::Root, None, "");
    let pki = pki();
    let cert = s.write("fake/cert.pem", &pki.cert_pem, 0o644);
    let key = s.write("fake/key.pem", &pki.key_pem, 0o600);
    let log = s.path("fake/requests.log");
    let mut cmd = py("anthropic_fake.py");
    cmd.arg(&cert).arg(&key).arg(SECRET).arg(&log);
    let (server, addr) = python_upstream(cmd);
    let body = "[proxy.filters]\nallowlist_only = true\nallowed_domains = [\"api.anthropic.com\"]\n";
    write_config(s.dir.path(), free_port(), Some(addr), body);
    (s, server, log)
}

#[test]
fn a_jailed_client_that_stops_reading_is_let_go_after_the_idle_timeout() {
    // A connection that arrives without CONNECT is timed as the proxy port's are: a
    // 50 MB download read for 64 KiB and then not at all is cut after `idle_timeout`.
    const TOTAL: usize = 50_000_000;
    let up = upstream(true, None);
    let s = Setup::new(User::Root, Some(up.addr), "#END-PROXY\n[proxy.limits]\nidle_timeout = 2\n");
    let py = format!(
        r#"import socket, ssl, time
s = ssl._create_unverified_context().wrap_socket(socket.create_connection(("api.anthropic.com", 443)), server_hostname="api.anthropic.com")
s.sendall(b"GET /source?bytes={TOTAL} HTTP/1.1\r\nHost: api.anthropic.com\r\n\r\n")
got = 0
while got < 65536:
    got += len(s.recv(65536 - got))
time.sleep(6)
s.settimeout(20)
try:
    while True:
        b = s.recv(1 << 20)
        if not b: break
        got += len(b)
except OSError:
    pass
print("read", got)
"#
    );
    let script = format!("{NO_PROXY_ENV}\npython3 -c \"$0\"\n");
    let o =
        s.cmd(&[("ANTHROPIC_API_KEY", SECRET)], &[], &script).arg(py).stdin(Stdio::null()).output().unwrap();
    let out = stdout(&o);
    let read: usize = out
        .trim()
        .strip_prefix("read ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", text(&o)));
    assert!(
        (65536..TOTAL).contains(&read),
        "the stalled jailed client was never let go: it read {read} bytes"
    );
}
