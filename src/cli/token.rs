//! `latchkey token mint|attenuate|inspect|revoke|pubkey`, `latchkey seal`, and the
//! tokens `exec --token-ttl` puts where the placeholders go (SPEC 11).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::load_config;
use crate::config::Config;
use crate::policy::CredState;
use crate::token::{HostRule, Restriction, keys};

/// The checks a mint or an attenuation adds.
#[derive(Args, Debug, Default)]
pub struct Scope {
    /// Allow only this host (repeatable): `api.example.com`, `.example.com` (and its
    /// subdomains), `*.example.com` (subdomains only) or an IP.
    #[arg(long = "host", value_name = "H")]
    hosts: Vec<String>,
    /// Allow only this port (repeatable).
    #[arg(long = "port", value_name = "N")]
    ports: Vec<u16>,
    /// Allow only paths under this prefix (repeatable; whole segments: /v1 covers /v1
    /// and /v1/x, not /v1beta).
    #[arg(long = "path", value_name = "PREFIX")]
    paths: Vec<String>,
    /// Allow only this method (repeatable).
    #[arg(long = "method", value_name = "M")]
    methods: Vec<String>,
    /// Valid for this long: 30s, 5m, 2h, 1d.
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
    /// Allow only requests authenticated as this [agents.NAME] (repeatable).
    #[arg(long = "agent", value_name = "NAME")]
    agents: Vec<String>,
}

impl Scope {
    fn restriction(&self) -> Result<Restriction, String> {
        let hosts = self.hosts.iter().map(|h| HostRule::parse(h)).collect::<Result<Vec<_>, _>>()?;
        let paths = self
            .paths
            .iter()
            .map(|p| crate::policy::canonical_prefix(p).map_err(|e| format!("--path {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let methods: Vec<String> = self.methods.iter().map(|m| m.to_ascii_uppercase()).collect();
        if let Some(m) = methods.iter().find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()))
        {
            return Err(format!("--method {m:?} is not an HTTP method"));
        }
        if self.ports.contains(&0) {
            return Err("--port 0 is not a port".into());
        }
        let not_after = match &self.ttl {
            Some(d) => Some(crate::token::now() + crate::token::parse_duration(d)?),
            None => None,
        };
        Ok(Restriction {
            hosts,
            ports: self.ports.clone(),
            paths,
            methods,
            agents: self.agents.clone(),
            not_after,
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum TokenAction {
    /// Print a new token for one credential, signed with token.key (created beside
    /// ca.key on first use). Without --ttl it is valid until revoked.
    Mint {
        /// The credential the token stands for.
        #[arg(long, value_name = "NAME")]
        credential: String,
        #[command(flatten)]
        scope: Scope,
    },
    /// Print TOKEN narrowed by more checks. Needs no key and no running latchkey.
    Attenuate {
        /// The token (`-`: read it from stdin).
        #[arg(value_name = "TOKEN")]
        token: String,
        #[command(flatten)]
        scope: Scope,
    },
    /// Show a token's credential, checks, expiry and id. Needs no key; verifies nothing.
    Inspect {
        /// The token (`-`: read it from stdin).
        #[arg(value_name = "TOKEN")]
        token: String,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token (and every token attenuated from it) by the token or its id.
    Revoke {
        /// The token, its id (from `inspect` or the request log), or `-` for stdin.
        #[arg(value_name = "TOKEN|ID")]
        token: String,
    },
    /// Print the public key tokens are verified with (creates token.key on first use).
    Pubkey,
}

pub fn token(config: Option<PathBuf>, action: TokenAction) -> ExitCode {
    let result = match action {
        TokenAction::Attenuate { token, scope } => attenuate(&token, &scope),
        TokenAction::Inspect { token, json } => inspect(&token, json),
        action => match load_config(config) {
            Ok(config) => with_config(&config, action),
            Err(code) => return code,
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("latchkey: {e}");
            ExitCode::from(1)
        }
    }
}

fn with_config(config: &Config, action: TokenAction) -> Result<(), String> {
    let dir = &config.proxy.ca_dir;
    match action {
        TokenAction::Mint { credential, scope } => mint(config, &credential, &scope),
        TokenAction::Revoke { token } => revoke(config, &token),
        TokenAction::Pubkey => {
            let root = keys::token_root(dir, true)?.ok_or("no token key")?;
            println!("{}", root.public());
            Ok(())
        }
        TokenAction::Attenuate { .. } | TokenAction::Inspect { .. } => {
            unreachable!("handled without a config")
        }
    }
}

fn mint(config: &Config, name: &str, scope: &Scope) -> Result<(), String> {
    let index = config
        .credentials
        .iter()
        .position(|c| c.name == name)
        .ok_or_else(|| format!("no credential named {name:?} in the config"))?;
    let cred = &config.credentials[index];
    if !crate::token::takes_token(cred) {
        return Err(format!("credential {name} ({}) has no slot a token could go in", cred.auth_type));
    }
    if let Some(a) = scope.agents.iter().find(|a| !config.agents.iter().any(|x| &x.name == *a)) {
        return Err(format!("--agent {a}: no [agents.{a}] in the config"));
    }
    let r = scope.restriction()?;
    let root = keys::token_root(&config.proxy.ca_dir, true)?.ok_or("no token key")?;
    let token = crate::token::mint(&root, name, &r)?;
    let inspected = crate::token::inspect(&token)?;
    println!("{token}");
    let expiry = match inspected.expires {
        Some(t) => format!("expires {t}"),
        None => "valid until revoked (no --ttl)".into(),
    };
    eprintln!("latchkey: token {} for credential {name}, {expiry}", inspected.id);
    Ok(())
}

fn attenuate(token: &str, scope: &Scope) -> Result<(), String> {
    let token = read_arg(token)?;
    println!("{}", crate::token::attenuate(&token, &scope.restriction()?)?);
    Ok(())
}

fn inspect(token: &str, json: bool) -> Result<(), String> {
    let i = crate::token::inspect(&read_arg(token)?)?;
    if json {
        println!("{}", serde_json::to_string(&i).map_err(|e| e.to_string())?);
        return Ok(());
    }
    println!("credential: {}", i.credential.as_deref().unwrap_or("(none: not a latchkey token)"));
    println!("id:         {}", i.id);
    println!("expires:    {}", i.expires.as_deref().unwrap_or("never (until revoked)"));
    for (n, b) in i.blocks.iter().enumerate() {
        let what = if n == 0 { "minted".to_string() } else { format!("attenuation {n}") };
        println!("block {n} ({what}, id {}):", b.id);
        for line in b.source.lines() {
            println!("    {line}");
        }
    }
    Ok(())
}

fn revoke(config: &Config, token_or_id: &str) -> Result<(), String> {
    let dir = &config.proxy.ca_dir;
    let arg = read_arg(token_or_id)?;
    let id = if crate::token::looks_like_token(&arg) {
        crate::token::inspect(&arg)?.id
    } else {
        keys::normalise_id(&arg)?
    };
    let note = format!("revoked {}", crate::token::rfc3339(crate::token::now()));
    let in_file = keys::add_revoked(dir, &id, &note);
    let list = dir.join(keys::REVOKED);
    let Some(cluster) = &config.cluster else {
        match in_file? {
            true => println!(
                "revoked {id} (in {}); a running latchkey refuses it within a second",
                list.display()
            ),
            false => println!("{id} was already revoked (in {})", list.display()),
        }
        return Ok(());
    };
    // Every replica reads the shared set; the file is this host's copy (it may be
    // read-only here, a mounted Secret: then Redis alone carries the revocation).
    let shared = revoke_shared(cluster, &id);
    let server = cluster.server();
    let within = (crate::cluster::revoked::POLL + cluster.timeout).as_secs_f64().ceil();
    match (in_file, shared) {
        (file, Err(e)) => {
            let file = match file {
                Ok(_) => format!("it is in {} (this host only)", list.display()),
                Err(f) => format!("nor in {}: {f}", list.display()),
            };
            Err(format!(
                "{id} is NOT revoked in Redis at {server} ({e}); {file}. Run `latchkey token revoke` again when Redis answers"
            ))
        }
        (Ok(_), Ok(_)) => {
            println!(
                "revoked {id} (in {} and in Redis at {server}); every replica refuses it within {within}s",
                list.display()
            );
            Ok(())
        }
        (Err(f), Ok(_)) => {
            println!(
                "revoked {id} in Redis at {server}; every replica refuses it within {within}s (not in {}: {f})",
                list.display()
            );
            Ok(())
        }
    }
}

/// Add `id` to the shared revocation set, on a runtime of its own (the CLI has none).
fn revoke_shared(cluster: &crate::cluster::ClusterSettings, id: &str) -> Result<bool, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let store =
            crate::cluster::store::Store::open(cluster, Default::default()).map_err(|e| e.to_string())?;
        crate::cluster::revoked::add(&store, id).await.map_err(|_| "Redis does not answer".to_string())
    })
}

/// A command-line token, or stdin for `-` (a token in argv is visible to `ps`).
fn read_arg(arg: &str) -> Result<String, String> {
    if arg != "-" {
        return Ok(arg.trim().to_string());
    }
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s).map_err(|e| format!("stdin: {e}"))?;
    Ok(s.trim().to_string())
}

#[derive(Args, Debug)]
pub struct SealArgs {
    #[arg(long, value_name = "PATH", help = super::CONFIG_HELP)]
    config: Option<PathBuf>,
    /// A host the secret may be sent to (repeatable; config domain patterns). They must
    /// cover every domain of the credential that uses it.
    #[arg(long = "host", value_name = "H")]
    hosts: Vec<String>,
    /// Seal to this public key (from `latchkey seal --export-pubkey`) instead of the
    /// config's seal.key: needs no private key.
    #[arg(long, value_name = "FILE")]
    pubkey: Option<PathBuf>,
    /// Print the public key of seal.key (created beside ca.key on first use) and exit.
    #[arg(long, conflicts_with_all = ["hosts", "pubkey"])]
    export_pubkey: bool,
}

/// `latchkey seal`: the secret on stdin, `lks1:...` on stdout.
pub fn seal(args: SealArgs) -> ExitCode {
    match seal_inner(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, e)) => {
            eprintln!("latchkey: {e}");
            ExitCode::from(code)
        }
    }
}

fn seal_inner(args: SealArgs) -> Result<(), (u8, String)> {
    let local_key = |config: Option<PathBuf>| -> Result<crate::seal::SealKey, (u8, String)> {
        let config = load_config(config).map_err(|_| (2, "the config is invalid (see above)".to_string()))?;
        let text =
            keys::open_or_create(&config.proxy.ca_dir, keys::SEAL_KEY, crate::seal::SealKey::generate_text)
                .map_err(|e| (1, e))?;
        crate::seal::SealKey::from_text(&text).map_err(|e| (1, format!("{}: {e}", keys::SEAL_KEY)))
    };
    if args.export_pubkey {
        println!("{}", local_key(args.config)?.public_text());
        return Ok(());
    }
    let to = match &args.pubkey {
        Some(file) => {
            let text = std::fs::read_to_string(file).map_err(|e| (1, format!("{}: {e}", file.display())))?;
            crate::seal::parse_public(&text).map_err(|e| (1, format!("{}: {e}", file.display())))?
        }
        None => local_key(args.config)?.public(),
    };
    let mut secret = zeroize::Zeroizing::new(String::new());
    std::io::stdin().read_to_string(&mut secret).map_err(|e| (1, format!("stdin: {e}")))?;
    if secret.trim().is_empty() {
        return Err((1, "no secret on stdin (latchkey seal --host H < file)".into()));
    }
    let sealed = crate::seal::seal(&to, &args.hosts, secret.trim()).map_err(|e| (1, e))?;
    println!("{sealed}");
    eprintln!(
        "latchkey: sealed for {}; use it as `sealed = \"...\"` in a credential whose domains those hosts cover",
        args.hosts.join(", ")
    );
    Ok(())
}

/// `exec --token-ttl`: every placeholder in `vars` becomes a fresh token for its
/// credential, scoped to the credential's hosts (and the agent, if any), valid for
/// `ttl` seconds. Minted here when token.key is readable (or can be created) here, else
/// by the running instance (`crate::token::endpoint`).
pub fn exec_tokens(
    config: &Config,
    vars: &mut [(String, String)],
    ttl: u64,
    agent: Option<&str>,
    proxy_url: Option<&str>,
    active: Option<&[String]>,
) -> Result<(), String> {
    let usable = |name: &str, state: &CredState| match active {
        Some(names) => names.iter().any(|n| n == name),
        None => *state == CredState::Active,
    };
    let local = keys::token_root(&config.proxy.ca_dir, true);
    let mut minted: Vec<(String, String)> = Vec::new();
    for (var, value) in vars.iter_mut() {
        let Some(index) =
            config.credentials.iter().zip(&config.policy.credentials).position(|(c, r)| {
                c.env.contains(var) && c.placeholder == *value && usable(&c.name, &r.state)
            })
        else {
            continue;
        };
        let cred = &config.credentials[index];
        if !crate::token::takes_token(cred) {
            continue;
        }
        if let Some((_, token)) = minted.iter().find(|(p, _)| p == value) {
            *value = token.clone();
            continue;
        }
        let token = match &local {
            Ok(Some(root)) => {
                let r = Restriction {
                    hosts: crate::token::endpoint::credential_hosts(config, index),
                    agents: agent.map(str::to_string).into_iter().collect(),
                    not_after: Some(crate::token::now() + ttl),
                    ..Default::default()
                };
                crate::token::mint(root, &cred.name, &r)?
            }
            Ok(None) | Err(_) => remote_mint(config, &cred.name, ttl, proxy_url).map_err(|why| {
                let local = local.as_ref().err().cloned().unwrap_or_default();
                format!("--token-ttl: cannot mint a token for credential {}: {local}; the running latchkey: {why}", cred.name)
            })?,
        };
        minted.push((value.clone(), token.clone()));
        *value = token;
    }
    Ok(())
}

/// Ask the running instance (with the agent's Proxy-Authorization from `proxy_url`).
fn remote_mint(config: &Config, name: &str, ttl: u64, proxy_url: Option<&str>) -> Result<String, String> {
    use std::io::Write;
    let addr = config.client_proxy_addr();
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))
        .map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let auth = proxy_url.and_then(proxy_authorization).map(|v| format!("Proxy-Authorization: {v}\r\n"));
    let path = format!(
        "{}?credential={}&ttl={ttl}",
        crate::token::endpoint::PATH,
        crate::inject::encode_component(name)
    );
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: latchkey\r\n{}Connection: close\r\n\r\n",
        auth.unwrap_or_default()
    )
    .map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let (head, body) = buf.split_once("\r\n\r\n").ok_or("no answer")?;
    if head.starts_with("HTTP/1.1 200") {
        Ok(body.trim().to_string())
    } else {
        Err(body.trim().trim_start_matches("latchkey: ").to_string())
    }
}

/// `Basic base64(user:pass)` from the userinfo of a proxy URL.
fn proxy_authorization(url: &str) -> Option<String> {
    use base64::Engine;
    let rest = url.split_once("://")?.1;
    let (userinfo, _) = rest.rsplit_once('@')?;
    let decode = |s: &str| String::from_utf8(crate::policy::percent_decode(s.as_bytes())).ok();
    let (user, pass) = userinfo.split_once(':')?;
    let pair = format!("{}:{}", decode(user)?, decode(pass)?);
    Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)))
}
