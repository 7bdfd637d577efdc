//! `latchkey providers`: the built-in provider table, with where each one writes its
//! secret (templates, never values).

use std::process::ExitCode;

use crate::config::{self, raw::RawCredential};
use crate::secrets::Template;

pub fn providers() -> ExitCode {
    // Placeholders as a config would assign them (shared variables share one).
    let compiled = config::compile("", None, &|_| None, &[]).ok();
    let placeholder = |name: &str| {
        compiled
            .as_ref()
            .and_then(|c| c.credentials.iter().find(|c| c.name == name))
            .map(|c| c.placeholder.clone())
            .unwrap_or_else(|| "-".into())
    };
    let mut rows = vec![["name", "provider", "injects", "env", "domains", "placeholder"].map(String::from)];
    for (name, p) in config::builtin_providers() {
        let domains =
            if p.domains.is_empty() { "(your cluster hosts)".to_string() } else { p.domains.join(",") };
        rows.push([
            name.clone(),
            p.provider.clone().unwrap_or_default(),
            injects(&p),
            client_env(&p).join(","),
            domains,
            placeholder(&name),
        ]);
    }
    print!("{}", table(&rows));
    println!(
        "\nA provider is active when one of its variables is set. Each stays off its documented credential-minting endpoints (except_paths, docs/providers.md)."
    );
    ExitCode::SUCCESS
}

/// Columns padded to their widest cell, two spaces apart.
fn table(rows: &[[String; 6]]) -> String {
    let widths: Vec<usize> =
        (0..6).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The variables `env` exports the placeholder under.
fn client_env(p: &RawCredential) -> Vec<String> {
    p.env.clone().map(|e| e.into_vec()).unwrap_or_else(|| {
        p.value
            .as_deref()
            .and_then(|v| Template::parse(v).ok())
            .and_then(|t| t.sole_variable().map(str::to_string))
            .into_iter()
            .collect()
    })
}

/// Where the secret goes, as a template: each header slot `Name` or `Name: Prefix`
/// (with any literal text the value puts before the secret), alternatives joined by
/// ` | `; the query parameter; or the signing or certificate scheme.
pub fn injects(p: &RawCredential) -> String {
    let auth = p.auth_type.clone().unwrap_or_else(|| "header".into());
    let lead = p.value.as_deref().map(literal_lead).unwrap_or_default();
    let slots = |default_prefix: Option<&str>| -> String {
        let names = p.header.clone().map(|h| h.into_vec()).unwrap_or_else(|| vec!["Authorization".into()]);
        names
            .iter()
            .map(|raw| {
                let (name, prefix) = match raw.split_once(':') {
                    Some((n, pre)) => (n.trim(), Some(pre.trim()).filter(|s| !s.is_empty())),
                    None => (raw.trim(), None),
                };
                match [prefix.or(default_prefix), Some(lead.as_str()).filter(|l| !l.is_empty())] {
                    [None, None] => name.to_string(),
                    [Some(pre), None] => format!("{name}: {pre}"),
                    [None, Some(l)] => format!("{name}: {l}"),
                    [Some(pre), Some(l)] => format!("{name}: {pre} {l}"),
                }
            })
            .collect::<Vec<_>>()
            .join(" | ")
    };
    match auth.as_str() {
        "header" => slots(None),
        "bearer" => slots(Some("Bearer")),
        "basic" => format!(
            "{} base64({}:…)",
            slots(Some("Basic")),
            // A user name is no secret: shown as written (a literal or a ${VAR} template).
            p.username.as_deref().unwrap_or("…")
        ),
        "query" => format!("?{}={lead}…", p.param.as_deref().unwrap_or("")),
        "aws_sigv4" => "Authorization: AWS4-HMAC-SHA256 (SigV4 signature)".into(),
        "gcp" => "Authorization: Bearer (OAuth2 token minted from Google credentials)".into(),
        "mtls" => "client certificate on the TLS connection".into(),
        other => other.to_string(),
    }
}

/// The literal text a value template puts before its first `${...}` (for
/// `"Token token=${PAGERDUTY_TOKEN}"`: `Token token=`); the whole text when it has no
/// reference (never shown: such a value would be the secret itself).
fn literal_lead(template: &str) -> String {
    match template.find("${") {
        Some(i) => template[..i].to_string(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(name: &str) -> String {
        injects(&config::builtin_providers()[name])
    }

    #[test]
    fn slots_and_prefixes_never_values() {
        assert_eq!(of("anthropic"), "x-api-key | Authorization: Bearer");
        assert_eq!(of("openai"), "Authorization: Bearer");
        assert_eq!(of("azure_openai"), "api-key");
        assert_eq!(of("gemini"), "x-goog-api-key");
        assert_eq!(of("gitlab"), "PRIVATE-TOKEN | Authorization: Bearer");
        assert_eq!(of("pagerduty"), "Authorization: Token token=");
        assert_eq!(of("github_git"), "Authorization: Basic base64(x-access-token:…)");
        assert_eq!(of("kubernetes"), "Authorization: Bearer");
        assert!(of("bedrock").contains("SigV4"));
        assert!(of("talos").contains("client certificate"));
    }
}
