//! Client certificates to the upstream (mTLS) and per-credential upstream roots.

mod common;
use std::process::Command;

use common::*;

#[test]
fn upstream_requiring_a_client_certificate_accepts_latchkey_only() {
    let up = upstream_with(UpstreamOpts { tls: true, client_auth: true, ..Default::default() });
    let files = tempfile::tempdir().unwrap();
    let (_, cert, key) = write_pki(files.path());
    let cfg = format!(
        r#"
[credentials.cluster]
auth_type = "mtls"
client_cert = "{}"
client_key = "{}"
domains = ["api.example.com"]

[credentials.both]
header = "x-token"
value = "header-too"
client_cert = "{}"
client_key = "{}"
domains = ["other.example.com"]
"#,
        cert.display(),
        key.display(),
        cert.display(),
        key.display()
    );
    let lk = Latchkey::start(Some(&up), &cfg, &[]);
    let (code, body) = lk.curl(&["https://api.example.com/pods"]);
    assert_eq!(code, 200, "{body}\n{}", lk.stderr());
    assert_eq!(json(&body)["path"], "/pods");
    let (code, body) = lk.curl(&["https://other.example.com/"]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(echoed(&body, "x-token"), ["header-too"], "combinable with header injection");

    // A host without the credential gets no certificate: the upstream refuses latchkey.
    let cfg_none = "[proxy]\nintercept = \"all\"\n#END-PROXY\n";
    let plain = Latchkey::start(Some(&up), cfg_none, &[]);
    let (code, body) = plain.curl(&["https://api.example.com/pods"]);
    assert_eq!(code, 502, "{body}");

    // And a direct client without a certificate is refused by the upstream.
    let ca = files.path().join("pki-ca.pem");
    let out = Command::new("curl")
        .args(["-sS", "--resolve", &format!("api.example.com:{}:127.0.0.1", up.addr.port()), "--cacert"])
        .arg(&ca)
        .arg(format!("https://api.example.com:{}/pods", up.addr.port()))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the upstream must refuse a client without a certificate");
}

#[test]
fn missing_key_material_makes_the_credential_inactive() {
    let up = upstream(true, None);
    let cfg = "[credentials.c]\nauth_type = \"mtls\"\nclient_cert = \"/nonexistent/c.crt\"\nclient_key = \"/nonexistent/c.key\"\ndomains = [\"api.example.com\"]\n";
    let lk = Latchkey::start(Some(&up), cfg, &[]);
    let o = lk.cli(&["check"], &[]);
    let t = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("inactive") && t.contains("/nonexistent/c.crt"), "{t}");
}

#[test]
fn upstream_ca_is_per_credential() {
    let up = upstream(true, None);
    let files = tempfile::tempdir().unwrap();
    let (ca, _, _) = write_pki(files.path());
    // No [upstream] ca_file: only the credential's upstream_ca makes the private CA trusted.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = format!(
        "[proxy]\nport = {port}\nca_dir = \"{}/ca\"\nintercept = \"all\"\n[upstream.resolve]\n\"api.example.com:443\" = \"{}\"\n\"other.example.com:443\" = \"{}\"\n\n[credentials.k8s]\nheader = \"authorization\"\nvalue = \"Bearer k8s-token\"\nupstream_ca = \"{}\"\ndomains = [\"api.example.com\"]\n",
        dir.path().display(),
        up.addr,
        up.addr,
        ca.display()
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, cfg).unwrap();
    set_mode(&path, 0o600);
    let lk = Latchkey::spawn(dir, port, path, &[]);
    let (code, body) = lk.curl(&["https://api.example.com/api/v1/pods"]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(up.requests().last().unwrap().header_all("authorization"), ["Bearer k8s-token"]);
    let (code, body) = lk.curl(&["https://other.example.com/"]);
    assert_eq!(code, 502, "other hosts do not trust the credential's CA: {body}");
}

/// kubectl through latchkey with a placeholder token: the API server sees the real one.
/// kubectl is on this project's machine image (not in Debian's archive); where it is
/// absent the test says so and checks nothing.
#[test]
fn kubectl_through_latchkey() {
    if Command::new("kubectl").arg("version").arg("--client").output().is_err() {
        eprintln!("kubectl not installed: skipped");
        return;
    }
    let up = upstream(true, None);
    let a = up.addr;
    let cfg = format!(
        r#""prod.k8s.example.com:6443" = "{a}"

[credentials.clusters]
header = "Authorization: Bearer"
value = "${{K8S_TOKEN_{{cluster}}}}"
domains = ['~^(?P<cluster>[a-z]+)\.k8s\.example\.com$:6443']
"#
    );
    let lk = Latchkey::start(Some(&up), &cfg, &[("K8S_TOKEN_PROD", "k8s-prod-REAL")]);
    let kubeconfig = lk.dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: prod\n  cluster:\n    server: https://prod.k8s.example.com:6443\n    certificate-authority: {}\nusers:\n- name: agent\n  user:\n    token: latchkey-placeholder\ncontexts:\n- name: prod\n  context: {{cluster: prod, user: agent}}\ncurrent-context: prod\n",
            lk.dir.path().join("ca/ca.crt").display()
        ),
    )
    .unwrap();
    let out = Command::new("kubectl")
        .args(["--kubeconfig"])
        .arg(&kubeconfig)
        .args(["get", "--raw", "/api/v1/namespaces"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("HOME", lk.dir.path())
        .env("HTTPS_PROXY", lk.proxy_url())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(echoed(&text, "authorization"), ["Bearer k8s-prod-REAL"]);
    assert_eq!(json(&text)["path"], "/api/v1/namespaces");
}
