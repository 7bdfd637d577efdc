//! From a `[credentials.NAME]` table to an injector: one builder per `auth_type`, found
//! in `BUILDERS`, all resolving their secrets through one `Sources` (which records what
//! the credential reads and whether it is active, inactive or failed). The config
//! compiler does what every credential shares (hosts, paths, limits, TLS material) and
//! calls the builder its `auth_type` names.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::raw::RawCredential;
use crate::policy::{CaptureRef, CredState, Endpoint, Host};
use crate::secrets::{Resolved, Secret, SecretValue, Source, Template};

use super::Injector;

/// A builder: the raw table and its secrets in, an injector (and what the policy must
/// know of it) out.
pub type Builder = fn(&RawCredential, &mut Sources<'_>) -> Result<Built, BuildError>;

/// Every auth type latchkey knows, and its builder.
pub const BUILDERS: &[(&str, Builder)] = &[
    ("header", super::header::build_header),
    ("bearer", super::header::build_bearer),
    ("basic", super::header::build_basic),
    ("query", super::query::build),
    ("mtls", super::mtls::build),
    ("aws_sigv4", super::sigv4::build),
    ("gcp", super::gcp::build),
    ("oauth2_client_credentials", super::oauth2::build),
    ("github_app", super::github_app::build),
];

/// The builder for `auth_type`, or the error naming the ones there are.
pub fn builder(auth_type: &str) -> Result<Builder, BuildError> {
    BUILDERS.iter().find(|(name, _)| *name == auth_type).map(|(_, b)| *b).ok_or_else(|| {
        BuildError::new("auth_type", format!("{auth_type:?}: expected one of {}", names().join(", ")))
    })
}

fn names() -> Vec<&'static str> {
    BUILDERS.iter().map(|(name, _)| *name).collect()
}

/// What a builder makes.
pub struct Built {
    pub injector: Box<dyn Injector>,
    /// The source `check` and `explain` describe, whose sole variable `env` exports the
    /// placeholder under.
    pub primary: Source,
    /// The secret is written in the config file itself (`check` warns).
    pub inline: bool,
    /// Hosts the credential is never written to (they mint new credentials).
    pub never_to: Vec<Host>,
    /// A token endpoint latchkey answers itself for this credential.
    pub vends: Option<Endpoint>,
}

impl Built {
    pub fn new(injector: Box<dyn Injector>, primary: Source) -> Built {
        let inline = matches!(&primary, Source::Value(t) if t.is_inline());
        Built { injector, primary, inline, never_to: Vec::new(), vends: None }
    }
}

/// A credential table that cannot be built: the key at fault and why.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BuildError {
    pub key: &'static str,
    pub message: String,
}

impl BuildError {
    pub fn new(key: &'static str, message: impl Into<String>) -> Self {
        BuildError { key, message: message.into() }
    }
}

/// The one secret-source resolver builders share: turns the table's `value` /
/// `value_file` / `value_command` (and other templates) into values, and keeps what the
/// credential reads and the state its sources leave it in.
pub struct Sources<'a> {
    raw: &'a RawCredential,
    env: &'a dyn Fn(&str) -> Option<String>,
    vars: &'a [String],
    secrets_dir: &'a Path,
    /// Where `seal.key` is (the CA directory), for `sealed` values.
    key_dir: &'a Path,
    /// Variables the secret templates read (scrubbed from `exec` children).
    pub reads: Vec<String>,
    /// `${PREFIX{capture}}` references in those templates.
    pub captures: Vec<CaptureRef>,
    pub state: CredState,
    /// The values resolved, brought up to date before each use.
    pub resolved: Vec<SecretValue>,
}

impl<'a> Sources<'a> {
    pub fn new(
        raw: &'a RawCredential,
        env: &'a dyn Fn(&str) -> Option<String>,
        vars: &'a [String],
        secrets_dir: &'a Path,
        key_dir: &'a Path,
    ) -> Self {
        Sources {
            raw,
            env,
            vars,
            secrets_dir,
            key_dir,
            reads: Vec::new(),
            captures: Vec::new(),
            state: CredState::Active,
            resolved: Vec::new(),
        }
    }

    /// A variable of latchkey's environment (for discovery, not for secrets).
    pub fn env(&self, name: &str) -> Option<String> {
        (self.env)(name)
    }

    pub fn template(&self, key: &'static str, value: &str) -> Result<Template, BuildError> {
        Template::parse(value).map_err(|e| BuildError::new(key, e.to_string()))
    }

    /// The secret source of `value_key`: exactly one of it, `value_file`,
    /// `value_command` and `sealed`.
    pub fn source(&self, value_key: &'static str, value: Option<&String>) -> Result<Source, BuildError> {
        let c = self.raw;
        let given = [
            value.is_some(),
            c.value_file.is_some(),
            c.value_command.is_some(),
            c.sealed.is_some(),
            c.value_keyring.is_some(),
        ];
        let keys = format!("`{value_key}`, `value_file`, `value_command`, `value_keyring`, `sealed`");
        match given.iter().filter(|g| **g).count() {
            1 => {}
            0 => return Err(BuildError::new(value_key, format!("set one of {keys}"))),
            _ => return Err(BuildError::new(value_key, format!("set only one of {keys}"))),
        }
        Ok(if let Some(v) = value {
            Source::Value(self.template(value_key, v)?)
        } else if let Some(blob) = &c.sealed {
            let sealed = crate::seal::parse(blob).map_err(|x| BuildError::new("sealed", x.to_string()))?;
            Source::Sealed { sealed: Box::new(sealed), key_dir: self.key_dir.to_path_buf() }
        } else if let Some(entry) = &c.value_keyring {
            let (service, account) =
                entry.split_once('/').filter(|(s, a)| !s.is_empty() && !a.is_empty()).ok_or_else(|| {
                    BuildError::new("value_keyring", format!("{entry:?}: write \"SERVICE/ACCOUNT\""))
                })?;
            Source::Keyring { service: service.into(), account: account.into() }
        } else if let Some(f) = &c.value_file {
            Source::File(crate::config::expand_home(f))
        } else {
            let argv = c.value_command.clone().unwrap_or_default();
            if argv.is_empty() {
                return Err(BuildError::new("value_command", "the command is empty"));
            }
            Source::Command(crate::secrets::CommandSpec {
                argv,
                ttl: c.value_command_ttl.map(Duration::from_secs),
                env: c.value_command_env.clone(),
            })
        })
    }

    /// Resolve `src`: its value, or `None` after marking the credential inactive
    /// (missing) or failed.
    pub fn resolve(&mut self, src: &Source) -> Option<SecretValue> {
        if let Source::Value(t) = src {
            self.reads.extend(t.variables());
            self.captures.extend(t.capture_refs());
        }
        let resolved = src.resolve(self.env, self.vars);
        match with_secrets_dir(resolved, src, self.secrets_dir, self.raw.secret_file.as_deref()) {
            Resolved::Ready(v) => {
                self.resolved.push(v.clone());
                Some(v)
            }
            Resolved::Missing(why) => {
                self.missing(why);
                None
            }
            Resolved::Failed(why) => {
                self.failed(why);
                None
            }
        }
    }

    /// As `resolve`, with a stand-in value when the source gave none (the credential is
    /// then inactive or failed, and never injected).
    pub fn resolve_or_unset(&mut self, src: &Source) -> SecretValue {
        self.resolve(src).unwrap_or_else(|| SecretValue::Static(Secret::new("unset".into())))
    }

    /// An optional `${VAR}` template (an AWS session token): an unset variable means
    /// "none"; an inline value or a variable that cannot be read is an error.
    pub fn optional(
        &mut self,
        key: &'static str,
        value: Option<&String>,
    ) -> Result<Option<SecretValue>, BuildError> {
        let Some(value) = value else { return Ok(None) };
        let template = self.template(key, value)?;
        self.reads.extend(template.variables());
        let inline = template.is_inline();
        match Source::Value(template).resolve(self.env, self.vars) {
            Resolved::Ready(v) => {
                self.resolved.push(v.clone());
                Ok(Some(v))
            }
            Resolved::Missing(_) if !inline => Ok(None),
            _ => Err(BuildError::new(key, "cannot be resolved")),
        }
    }

    /// A source is missing: the credential is inactive (unless something failed).
    pub fn missing(&mut self, why: String) {
        if self.state == CredState::Active {
            self.state = CredState::Inactive(why);
        }
    }

    /// A source failed: the credential's requests get 502.
    pub fn failed(&mut self, why: String) {
        self.state = CredState::Failed(why);
    }

    /// A path from the config, `~` expanded.
    pub fn path(&self, raw: &str) -> PathBuf {
        crate::config::expand_home(raw)
    }
}

/// Seed 001's convention: a `${VAR}` credential whose variable is unset reads
/// `<secrets_dir>/<var in lowercase>` (or the provider's `secret_file`) when it exists.
fn with_secrets_dir(resolved: Resolved, src: &Source, dir: &Path, hint: Option<&str>) -> Resolved {
    let (Resolved::Missing(_), Source::Value(t)) = (&resolved, src) else { return resolved };
    let Some(names) = t.only_variables() else { return resolved };
    let candidates = hint.into_iter().map(str::to_string).chain(names.iter().map(|n| n.to_ascii_lowercase()));
    match candidates.map(|f| dir.join(f)).find(|p| p.is_file()) {
        Some(path) => Source::File(path).resolve(&|_| None, &[]),
        None => resolved,
    }
}
