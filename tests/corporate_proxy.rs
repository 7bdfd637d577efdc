//! `[upstream] proxy`: latchkey's upstream connections leave through a corporate proxy,
//! here Debian's squid on loopback with basic authentication. Tunnels appear in
//! squid's access log as CONNECT; a wrong proxy password is a 502 naming the proxy; a
//! squid that intercepts TLS (ssl-bump) with its own CA is refused (upstream TLS fails),
//! never trusted; the proxy password is never logged.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PROXY_USER: &str = "corp-user";
const PROXY_PASSWORD: &str = "Pr0xy-pa55word-REAL";

/// A squid on loopback; killed on drop, its shared memory segments removed.
struct Squid {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let ours = format!("{}-", service_name(self.port));
        for entry in std::fs::read_dir("/dev/shm").into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(&ours) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// A squid's service name of its own: squid names its shared memory segments by it
/// (/dev/shm/squid-cf__*.shm), and two squids at once, or one killed before it removed
/// them, would otherwise collide ("File exists").
fn service_name(port: u16) -> String {
    format!("latchkeytest{port}")
}

impl Squid {
    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// The access log once it has a line containing `needle` (squid logs a CONNECT when
    /// the tunnel closes), or what it has after a few seconds.
    fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.access_log();
            if log.contains(needle) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn squid_helper(name: &str) -> PathBuf {
    ["/usr/lib/squid", "/usr/lib/squid3"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("squid's {name} is missing: apt-get install squid-openssl (scripts/test.sh does)")
        })
}

/// Start squid requiring basic auth; with `bump`, it also intercepts TLS with its own CA
/// (trusting the upstream test CA on its side, as a corporate proxy trusts the world).
fn squid(bump: bool) -> Squid {
    assert!(
        Command::new("squid").arg("-v").output().is_ok_and(|o| o.status.success()),
        "squid is not installed: apt-get install squid-openssl (scripts/test.sh does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // squid drops to its own user: it must read its files and write its logs here.
    set_mode(d, 0o755);
    let hash = Command::new("openssl").args(["passwd", "-apr1", PROXY_PASSWORD]).output().unwrap();
    assert!(hash.status.success(), "openssl passwd failed");
    std::fs::write(d.join("passwd"), format!("{PROXY_USER}:{}", String::from_utf8_lossy(&hash.stdout)))
        .unwrap();
    set_mode(&d.join("passwd"), 0o644);
    for log in ["access.log", "cache.log"] {
        std::fs::write(d.join(log), "").unwrap();
        set_mode(&d.join(log), 0o666);
    }
    // The corporate DNS: squid, not latchkey, can resolve this name.
    std::fs::write(d.join("hosts"), "127.0.0.1 plain.corp.test\n").unwrap();
    set_mode(&d.join("hosts"), 0o644);
    let port = free_port();
    let mut listen = format!("http_port 127.0.0.1:{port}");
    let mut bumping = String::new();
    if bump {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, "corporate interception CA");
        ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let cert = ca.self_signed(&ca_key).unwrap();
        std::fs::write(d.join("bump-ca.pem"), cert.pem()).unwrap();
        std::fs::write(d.join("bump-ca.key"), ca_key.serialize_pem()).unwrap();
        std::fs::write(d.join("upstream-ca.pem"), &pki().ca_pem).unwrap();
        for f in ["bump-ca.pem", "bump-ca.key", "upstream-ca.pem"] {
            set_mode(&d.join(f), 0o644);
        }
        let certgen = squid_helper("security_file_certgen");
        let db = d.join("ssldb");
        let made = Command::new(&certgen).arg("-c").arg("-s").arg(&db).args(["-M", "4MB"]).output().unwrap();
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        let _ = Command::new("chown").args(["-R", "proxy"]).arg(&db).status();
        listen.push_str(&format!(
            " ssl-bump generate-host-certificates=on dynamic_cert_mem_cache_size=4MB tls-cert={0}/bump-ca.pem tls-key={0}/bump-ca.key",
            d.display()
        ));
        bumping = format!(
            "sslcrtd_program {} -s {} -M 4MB\nsslcrtd_children 2\nacl step1 at_step SslBump1\nssl_bump peek step1\nssl_bump bump all\ntls_outgoing_options cafile={}/upstream-ca.pem\n",
            certgen.display(),
            db.display(),
            d.display()
        );
    }
    let conf = format!(
        "{listen}\n{bumping}auth_param basic program {} {}/passwd\nauth_param basic realm corp\n\
         acl authed proxy_auth REQUIRED\nhttp_access deny !authed\nhttp_access allow authed\n\
         cache deny all\naccess_log stdio:{2}/access.log\ncache_log {2}/cache.log\npid_filename {2}/squid.pid\n\
         coredump_dir {2}\nshutdown_lifetime 0 seconds\nmax_filedescriptors 1024\nhosts_file {2}/hosts\n",
        squid_helper("basic_ncsa_auth").display(),
        d.display(),
        d.display(),
    );
    std::fs::write(d.join("squid.conf"), conf).unwrap();
    let child = Command::new("squid")
        .arg("-f")
        .arg(d.join("squid.conf"))
        .args(["-N", "-d1", "-n", &service_name(port)])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        let why = std::fs::read_to_string(d.join("stderr")).unwrap_or_default();
        assert!(Instant::now() < deadline, "squid did not start: {why}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Squid { child, port, dir }
}

/// latchkey with a bearer credential on api.example.com, leaving through `squid` as
/// `user:password`, and its request log on.
fn latchkey_via(up: &Upstream, squid: &Squid, password: &str, extra: &str) -> Latchkey {
    latchkey_with(up, squid, password, extra, "")
}

fn latchkey_with(up: &Upstream, squid: &Squid, password: &str, extra: &str, creds: &str) -> Latchkey {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let body = format!(
        "proxy = \"http://{PROXY_USER}:{password}@127.0.0.1:{}\"\n{extra}#END-UPSTREAM\n\
         [credentials.api]\nauth_type = \"bearer\"\nvalue = \"${{API_TOKEN}}\"\ndomains = [\"api.example.com\"]\n\n\
         {creds}\n[proxy.logging]\nlog_requests = true\nlog_file = \"{}\"\n",
        squid.port,
        dir.path().join("requests.log").display()
    );
    let config = write_config(dir.path(), port, Some(up.addr), &body);
    Latchkey::spawn(dir, port, config, &[("API_TOKEN", "api-REAL-token")])
}

fn request_log(lk: &Latchkey) -> String {
    std::fs::read_to_string(lk.dir.path().join("requests.log")).unwrap_or_default()
}

/// curl through latchkey with `-i`: the whole answer (CONNECT's and the request's heads).
fn curl_i(lk: &Latchkey, url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "20", "-x", &lk.proxy_url(), "--cacert"])
        .arg(lk.bundle())
        .arg(url)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn upstream_connections_go_through_squid_by_connect() {
    let up = upstream(true, None);
    let squid = squid(false);
    let lk = latchkey_via(&up, &squid, PROXY_PASSWORD, "");
    // Intercepted (a credential is injected) and blind (no credential) tunnels alike.
    let (code, body) = lk.curl(&["https://api.example.com/through-squid"]);
    assert_eq!(code, 200, "{body}\n{}", lk.stderr());
    assert_eq!(echoed(&body, "authorization"), vec!["Bearer api-REAL-token"]);
    let (code, body) = lk.curl(&[
        "--cacert",
        &lk.dir.path().join("upstream-ca.pem").display().to_string(),
        "https://other.example.com/blind",
    ]);
    assert_eq!(code, 200, "{body}");
    let target = format!("CONNECT 127.0.0.1:{}", up.addr.port());
    let stderr = lk.stderr();
    let log = request_log(&lk);
    drop(lk); // squid logs a tunnel when it closes
    let access = squid.wait_log(&target);
    assert!(access.matches(&target).count() >= 2, "squid saw no tunnels:\n{access}");
    assert!(access.contains(PROXY_USER), "squid authenticated latchkey:\n{access}");
    // The proxy password is a secret: never in latchkey's log or diagnostics.
    assert!(!stderr.contains(PROXY_PASSWORD) && !log.contains(PROXY_PASSWORD));
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{PROXY_USER}:{PROXY_PASSWORD}"));
    assert!(!stderr.contains(&basic) && !log.contains(&basic));
    // And it never reaches the upstream.
    assert!(up.requests().iter().all(|r| r.header_all("proxy-authorization").is_empty()));
}

#[test]
fn a_wrong_proxy_password_is_a_502_naming_the_proxy() {
    let up = upstream(true, None);
    let squid = squid(false);
    let lk = latchkey_via(&up, &squid, "wrong-password", "");
    let text = curl_i(&lk, "https://api.example.com/x");
    assert!(text.lines().any(|l| l.starts_with("HTTP/") && l.contains(" 502")), "{text}");
    assert!(text.contains(&format!("upstream proxy http://127.0.0.1:{}", squid.port)), "{text}");
    assert!(text.contains("407") && !text.contains("wrong-password"), "{text}");
    assert_eq!(up.count(), 0, "nothing reached the upstream");
    assert!(!lk.stderr().contains("wrong-password") && !request_log(&lk).contains("wrong-password"));
}

#[test]
fn a_squid_that_intercepts_tls_is_refused_never_trusted() {
    let up = upstream(true, None);
    let squid = squid(true);
    let lk = latchkey_via(&up, &squid, PROXY_PASSWORD, "");
    let text = curl_i(&lk, "https://api.example.com/bumped");
    assert!(text.lines().any(|l| l.starts_with("HTTP/") && l.contains(" 502")), "{text}\n{}", lk.stderr());
    assert!(text.to_ascii_lowercase().contains("x-latchkey-error: upstream-tls"), "{text}");
    assert!(text.contains(&format!("through the upstream proxy http://127.0.0.1:{}", squid.port)), "{text}");
    assert!(
        up.requests().iter().all(|r| r.header_all("authorization").is_empty()),
        "the credential never went through the interception"
    );
    // Without interception the same squid setup works: the refusal is about the bump.
    let plain = self::squid(false);
    let lk = latchkey_via(&up, &plain, PROXY_PASSWORD, "");
    assert_eq!(lk.curl(&["https://api.example.com/ok"]).0, 200);
}

#[test]
fn no_proxy_destinations_are_reached_directly() {
    let up = upstream(true, None);
    let squid = squid(false);
    let lk = latchkey_via(&up, &squid, "wrong-password", "no_proxy = [\"other.example.com\"]\n");
    let ca = lk.dir.path().join("upstream-ca.pem").display().to_string();
    let (code, body) = lk.curl(&["--cacert", &ca, "https://other.example.com/direct"]);
    assert_eq!(code, 200, "direct, so the wrong proxy password does not matter: {body}");
    let (code, _) = lk.curl(&["https://api.example.com/via-proxy"]);
    assert_eq!(code, 502, "not in no_proxy: through squid, which refuses the password");
}

#[test]
fn plain_http_goes_to_squid_in_absolute_form_with_the_proxy_password() {
    let up = upstream(false, None);
    let squid = squid(false);
    let port = up.addr.port();
    let plain = format!(
        "[credentials.corp]\nauth_type = \"bearer\"\nvalue = \"${{API_TOKEN}}\"\ndomains = [\"plain.corp.test\"]\nports = [{port}]\nallow_http = true\n"
    );
    let lk = latchkey_with(&up, &squid, PROXY_PASSWORD, "", &plain);
    // latchkey cannot resolve plain.corp.test; squid can (its hosts file), as corporate DNS would.
    let url = format!("http://plain.corp.test:{port}/absolute");
    let (code, body) = lk.curl(&[&url]);
    assert_eq!(code, 200, "{body}\n{}", lk.stderr());
    assert_eq!(echoed(&body, "authorization"), vec!["Bearer api-REAL-token"]);
    assert!(echoed(&body, "proxy-authorization").is_empty(), "the proxy password stays with the proxy");
    let access = squid.wait_log(&format!("GET {url}"));
    assert!(access.contains(&format!("GET {url}")) && access.contains(PROXY_USER), "{access}");
    assert!(!lk.stderr().contains(PROXY_PASSWORD) && !request_log(&lk).contains(PROXY_PASSWORD));
}

#[test]
fn token_endpoints_go_through_squid_too() {
    // The OAuth2 stand-in serves both the token endpoint (other.example.com) and the API.
    let squid = squid(false);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("up.crt"), dir.path().join("up.key"));
    std::fs::write(&cert, &pki().cert_pem).unwrap();
    std::fs::write(&key, &pki().key_pem).unwrap();
    let mut cmd = py("oauth2_server.py");
    cmd.args([&cert, &key]).args([
        "svc-client",
        "cs-secret",
        "read",
        "3600",
        "0",
        "client_secret_basic",
        "-",
    ]);
    let (_server, addr) = python_upstream(cmd);
    let port = free_port();
    let body = format!(
        "proxy = \"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{}\"\n#END-UPSTREAM\n\
         [credentials.things]\nauth_type = \"oauth2_client_credentials\"\ntoken_url = \"https://other.example.com/oauth/token\"\n\
         client_id = \"svc-client\"\nclient_secret = \"${{OAUTH_SECRET}}\"\nscopes = [\"read\"]\ndomains = [\"api.example.com\"]\n",
        squid.port
    );
    let config = write_config(dir.path(), port, Some(addr), &body);
    let lk = Latchkey::spawn(dir, port, config, &[("OAUTH_SECRET", "cs-secret")]);
    let (code, text) = lk.curl(&["https://api.example.com/v1/x"]);
    assert_eq!(code, 200, "{text}\n{}", lk.stderr());
    assert_eq!(json(&text)["token_requests"], 1);
    drop(lk);
    let target = format!("CONNECT 127.0.0.1:{}", addr.port());
    let access = squid.wait_log(&target);
    // One tunnel for the token endpoint, one for the API (never shared across hosts).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut access = access;
    while access.matches(&target).count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        access = squid.access_log();
    }
    assert_eq!(access.matches(&target).count(), 2, "{access}");
}

#[test]
fn the_ssrf_rule_holds_before_the_proxy_is_asked() {
    let up = upstream(true, None);
    let squid = squid(false);
    let lk = latchkey_via(&up, &squid, PROXY_PASSWORD, "");
    // localhost resolves (for latchkey) to loopback: refused before any CONNECT is sent.
    let text = curl_i(&lk, "https://localhost:4443/");
    assert!(text.contains("403") && text.to_ascii_lowercase().contains("x-latchkey-error: ssrf"), "{text}");
    drop(lk);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!squid.access_log().contains("localhost"), "{}", squid.access_log());
}
