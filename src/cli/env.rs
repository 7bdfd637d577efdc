//! `latchkey env`: the client side of latchkey, as variables. No proxy secret ever.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{load_config, open_ca};
use crate::config::Config;
use crate::policy::{CredState, Destination, RequestHead};

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Format {
    Sh,
    Fish,
    Json,
    Dotenv,
}

/// Variables every CA-aware tool reads, pointed at bundle.pem.
const CA_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "AWS_CA_BUNDLE",
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    "CARGO_HTTP_CAINFO",
    "DENO_CERT",
    "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE",
];

/// Variables that point at real credential files; `exec` points them at stubs.
const CREDENTIAL_FILE_VARS: &[&str] = &[
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AZURE_CLIENT_CERTIFICATE_PATH",
];

/// Git hosts whose SSH remotes `exec` routes over HTTPS when a credential covers them.
const GIT_HOSTS: &[&str] = &["github.com", "gitlab.com", "bitbucket.org"];

pub fn env(
    config: Option<PathBuf>,
    agent: Option<String>,
    format: Format,
    proxy_url: Option<String>,
    ca_path: Option<PathBuf>,
) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if ca_path.is_none()
        && let Err(code) = open_ca(&config, false)
    {
        return code;
    }
    let mut proxy_url = proxy_url;
    if let Err(code) = with_agent(&config, agent.as_deref(), &mut proxy_url) {
        return code;
    }
    let active = super::running_active(&config);
    if active.is_none() {
        eprintln!(
            "latchkey: warning: no latchkey with this CA answers at {}; placeholders are for the credentials active in this shell (start the proxy with `latchkey run`)",
            config.client_proxy_addr()
        );
    }
    let vars = client_env(&config, active.as_deref(), proxy_url, ca_path);
    print!("{}", render(&vars, format));
    ExitCode::SUCCESS
}

/// With `--agent NAME`, put the agent's credentials into the proxy URL
/// (`http://NAME:TOKEN@host:port`; `url` unset means the configured address). The token
/// is the agent's own secret, not a proxied one.
pub fn with_agent(config: &Config, agent: Option<&str>, url: &mut Option<String>) -> Result<(), ExitCode> {
    let Some(name) = agent else { return Ok(()) };
    let Some(a) = config.agents.iter().find(|a| a.name == name) else {
        eprintln!("latchkey: no [agents.{name}] in the config");
        return Err(ExitCode::from(2));
    };
    let Some(token) = &a.token else {
        eprintln!("latchkey: the token of agent {name} is not available here");
        return Err(ExitCode::from(2));
    };
    let base = url.take().unwrap_or_else(|| config.client_proxy_url());
    let (scheme, rest) = base.split_once("://").unwrap_or(("http", &base));
    let userinfo = format!(
        "{}:{}",
        crate::inject::encode_component(name),
        crate::inject::encode_component(token.expose())
    );
    *url = Some(format!("{scheme}://{userinfo}@{rest}"));
    Ok(())
}

/// The client-side environment, in a stable order. `active` names the credentials the
/// running instance can inject (it holds the secrets; this process may not); without
/// it, the credentials active here.
pub fn client_env(
    config: &Config,
    active: Option<&[String]>,
    proxy_url: Option<String>,
    ca_path: Option<PathBuf>,
) -> Vec<(String, String)> {
    let url = proxy_url.unwrap_or_else(|| config.client_proxy_url());
    let (bundle, ca) = match ca_path {
        Some(p) => (p.clone(), p),
        None => (config.bundle_path(), config.ca_cert_path()),
    };
    let mut out: Vec<(String, String)> = Vec::new();
    for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        out.push((k.into(), url.clone()));
    }
    for k in ["NO_PROXY", "no_proxy"] {
        out.push((k.into(), "localhost,127.0.0.1,::1".into()));
    }
    out.push(("NODE_USE_ENV_PROXY".into(), "1".into()));
    for k in CA_VARS {
        out.push(((*k).into(), bundle.display().to_string()));
    }
    out.push(("NODE_EXTRA_CA_CERTS".into(), ca.display().to_string()));
    for (rule, cred) in config.policy.credentials.iter().zip(&config.credentials) {
        let usable = match active {
            Some(names) => names.contains(&rule.name),
            None => rule.state == CredState::Active,
        };
        if !usable {
            continue;
        }
        for var in &cred.env {
            if !out.iter().any(|(k, _)| k == var) {
                out.push((var.clone(), cred.placeholder.clone()));
            }
        }
    }
    let gcp = config.policy.credentials.iter().zip(&config.credentials).any(|(rule, cred)| {
        cred.auth_type == "gcp"
            && match active {
                Some(names) => names.contains(&rule.name),
                None => rule.state == CredState::Active,
            }
    });
    if gcp {
        out.push(("GOOGLE_APPLICATION_CREDENTIALS".into(), gcp_stub(config, &bundle).display().to_string()));
    }
    out.extend(git_rewrites(config));
    out
}

/// A stub Application Default Credentials file: client libraries "refresh" it against
/// oauth2.googleapis.com, where latchkey answers with a dummy token. Next to the CA
/// files (written here when that is this machine's ca_dir).
fn gcp_stub(config: &Config, bundle: &std::path::Path) -> PathBuf {
    let dir = bundle.parent().map(PathBuf::from).unwrap_or_else(|| config.proxy.ca_dir.clone());
    let path = dir.join("gcp-adc-stub.json");
    if dir == config.proxy.ca_dir && !path.exists() {
        let stub = serde_json::json!({
            "type": "authorized_user",
            "client_id": "latchkey-stub",
            "client_secret": "latchkey-stub",
            "refresh_token": "latchkey-stub-refresh-token",
        });
        if let Err(e) = crate::ca::write_atomic(&path, stub.to_string().as_bytes(), 0o644) {
            eprintln!("latchkey: cannot write {}: {e}", path.display());
        }
    }
    path
}

/// Route SSH remotes of credentialed git hosts over HTTPS, where latchkey can inject.
fn git_rewrites(config: &Config) -> Vec<(String, String)> {
    let headers = http::HeaderMap::new();
    let mut pairs = Vec::new();
    for host in GIT_HOSTS {
        let dest = Destination::parse_authority(host, Some(443)).expect("static host");
        let head = RequestHead { method: "GET", target: "/", path: "/", headers: &headers, tls: true };
        if config.policy.winner(&dest, &head).is_some() {
            pairs.push((format!("url.https://{host}/.insteadOf"), format!("git@{host}:")));
            pairs.push((format!("url.https://{host}/.insteadof"), format!("ssh://git@{host}/")));
        }
    }
    if pairs.is_empty() {
        return vec![];
    }
    let base: usize = std::env::var("GIT_CONFIG_COUNT").ok().and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut out = vec![("GIT_CONFIG_COUNT".to_string(), (base + pairs.len()).to_string())];
    for (i, (k, v)) in pairs.into_iter().enumerate() {
        out.push((format!("GIT_CONFIG_KEY_{}", base + i), k));
        out.push((format!("GIT_CONFIG_VALUE_{}", base + i), v));
    }
    out
}

/// Variables `exec` removes from the child: everything a credential source or a
/// built-in provider reads, what value_commands are given, every agent's token variable
/// (the chosen agent's token reaches the child only inside the proxy URL), and
/// credential-file pointers.
pub fn scrub_list(config: &Config) -> Vec<String> {
    let mut reads: Vec<String> = config
        .credentials
        .iter()
        .flat_map(|c| c.reads.iter().chain(&c.command_env).cloned())
        .chain(config.agents.iter().flat_map(|a| a.reads.clone()))
        .collect();
    for (_, p) in crate::config::builtin_providers() {
        let templates =
            [&p.value, &p.password, &p.username, &p.access_key_id, &p.secret_access_key, &p.session_token];
        for v in templates.into_iter().flatten() {
            if let Ok(t) = crate::secrets::Template::parse(v) {
                reads.extend(t.variables());
            }
        }
    }
    reads.extend(CREDENTIAL_FILE_VARS.iter().map(|s| s.to_string()));
    reads.extend(["AWS_SESSION_TOKEN", "AWS_PROFILE"].map(String::from));
    reads.push("LATCHKEY_CONFIG".into());
    let mut out = Vec::new();
    for r in reads {
        match r.strip_suffix('*') {
            Some(prefix) => out.extend(
                std::env::vars_os()
                    .filter_map(|(k, _)| k.into_string().ok())
                    .filter(|k| k.starts_with(prefix)),
            ),
            None => out.push(r),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Variables of this environment whose value holds a secret or an agent token latchkey
/// has loaded, whatever their name (`ALL_PROXY` with another agent's token in it, a copy
/// of a key under a name no credential reads): `exec` removes them too.
pub fn holding_secrets(config: &Config) -> Vec<String> {
    // Shorter values would match too much by chance; those are scrubbed by name only.
    const MIN: usize = 6;
    let secrets: Vec<crate::secrets::Secret> = config
        .secret_values()
        .into_iter()
        .chain(config.agents.iter().filter_map(|a| a.token.clone()))
        .filter(|s| s.expose().len() >= MIN)
        .collect();
    std::env::vars_os()
        .filter_map(|(k, v)| {
            let (k, v) = (k.into_string().ok()?, v.to_string_lossy().into_owned());
            secrets.iter().any(|s| v.contains(s.expose())).then_some(k)
        })
        .collect()
}

fn render(vars: &[(String, String)], format: Format) -> String {
    let quote = |v: &str| format!("'{}'", v.replace('\'', "'\\''"));
    match format {
        Format::Sh => vars.iter().map(|(k, v)| format!("export {k}={}\n", quote(v))).collect(),
        Format::Fish => vars.iter().map(|(k, v)| format!("set -gx {k} {}\n", quote(v))).collect(),
        Format::Dotenv => {
            vars.iter().map(|(k, v)| format!("{k}={}\n", serde_json::Value::String(v.clone()))).collect()
        }
        Format::Json => {
            let map: serde_json::Map<String, serde_json::Value> =
                vars.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
            format!("{}\n", serde_json::Value::Object(map))
        }
    }
}
