//! Secret values and their sources. A `Secret` zeroes its memory on drop and never
//! prints itself; the only way to the bytes is `expose()`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use zeroize::Zeroizing;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(s: String) -> Self {
        Secret(Zeroizing::new(s))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// `value = "...${VAR}..."`: literal text and variable references. A reference may list
/// alternatives (`${GH_TOKEN|GITHUB_TOKEN}`: the first one set) or take a regex capture
/// (`${K8S_TOKEN_{cluster}}`: resolved per request among variables present at load).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Lit(String),
    Var(Vec<String>),
    Captured { prefix: String, capture: String, suffix: String },
}

impl Template {
    pub fn parse(raw: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = raw;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Lit(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = closing_brace(after).ok_or("unclosed ${ in value")?;
            parts.push(parse_reference(&after[..end])?);
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// True when the template holds no reference: the secret is written in the config.
    pub fn is_inline(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Lit(_)))
    }

    pub fn has_captures(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Captured { .. }))
    }

    /// The variable names this template reads (capture references by prefix).
    pub fn variables(&self) -> Vec<String> {
        self.parts
            .iter()
            .flat_map(|p| match p {
                Part::Var(names) => names.clone(),
                Part::Captured { prefix, .. } => vec![format!("{prefix}*")],
                Part::Lit(_) => vec![],
            })
            .collect()
    }

    /// The capture references `${PREFIX{capture}SUFFIX}`, for the policy.
    pub fn capture_refs(&self) -> Vec<crate::policy::CaptureRef> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Captured { prefix, capture, suffix } => Some(crate::policy::CaptureRef {
                    prefix: prefix.clone(),
                    capture: capture.clone(),
                    suffix: suffix.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    /// When the template is exactly one reference `${A|B}`: its names.
    pub fn only_variables(&self) -> Option<&[String]> {
        match self.parts.as_slice() {
            [Part::Var(names)] => Some(names),
            _ => None,
        }
    }

    /// When the template is exactly one `${NAME}`: that name (the client-side variable).
    pub fn sole_variable(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Var(names)] if names.len() == 1 => Some(&names[0]),
            _ => None,
        }
    }

    /// Resolve against an environment. Capture references keep every variable with the
    /// reference's prefix that is present now, for lookup per request.
    pub fn resolve(&self, env: &dyn Fn(&str) -> Option<String>, all_vars: &[String]) -> Resolved {
        if self.has_captures() {
            let mut vars = BTreeMap::new();
            for p in &self.parts {
                if let Part::Captured { prefix, suffix, .. } = p {
                    for name in all_vars
                        .iter()
                        .filter(|n| n.starts_with(prefix.as_str()) && n.ends_with(suffix.as_str()))
                    {
                        if let Some(v) = env(name) {
                            vars.insert(name.clone(), Secret::new(v));
                        }
                    }
                }
                if let Part::Var(names) = p
                    && let Some((n, v)) = names.iter().find_map(|n| env(n).map(|v| (n, v)))
                {
                    vars.insert(n.clone(), Secret::new(v));
                }
            }
            return Resolved::Ready(SecretValue::Dynamic { template: self.clone(), vars });
        }
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Var(names) => match names.iter().find_map(|n| env(n)) {
                    Some(v) => out.push_str(&v),
                    None => return Resolved::Missing(format!("${{{}}} is not set", names.join("|"))),
                },
                Part::Captured { .. } => unreachable!("handled above"),
            }
        }
        trimmed(out)
    }

    fn render_dynamic(
        &self,
        vars: &BTreeMap<String, Secret>,
        captures: &[(String, String)],
    ) -> Option<Secret> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Var(names) => out.push_str(names.iter().find_map(|n| vars.get(n))?.expose()),
                Part::Captured { prefix, capture, suffix } => {
                    let value = &captures.iter().find(|(n, _)| n == capture)?.1;
                    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                        return None;
                    }
                    let name = format!("{prefix}{}{suffix}", value.to_ascii_uppercase());
                    out.push_str(vars.get(&name)?.expose());
                }
            }
        }
        Some(Secret::new(out.trim().to_string()))
    }
}

fn closing_brace(s: &str) -> Option<usize> {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return Some(i),
            '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

fn parse_reference(inner: &str) -> Result<Part, String> {
    let valid = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if let Some(open) = inner.find('{') {
        let close = inner.find('}').ok_or("unclosed capture in ${...}")?;
        let (prefix, capture, suffix) = (&inner[..open], &inner[open + 1..close], &inner[close + 1..]);
        if prefix.is_empty() {
            return Err(format!("${{{inner}}}: a capture needs a literal prefix"));
        }
        if !valid(prefix) || !valid(capture) || !(suffix.is_empty() || valid(suffix)) {
            return Err(format!("${{{inner}}}: bad variable name"));
        }
        return Ok(Part::Captured { prefix: prefix.into(), capture: capture.into(), suffix: suffix.into() });
    }
    let names: Vec<String> = inner.split('|').map(str::to_string).collect();
    if !names.iter().all(|n| valid(n)) {
        return Err(format!("${{{inner}}}: bad variable name"));
    }
    Ok(Part::Var(names))
}

/// A credential's secret, ready for use.
#[derive(Clone, Debug)]
pub enum SecretValue {
    Static(Secret),
    Dynamic {
        template: Template,
        vars: BTreeMap<String, Secret>,
    },
    /// `value_file`: re-read whenever the file changes, so rotation needs no restart.
    File(Arc<WatchedFile>),
    /// `value_command` with `value_command_ttl`: run again once its output is that old.
    Command(Arc<CommandSecret>),
}

impl SecretValue {
    /// The value for a request; `None` when it cannot be had (the request gets 502).
    pub fn get(&self, captures: &[(String, String)]) -> Option<Secret> {
        match self {
            SecretValue::Static(s) => Some(s.clone()),
            SecretValue::Dynamic { template, vars } => template.render_dynamic(vars, captures),
            SecretValue::File(f) => f.get(),
            SecretValue::Command(c) => c.get(),
        }
    }

    /// True when the value never changes, so what is built from it can be built once.
    pub fn is_fixed(&self) -> bool {
        matches!(self, SecretValue::Static(_))
    }

    /// Every value this source may put on the wire now (for redaction and leak checks).
    pub fn all(&self) -> Vec<Secret> {
        match self {
            SecretValue::Static(s) => vec![s.clone()],
            SecretValue::Dynamic { vars, .. } => vars.values().cloned().collect(),
            SecretValue::File(f) => f.get().into_iter().collect(),
            SecretValue::Command(c) => c.get().into_iter().collect(),
        }
    }
}

/// A command's output, used for `ttl` and then produced again by running the command.
/// The request that finds it expired runs the command (other requests wait); a failing
/// command leaves no value, so requests get 502 instead of a stale secret.
#[derive(Debug)]
pub struct CommandSecret {
    argv: Vec<String>,
    ttl: std::time::Duration,
    state: Mutex<(std::time::Instant, Option<Secret>)>,
}

impl CommandSecret {
    pub fn get(&self) -> Option<Secret> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0.elapsed() >= self.ttl {
            let run = || match run_command(&self.argv) {
                Resolved::Ready(SecretValue::Static(s)) => Some(s),
                _ => None,
            };
            // Inside the runtime, tell tokio this worker blocks for a moment.
            let fresh = match tokio::runtime::Handle::try_current() {
                Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                    tokio::task::block_in_place(run)
                }
                _ => run(),
            };
            *state = (std::time::Instant::now(), fresh);
        }
        state.1.clone()
    }
}

/// A secret file, re-read when its identity (inode, size, mtime) changes. Editors and
/// Kubernetes replace files by rename, which changes the inode.
#[derive(Debug)]
pub struct WatchedFile {
    path: PathBuf,
    state: Mutex<(Option<FileStamp>, Option<Secret>)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileStamp { ino: meta.ino(), len: meta.len(), mtime: (meta.mtime(), meta.mtime_nsec()) }
    }
}

impl WatchedFile {
    /// The current value: one `stat` per call, a read only when the file changed. A file
    /// that disappears, turns unreadable or becomes writable by others yields `None`.
    pub fn get(&self) -> Option<Secret> {
        let meta = std::fs::metadata(&self.path).ok()?;
        let stamp = FileStamp::of(&meta);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0 != Some(stamp) {
            let fresh = match read_file(&self.path) {
                Resolved::Ready(SecretValue::File(f)) => f.state.lock().ok().and_then(|s| s.1.clone()),
                _ => None,
            };
            *state = (Some(stamp), fresh);
        }
        state.1.clone()
    }
}

/// The outcome of reading a source.
#[derive(Debug)]
pub enum Resolved {
    Ready(SecretValue),
    /// Not configured here (unset variable, absent file): the credential is inactive.
    Missing(String),
    /// Configured but broken: the credential is failed, its requests get 502.
    Failed(String),
}

fn trimmed(s: String) -> Resolved {
    let t = s.trim();
    if t.is_empty() {
        return Resolved::Missing("the value is empty".into());
    }
    Resolved::Ready(SecretValue::Static(Secret::new(if t.len() == s.len() { s } else { t.to_string() })))
}

/// Where a secret comes from.
#[derive(Clone, Debug)]
pub enum Source {
    Value(Template),
    File(PathBuf),
    /// argv, and how long its output is used before it is run again (None: for ever).
    Command(Vec<String>, Option<std::time::Duration>),
}

impl Source {
    pub fn resolve(&self, env: &dyn Fn(&str) -> Option<String>, all_vars: &[String]) -> Resolved {
        match self {
            Source::Value(t) => t.resolve(env, all_vars),
            Source::File(path) => read_file(path),
            Source::Command(argv, None) => run_command(argv),
            Source::Command(argv, Some(ttl)) => match run_command(argv) {
                Resolved::Ready(SecretValue::Static(secret)) => {
                    let state = Mutex::new((std::time::Instant::now(), Some(secret)));
                    let cmd = CommandSecret { argv: argv.clone(), ttl: *ttl, state };
                    Resolved::Ready(SecretValue::Command(Arc::new(cmd)))
                }
                other => other,
            },
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Value(t) if t.is_inline() => "inline value".into(),
            Source::Value(t) => format!("env {}", t.variables().join(", ")),
            Source::File(p) => format!("file {}", p.display()),
            Source::Command(argv, _) => format!("command {}", argv.first().map(String::as_str).unwrap_or("")),
        }
    }
}

fn read_file(path: &Path) -> Resolved {
    match read_file_once(path) {
        Resolved::Ready(SecretValue::Static(secret)) => {
            let stamp = std::fs::metadata(path).ok().map(|m| FileStamp::of(&m));
            let state = Mutex::new((stamp, Some(secret)));
            Resolved::Ready(SecretValue::File(Arc::new(WatchedFile { path: path.to_path_buf(), state })))
        }
        other => other,
    }
}

fn read_file_once(path: &Path) -> Resolved {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Resolved::Missing(format!("{} does not exist", path.display()));
        }
        Err(e) => return Resolved::Failed(format!("{}: {e}", path.display())),
    };
    if let Err(why) = crate::fsutil::owner_only_writable(&meta) {
        return Resolved::Failed(format!("{} {why}", path.display()));
    }
    match std::fs::read_to_string(path) {
        Ok(s) => trimmed(s),
        Err(e) => Resolved::Failed(format!("{}: {e}", path.display())),
    }
}

fn run_command(argv: &[String]) -> Resolved {
    let Some((prog, args)) = argv.split_first() else {
        return Resolved::Failed("value_command is empty".into());
    };
    match Command::new(prog).args(args).stdin(std::process::Stdio::null()).output() {
        Ok(out) if out.status.success() => match String::from_utf8(out.stdout) {
            Ok(s) => trimmed(s),
            Err(_) => Resolved::Failed(format!("{prog} printed non-UTF-8 output")),
        },
        Ok(out) => Resolved::Failed(format!("{prog} exited with {}", out.status)),
        Err(e) => Resolved::Failed(format!("{prog}: {e}")),
    }
}

/// TLS material for a credential's upstream connections: a client identity (mTLS)
/// and/or extra trust roots (`upstream_ca`, e.g. a Kubernetes API server's CA).
pub struct ClientTls {
    pub identity:
        Option<(Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>)>,
    pub roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub describe: String,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls").field("describe", &self.describe).finish_non_exhaustive()
    }
}

/// Why TLS material could not be loaded: missing (inactive) or broken (failed).
pub enum TlsLoadError {
    Missing(String),
    Failed(String),
}

impl ClientTls {
    pub fn load(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<ClientTls, TlsLoadError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let check = |p: &Path| -> Result<(), TlsLoadError> {
            match std::fs::metadata(p) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(TlsLoadError::Missing(format!("{} does not exist", p.display())))
                }
                Err(e) => Err(TlsLoadError::Failed(format!("{}: {e}", p.display()))),
                Ok(m) => crate::fsutil::owner_only_writable(&m)
                    .map_err(|why| TlsLoadError::Failed(format!("{} {why}", p.display()))),
            }
        };
        let certs = |p: &Path| -> Result<Vec<CertificateDer<'static>>, TlsLoadError> {
            check(p)?;
            let v: Vec<_> = CertificateDer::pem_file_iter(p)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TlsLoadError::Failed(format!("{}: {e}", p.display())))?;
            if v.is_empty() {
                return Err(TlsLoadError::Failed(format!("{}: no certificate", p.display())));
            }
            Ok(v)
        };
        let identity = match (cert, key) {
            (Some(c), Some(k)) => {
                let chain = certs(c)?;
                check(k)?;
                let key = PrivateKeyDer::from_pem_file(k)
                    .map_err(|e| TlsLoadError::Failed(format!("{}: {e}", k.display())))?;
                Some((chain, key))
            }
            (None, None) => None,
            _ => return Err(TlsLoadError::Failed("client_cert and client_key go together".into())),
        };
        let roots = match ca {
            Some(p) => certs(p)?,
            None => vec![],
        };
        let mut describe = Vec::new();
        if let Some(c) = cert {
            describe.push(format!("client certificate {}", c.display()));
        }
        if let Some(p) = ca {
            describe.push(format!("upstream_ca {}", p.display()));
        }
        Ok(ClientTls { identity, roots, describe: describe.join(", ") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "A" => Some(" secret-a \n".into()),
            "GITHUB_TOKEN" => Some("gh".into()),
            "K8S_TOKEN_PROD" => Some("prod-token".into()),
            _ => None,
        }
    }

    fn ready(r: Resolved) -> SecretValue {
        match r {
            Resolved::Ready(v) => v,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn interpolates_and_trims() {
        let t = Template::parse("${A}").unwrap();
        assert_eq!(t.sole_variable(), Some("A"));
        assert_eq!(ready(t.resolve(&env, &[])).get(&[]).unwrap().expose(), "secret-a");
        let t = Template::parse("${GH_TOKEN|GITHUB_TOKEN}").unwrap();
        assert_eq!(ready(t.resolve(&env, &[])).get(&[]).unwrap().expose(), "gh");
        assert!(matches!(Template::parse("${NOPE}").unwrap().resolve(&env, &[]), Resolved::Missing(_)));
        assert!(Template::parse("literal").unwrap().is_inline());
        assert!(Template::parse("${A").is_err());
        assert!(Template::parse("${A B}").is_err());
    }

    #[test]
    fn captures_are_checked() {
        assert!(Template::parse("${{cluster}}").is_err(), "needs a literal prefix");
        let t = Template::parse("${K8S_TOKEN_{cluster}}").unwrap();
        let all = vec!["K8S_TOKEN_PROD".to_string(), "A".to_string()];
        let v = ready(t.resolve(&env, &all));
        let get = |c: &str| v.get(&[("cluster".into(), c.into())]).map(|s| s.expose().to_string());
        assert_eq!(get("prod").as_deref(), Some("prod-token"));
        assert_eq!(get("dev"), None);
        assert_eq!(get("pr-od"), None);
        assert_eq!(get(""), None);
    }

    #[test]
    fn debug_never_shows() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s:?}"), "[redacted]");
        let v = SecretValue::Static(s);
        assert!(!format!("{v:?}").contains("hunter2"));
    }

    #[test]
    fn commands() {
        let ok = Source::Command(vec!["echo".into(), "tok".into()], None);
        assert_eq!(ready(ok.resolve(&env, &[])).get(&[]).unwrap().expose(), "tok");
        assert!(matches!(
            Source::Command(vec!["false".into()], None).resolve(&env, &[]),
            Resolved::Failed(_)
        ));
        assert!(matches!(
            Source::File("/nonexistent/latchkey".into()).resolve(&env, &[]),
            Resolved::Missing(_)
        ));
    }
}
