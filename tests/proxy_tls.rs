//! The proxy hop protected (issue 16.7): `[proxy] tls = true` serves the proxy port over
//! TLS with a leaf from latchkey's CA, and `[agents.NAME] client_cert_sha256` /
//! `client_ca` identify an agent by its client certificate. Real clients: curl with
//! `--proxy https://`, `--proxy-cacert`, `--proxy-cert`/`--proxy-key`, and Python
//! requests (urllib3 2) with an `https://` HTTPS_PROXY.

mod common;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A client certificate and key written as PEM files, and its SHA-256 fingerprint.
struct ClientId {
    cert: PathBuf,
    key: PathBuf,
    sha256: String,
}

fn write_id(dir: &Path, name: &str, cert: &rcgen::Certificate, key: &KeyPair) -> ClientId {
    let (c, k) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    set_mode(&k, 0o600);
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.der());
    let sha256 = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
    ClientId { cert: c, key: k, sha256 }
}

fn client_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p
}

fn self_signed(dir: &Path, name: &str) -> ClientId {
    let key = KeyPair::generate().unwrap();
    let cert = client_params(name).self_signed(&key).unwrap();
    write_id(dir, name, &cert, &key)
}

/// An agent CA (written to `<name>-ca.pem`) and one client certificate it issued.
fn issued(dir: &Path, name: &str) -> (PathBuf, ClientId) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, format!("{name} agent CA"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let ca_path = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = client_params(name).signed_by(&key, &issuer).unwrap();
    (ca_path, write_id(dir, name, &cert, &key))
}

struct Setup {
    _up: Upstream,
    lk: Latchkey,
    log: PathBuf,
    pinned: ClientId,
    from_ca: ClientId,
    stranger: ClientId,
    _files: tempfile::TempDir,
}

fn start() -> Setup {
    let up = upstream(true, None);
    let files = tempfile::tempdir().unwrap();
    let pinned = self_signed(files.path(), "pinned");
    let stranger = self_signed(files.path(), "stranger");
    let (agent_ca, from_ca) = issued(files.path(), "fleet");
    // A certificate from a CA nobody trusts, with the same subject: identifies no one.
    let log = files.path().join("requests.log");
    let cfg = format!(
        r#"[proxy]
tls = true
tls_names = ["latchkey.internal"]
[proxy.logging]
log_requests = true
log_file = "{}"
#END-PROXY
[agents.pinned]
client_cert_sha256 = "{}"

[agents.fleet]
client_ca = "{}"

[agents.tokened]
token = "tok-123"

[credentials.example]
header = "x-api-key"
value = "example-REAL"
domains = ["api.example.com"]
"#,
        log.display(),
        pinned.sha256,
        agent_ca.display(),
    );
    let lk = Latchkey::start(Some(&up), &cfg, &[]);
    Setup { _up: up, lk, log, pinned, from_ca, stranger, _files: files }
}

impl Setup {
    fn ca(&self) -> PathBuf {
        self.lk.dir.path().join("ca").join("ca.crt")
    }

    /// curl through `https://HOST:PORT` as the proxy: (CONNECT status, final status, body).
    fn curl(&self, proxy_host: &str, extra: &[&str], url: &str) -> (u16, u16, String) {
        let out = Command::new("curl")
            .env_clear()
            .args(["-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_connect} %{http_code}"])
            .arg("--proxy")
            .arg(format!("https://{proxy_host}:{}", self.lk.port))
            .args(["--resolve", &format!("latchkey.internal:{}:127.0.0.1", self.lk.port)])
            .args(["--resolve", &format!("elsewhere.internal:{}:127.0.0.1", self.lk.port)])
            .arg("--cacert")
            .arg(self.lk.bundle())
            .args(extra)
            .arg(url)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, codes) = text.rsplit_once('\n').unwrap_or(("", "0 0"));
        let mut codes = codes.split(' ').map(|c| c.trim().parse().unwrap_or(0));
        let (connect, code) = (codes.next().unwrap_or(0), codes.next().unwrap_or(0));
        let body = if code == 0 { String::from_utf8_lossy(&out.stderr).into_owned() } else { body.into() };
        (connect, code, body)
    }

    fn with_cert(&self, id: &ClientId) -> Vec<String> {
        let ca = self.ca();
        ["--proxy-cacert", ca.to_str().unwrap(), "--proxy-cert", id.cert.to_str().unwrap()]
            .into_iter()
            .chain(["--proxy-key", id.key.to_str().unwrap()])
            .map(str::to_string)
            .collect()
    }

    /// The `agent` of every log line, once there is one: a line is written when the
    /// exchange ends, which may be just after the client has exited.
    fn log_agents(&self) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if !text.is_empty() || std::time::Instant::now() > deadline {
                return text.lines().map(|l| json(l)["agent"].as_str().unwrap_or("-").to_string()).collect();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn an_https_proxy_url_works_with_the_proxy_ca_and_a_pinned_client_certificate() {
    let s = start();
    let args = s.with_cert(&s.pinned);
    for host in ["127.0.0.1", "localhost", "latchkey.internal"] {
        let (connect, code, body) = s.curl(host, &strs(&args), "https://api.example.com/v1/x");
        assert_eq!((connect, code), (200, 200), "via {host}: {body}\n{}", s.lk.stderr());
        assert_eq!(echoed(&body, "x-api-key"), ["example-REAL"], "the key is injected behind a TLS hop");
    }
    // Absolute-form plain HTTP through the TLS hop is identified the same way.
    let (_, code, body) = s.curl("127.0.0.1", &strs(&args), "http://api.example.com/plain");
    assert_ne!(code, 407, "{body}");
    assert!(s.log_agents().iter().all(|a| a == "pinned"), "{:?}", s.log_agents());
}

#[test]
fn the_proxy_certificate_is_the_cas_and_names_only_the_proxy() {
    let s = start();
    let args = s.with_cert(&s.pinned);
    // Without trusting latchkey's CA for the proxy hop, curl refuses the proxy.
    let plain = ["--proxy-cert", args[3].as_str(), "--proxy-key", args[5].as_str()];
    let (_, code, err) = s.curl("127.0.0.1", &plain, "https://api.example.com/");
    assert_eq!(code, 0, "an untrusted proxy certificate must fail: {err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // A name that is not the proxy's is not in its certificate.
    let (_, code, err) = s.curl("elsewhere.internal", &strs(&args), "https://api.example.com/");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("elsewhere.internal") || err.to_lowercase().contains("certificate"), "{err}");
    // A client speaking plain HTTP to the TLS port gets nothing served.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", "-x"])
        .arg(format!("http://127.0.0.1:{}", s.lk.port))
        .arg("http://api.example.com/")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "000", "plain HTTP on the TLS port must not be served");
}

#[test]
fn a_certificate_from_the_agents_ca_identifies_it() {
    let s = start();
    let (connect, code, body) =
        s.curl("127.0.0.1", &strs(&s.with_cert(&s.from_ca)), "https://api.example.com/");
    assert_eq!((connect, code), (200, 200), "{body}\n{}", s.lk.stderr());
    assert_eq!(s.log_agents(), ["fleet"]);
}

#[test]
fn a_wrong_or_absent_certificate_gets_407() {
    let s = start();
    let url = "https://api.example.com/";
    let ca = s.ca();
    let ca = ca.to_str().unwrap();
    // No certificate, no Proxy-Authorization.
    let (connect, _, body) = s.curl("127.0.0.1", &["--proxy-cacert", ca], url);
    assert_eq!(connect, 407, "{body}");
    // A self-signed certificate nobody pinned.
    let (connect, _, body) = s.curl("127.0.0.1", &strs(&s.with_cert(&s.stranger)), url);
    assert_eq!(connect, 407, "{body}");
    // A pinned certificate plus another agent's token: two identities, refused.
    let mut both = s.with_cert(&s.pinned);
    both.extend(["--proxy-user".to_string(), "tokened:tok-123".to_string()]);
    let (connect, _, body) = s.curl("127.0.0.1", &strs(&both), url);
    assert_eq!(connect, 407, "{body}");
    // Plain HTTP through the hop, no identity: latchkey's own 407.
    let (_, code, body) = s.curl("127.0.0.1", &["--proxy-cacert", ca], "http://api.example.com/");
    assert_eq!(code, 407, "{body}");
    assert!(body.contains("latchkey: ") && body.contains("client certificate"), "{body}");
    // The token alone still works on the TLS port.
    let (connect, code, body) =
        s.curl("127.0.0.1", &["--proxy-cacert", ca, "--proxy-user", "tokened:tok-123"], url);
    assert_eq!((connect, code), (200, 200), "{body}");
    assert_eq!(s.log_agents().last().map(String::as_str), Some("tokened"));
}

/// Python requests (urllib3 2) with `HTTPS_PROXY=https://...`: the bundle latchkey writes
/// (its CA plus the public roots) verifies both the proxy hop and the intercepted host.
#[test]
fn python_requests_uses_an_https_proxy() {
    let s = start();
    let script = r#"
import os, sys, requests
r = requests.get("https://api.example.com/py", timeout=20)
print(r.status_code)
print(r.json()["headers"])
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .env("HTTPS_PROXY", format!("https://tokened:tok-123@127.0.0.1:{}", s.lk.port))
        .env("REQUESTS_CA_BUNDLE", s.lk.bundle())
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("200\n") && text.contains("example-REAL"), "{text}");
}

/// `latchkey env` hands out an `https://` proxy URL, and `check` reaches the running
/// instance over TLS.
#[test]
fn env_and_check_speak_to_a_tls_proxy_port() {
    let s = start();
    let out = s.lk.cli(&["env", "--format", "json"], &[]);
    let vars = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(vars["HTTPS_PROXY"], format!("https://127.0.0.1:{}", s.lk.port));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("no latchkey with this CA answers"), "env must find the TLS instance: {err}");
}

/// A client certificate is public: an attacker who copied the pinned agent's certificate
/// presents it, signing the handshake with a key of its own. rustls checks the handshake
/// signature against the certificate, so the connection dies before any request.
#[test]
fn a_copied_certificate_without_its_key_gets_nothing() {
    let s = start();
    let connect = |cert: &ClientId, key: &ClientId| -> String {
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_file(&cert.cert).unwrap();
        let key_der = rustls::pki_types::PrivateKeyDer::from_pem_file(&key.key).unwrap();
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let signer = provider.key_provider.load_private_key(key_der).unwrap();
        let certified = rustls::sign::CertifiedKey::new(vec![der], signer);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from_pem_file(s.ca()).unwrap()).unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_cert_resolver(std::sync::Arc::new(Present(std::sync::Arc::new(certified))));
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
        let tls = rustls::StreamOwned::new(conn, common::raw::connect(s.lk.port));
        common::raw::request(tls, "CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n")
    };
    let honest = connect(&s.pinned, &s.pinned);
    assert!(honest.starts_with("HTTP/1.1 200"), "the real holder gets in: {honest:?}");
    let forged = connect(&s.pinned, &s.stranger);
    assert!(!forged.contains("HTTP/1.1 "), "a copied certificate must not get an answer: {forged:?}");
}

/// A client that presents whatever certificate and key it is given.
#[derive(Debug)]
struct Present(std::sync::Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Present {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
