//! `latchkey check`: validate, list credentials, warn. Exit 0 ok, 1 warnings, 2 invalid.

use std::path::PathBuf;
use std::process::ExitCode;

use super::load_config;
use crate::config::Config;
use crate::policy::{CredState, Decision, Destination, Question, RequestHead};

/// Documented endpoints that mint new credentials (one example request each): a
/// credential injected there turns use into read. The built-in providers keep off them
/// with `except_paths`, so `check` is quiet for an unmodified provider table.
const MINTING: &[(&str, &str)] = &[
    ("api.github.com", "/user/keys"),
    ("api.github.com", "/user/gpg_keys"),
    ("api.github.com", "/repos/o/r/keys"),
    ("api.github.com", "/app/installations/1/access_tokens"),
    ("api.github.com", "/authorizations"),
    ("api.github.com", "/repos/o/r/actions/runners/registration-token"),
    ("api.github.com", "/orgs/o/actions/runners/registration-token"),
    ("api.github.com", "/repos/o/r/actions/runners/generate-jitconfig"),
    ("api.openai.com", "/v1/organization/admin_api_keys"),
    ("api.openai.com", "/v1/organization/projects/p/service_accounts"),
    ("api.openai.com", "/v1/organization/projects/p/service_accounts/s/api_keys"),
    ("api.openai.com", "/v1/realtime/client_secrets"),
    ("gitlab.com", "/api/v4/user/personal_access_tokens"),
    ("gitlab.com", "/api/v4/projects/1/access_tokens"),
    ("gitlab.com", "/api/v4/groups/1/deploy_tokens"),
    ("gitlab.com", "/api/v4/user/keys"),
    ("gitlab.com", "/api/v4/user/runners"),
    ("generativelanguage.googleapis.com", "/v1alpha/auth_tokens"),
    ("huggingface.co", "/oauth/token"),
    ("openrouter.ai", "/api/v1/keys"),
    ("sentry.io", "/api/0/sentry-app-installations/i/authorizations"),
    ("sts.amazonaws.com", "/"),
    ("sts.googleapis.com", "/v1/token"),
    ("iamcredentials.googleapis.com", "/v1/projects/-/serviceAccounts/x:generateAccessToken"),
    ("oauth2.googleapis.com", "/token"),
];

pub fn check(config: Option<PathBuf>, local: bool) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match &config.file {
        Some(p) => println!("config: {} (valid)", p.display()),
        None => println!("config: none found; built-in defaults and provider table"),
    }
    if !config.proxy.generate_certs && !config.ca_cert_path().exists() {
        println!("error: generate_certs = false and there is no CA in {}", config.proxy.ca_dir.display());
        return ExitCode::from(2);
    }
    println!("listen: {}   CA: {}", config.proxy.listen, config.ca_cert_path().display());
    let states = States::find(&config, local);
    println!("credentials {}:", states.described);
    for (rule, cred) in config.policy.credentials.iter().zip(&config.credentials) {
        let state = match states.of(&rule.name, &rule.state) {
            CredState::Active => "active".to_string(),
            CredState::Inactive(w) => format!("inactive ({w})"),
            CredState::Failed(w) => format!("FAILED ({w})"),
        };
        let domains: Vec<&str> = rule.patterns.iter().map(|p| p.source.as_str()).collect();
        println!(
            "  {:<16} {:<8} {:<40} {} [{}]",
            cred.name,
            cred.auth_type,
            state,
            domains.join(", "),
            cred.source
        );
    }
    let warnings = warnings(&config, &states);
    for w in &warnings {
        println!("warning: {w}");
    }
    for n in notes(&config) {
        println!("note: {n}");
    }
    if warnings.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// Whose view of the credentials `check` reports: the latchkey running with this CA
/// (it holds the secrets), or this shell's.
struct States {
    running: Option<Vec<crate::explain::CredentialState>>,
    described: String,
}

impl States {
    fn find(config: &Config, local: bool) -> States {
        let addr = config.client_proxy_addr();
        let running = (!local)
            .then(|| super::running_instance(config))
            .flatten()
            .and_then(|a| super::fetch_local(a, "/latchkey/credentials"))
            .and_then(|body| serde_json::from_str::<Vec<crate::explain::CredentialState>>(&body).ok());
        let described = match (&running, local) {
            (Some(_), _) => format!("(as the latchkey running at {addr} has them)"),
            (None, true) => "(as this shell's config has them, as asked with --local)".into(),
            (None, false) => {
                format!("(as this shell's config has them: no latchkey with this CA answers at {addr})")
            }
        };
        States { running, described }
    }

    /// A credential's state: the running instance's when there is one.
    fn of(&self, name: &str, here: &CredState) -> CredState {
        let Some(list) = &self.running else { return here.clone() };
        match list.iter().find(|c| c.name == name) {
            None => CredState::Inactive("not in the running instance's config; reload it".into()),
            Some(c) => {
                let why = c.reason.clone().unwrap_or_default();
                match c.state.as_str() {
                    "active" => CredState::Active,
                    "failed" => CredState::Failed(why),
                    _ => CredState::Inactive(why),
                }
            }
        }
    }
}

fn warnings(config: &Config, states: &States) -> Vec<String> {
    let mut out = Vec::new();
    for (rule, cred) in config.policy.credentials.iter().zip(&config.credentials) {
        match states.of(&rule.name, &rule.state) {
            CredState::Inactive(why) if !cred.builtin => {
                out.push(format!("credential {} is inactive: {why}", rule.name))
            }
            CredState::Failed(why) => {
                out.push(format!("credential {} failed: {why}; its requests get 502", rule.name))
            }
            _ => {}
        }
        if cred.inline_secret {
            out.push(format!(
                "credential {} has its secret written in the config; use ${{VAR}}, value_file or value_command",
                rule.name
            ));
        }
    }
    out.extend(ties(config));
    out.extend(minting(config));
    out
}

/// Credentials the proxy would inject on a documented minting endpoint.
/// Every rule counts as if its secret were present: coverage is a property of the
/// rules, whichever secrets this shell happens to hold.
fn minting(config: &Config) -> Vec<String> {
    let headers = http::HeaderMap::new();
    let mut rules = config.policy.credentials.clone();
    for r in &mut rules {
        r.state = CredState::Active;
    }
    let policy = crate::policy::Policy { credentials: rules, ..Default::default() };
    let mut out = Vec::new();
    for (host, path) in MINTING {
        let dest = Destination::parse_authority(host, Some(443)).expect("static");
        let head = RequestHead { method: "POST", target: path, path, headers: &headers, tls: true };
        // A credential that refuses the endpoint itself (gcp on Google's) is no risk.
        let Decision::Inject { credential, .. } =
            policy.decide(&Question::now(None, &dest, Some(&head)), |_| crate::policy::InSlot::Placeholder)
        else {
            continue;
        };
        out.push(format!(
            "credential {} covers {host}{path}, which mints new credentials (use becomes read); scope it with `paths` or `except_paths`",
            config.policy.credentials[credential].name
        ));
    }
    out
}

/// Hosts where two credentials tie on specificity: the one declared last wins.
fn ties(config: &Config) -> Vec<String> {
    let headers = http::HeaderMap::new();
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for rule in &config.policy.credentials {
        for p in &rule.patterns {
            let Some(host) = p.example_host() else { continue };
            let Ok(dest) = Destination::parse_authority(&host, Some(p.port.unwrap_or(443))) else {
                continue;
            };
            let path = rule.paths.first().map(|p| format!("{p}/")).unwrap_or_else(|| "/".into());
            let method = rule.methods.first().map(String::as_str).unwrap_or("GET");
            let head = RequestHead { method, target: &path, path: &path, headers: &headers, tls: true };
            let ranked = config.policy.ranked(&dest, &head);
            if let [.., (a, ra), (b, rb)] = ranked.as_slice()
                && ra == rb
                && seen.insert((*a, *b))
            {
                let (a, b) = (&config.policy.credentials[*a].name, &config.policy.credentials[*b].name);
                out.push(format!("credentials {a} and {b} overlap on {host} with equal specificity; {b} (declared last) wins"));
            }
        }
    }
    out
}

fn notes(config: &Config) -> Vec<String> {
    let mut out = vec![
        "isolation: an agent running as this user can read this config and its secret sources; run latchkey as its own user or the agent in a container (docs/security.md)".to_string(),
    ];
    if !config.proxy.redact_responses {
        out.push(
            "redact_responses = false: an upstream that echoes a credential shows it to the client".into(),
        );
    }
    let f = &config.policy.filters;
    if !f.content.is_empty() || !f.blocked.is_empty() || f.allowlist_only {
        out.push("filters are advisory unless egress is enforced (a container network policy): a determined agent can bypass HTTP_PROXY".into());
    }
    if config.policy.dlp.enabled {
        out.push("[proxy.dlp] is advisory unless egress is enforced (exec --jail, transparent mode, a container network policy): an agent that ignores HTTP_PROXY sends unscanned (docs/dlp.md)".into());
    }
    if !config.capture_variables.is_empty() {
        out.push(format!("variables available to regex captures: {}", config.capture_variables.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No built-in provider covers a minting endpoint; the same rules without their
    /// except_paths do (whether or not their variables are set here).
    #[test]
    fn builtins_stay_off_minting_endpoints() {
        let env = |_: &str| None;
        let config = crate::config::compile("", None, &env, &[]).unwrap();
        assert_eq!(minting(&config), Vec::<String>::new());
        let mut bare = crate::config::compile("", None, &env, &[]).unwrap();
        for rule in &mut bare.policy.credentials {
            rule.except_paths.clear();
        }
        let warned = minting(&bare);
        for name in ["github ", "openai ", "gitlab ", "gemini ", "huggingface ", "openrouter ", "sentry "] {
            assert!(
                warned.iter().any(|w| w.starts_with(&format!("credential {name}"))),
                "{name}: {warned:?}"
            );
        }
    }
}
