//! Secret values and their sources. A `Secret` zeroes its memory on drop and never
//! prints itself; the only way to the bytes is `expose()`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

/// Shared, not copied: a clone is the same bytes (zeroed when the last holder drops
/// them), so handing a secret around — each request asks its credential's injector for
/// its secrets to find the cached redactor — neither allocates nor leaves copies of it
/// in freed memory.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<Zeroizing<String>>);

impl Secret {
    pub fn new(s: String) -> Self {
        Secret(Arc::new(Zeroizing::new(s)))
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

message_error! {
    /// A `${...}` template that does not parse: why.
    pub TemplateError
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
    pub fn parse(raw: &str) -> Result<Template, TemplateError> {
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

fn parse_reference(inner: &str) -> Result<Part, TemplateError> {
    let valid = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if let Some(open) = inner.find('{') {
        let close = inner.find('}').ok_or("unclosed capture in ${...}")?;
        let (prefix, capture, suffix) = (&inner[..open], &inner[open + 1..close], &inner[close + 1..]);
        if prefix.is_empty() {
            return Err(format!("${{{inner}}}: a capture needs a literal prefix").into());
        }
        if !valid(prefix) || !valid(capture) || !(suffix.is_empty() || valid(suffix)) {
            return Err(format!("${{{inner}}}: bad variable name").into());
        }
        return Ok(Part::Captured { prefix: prefix.into(), capture: capture.into(), suffix: suffix.into() });
    }
    let names: Vec<String> = inner.split('|').map(str::to_string).collect();
    if !names.iter().all(|n| valid(n)) {
        return Err(format!("${{{inner}}}: bad variable name").into());
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
    /// `value_keyring`: read again from the OS keyring every `KEYRING_RECHECK`.
    Keyring(Arc<KeyringSecret>),
}

impl SecretValue {
    /// The value for a request; `None` when it cannot be had (the request gets 502).
    pub fn get(&self, captures: &[(String, String)]) -> Option<Secret> {
        match self {
            SecretValue::Static(s) => Some(s.clone()),
            SecretValue::Dynamic { template, vars } => template.render_dynamic(vars, captures),
            SecretValue::File(f) => f.get(),
            SecretValue::Command(c) => c.get(),
            SecretValue::Keyring(k) => k.state.current(KEYRING_RECHECK),
        }
    }

    /// True when the value never changes, so what is built from it can be built once.
    pub fn is_fixed(&self) -> bool {
        matches!(self, SecretValue::Static(_))
    }

    /// Add every value this source may have put on the wire to `out` (for redaction
    /// and leak checks): for refreshed sources, the last good one even when it is due.
    pub fn add_to(&self, out: &mut Vec<Secret>) {
        match self {
            SecretValue::Static(s) => out.push(s.clone()),
            SecretValue::Dynamic { vars, .. } => out.extend(vars.values().cloned()),
            SecretValue::File(f) => out.extend(f.state.last_good()),
            SecretValue::Command(c) => out.extend(c.state.last_good()),
            SecretValue::Keyring(k) => out.extend(k.state.last_good()),
        }
    }

    /// Bring a refreshed source up to date before [`Self::get`] (a `stat` or a command
    /// on the blocking pool, when due). Never blocks the calling runtime thread.
    pub async fn ensure(&self) {
        match self {
            SecretValue::File(f) => f.ensure().await,
            SecretValue::Command(c) => c.ensure().await,
            SecretValue::Keyring(k) => k.ensure().await,
            SecretValue::Static(_) | SecretValue::Dynamic { .. } => {}
        }
    }
}

/// How far ahead of its deadline a cached value is refreshed, so that the request that
/// refreshed it still finds it valid when the injector reads it a moment later.
fn refresh_margin(life: Duration) -> Duration {
    (life / 10).min(Duration::from_secs(1))
}

/// A cached value and when it was obtained. `None` after a failed read or run: the
/// credential's requests get 502 until the next attempt succeeds.
#[derive(Debug)]
struct Cached {
    at: Instant,
    value: Option<Secret>,
    /// The last value that was ever good, for redaction (rotated values stay masked).
    last_good: Option<Secret>,
}

impl Cached {
    fn new(value: Option<Secret>) -> Self {
        Cached { at: Instant::now(), last_good: value.clone(), value }
    }

    fn store(&mut self, value: Option<Secret>) {
        if value.is_some() {
            self.last_good = value.clone();
        }
        *self = Cached { at: Instant::now(), value, last_good: self.last_good.take() };
    }
}

/// The shared part of a refreshed source: a cache that the hot path only reads (a short
/// std mutex, never held across I/O), and an async lock so that one refresh runs at a
/// time while other requests wait for it without blocking a runtime thread.
#[derive(Debug)]
struct Refreshed {
    cache: Mutex<Cached>,
    refreshing: Arc<tokio::sync::Mutex<()>>,
}

impl Refreshed {
    fn new(value: Option<Secret>) -> Self {
        Refreshed { cache: Mutex::new(Cached::new(value)), refreshing: Default::default() }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cached> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached value while younger than `life`: no system call, no waiting.
    fn current(&self, life: Duration) -> Option<Secret> {
        let c = self.cache();
        if c.at.elapsed() < life { c.value.clone() } else { None }
    }

    fn due(&self, life: Duration) -> bool {
        self.cache().at.elapsed() + refresh_margin(life) >= life
    }

    /// Run `work` (blocking: a command, a `stat`) on tokio's blocking pool when the cache
    /// is due. One run at a time; a caller that goes away does not cancel it. `work` is
    /// told whether a value is cached, and returns the new value, or `None` to keep it.
    async fn refresh<F>(self: &Arc<Self>, life: Duration, work: F)
    where
        F: FnOnce(bool) -> Option<Option<Secret>> + Send + 'static,
    {
        if self.due(life) {
            // Boxed: the wait for the lock and the task, rare, would otherwise size the
            // future of every request of the credential.
            Box::pin(self.refresh_due(life, work)).await;
        }
    }

    /// [`Self::refresh`] once due: the cache is looked at again under the lock, since
    /// the refresh a caller waited for may have made it current.
    async fn refresh_due<F>(self: &Arc<Self>, life: Duration, work: F)
    where
        F: FnOnce(bool) -> Option<Option<Secret>> + Send + 'static,
    {
        let guard = self.refreshing.clone().lock_owned().await;
        if !self.due(life) {
            return;
        }
        let me = self.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _one_at_a_time = guard;
            let has_value = me.cache().value.is_some();
            let fresh = work(has_value);
            let mut c = me.cache();
            match fresh {
                Some(v) => c.store(v),
                // Unchanged: only the time of the check moves.
                None => c.at = Instant::now(),
            }
        });
        let _ = task.await;
    }

    fn last_good(&self) -> Option<Secret> {
        self.cache().last_good.clone()
    }
}

/// A command's output, used for `ttl` and then produced again by running the command.
/// The request that finds it due starts the run on the blocking pool (other requests
/// wait asynchronously); a failing command leaves no value, so requests get 502 instead
/// of a stale secret.
#[derive(Debug)]
pub struct CommandSecret {
    spec: Arc<CommandSpec>,
    env: Arc<Vec<(String, Secret)>>,
    ttl: Duration,
    state: Arc<Refreshed>,
}

impl CommandSecret {
    /// The output while younger than the TTL; never runs the command.
    pub fn get(&self) -> Option<Secret> {
        self.state.current(self.ttl)
    }

    /// Run the command again if its output is (nearly) due. Off the runtime threads.
    pub async fn ensure(&self) {
        let (spec, env) = (self.spec.clone(), self.env.clone());
        self.state
            .refresh(self.ttl, move |_| match run_command(&spec, &env) {
                Resolved::Ready(SecretValue::Static(s)) => Some(Some(s)),
                _ => Some(None),
            })
            .await
    }
}

/// How long a keyring read is trusted: a locked keyring or a removed entry takes
/// effect within this time, without a D-Bus round trip on every request.
pub const KEYRING_RECHECK: Duration = Duration::from_secs(2);

/// A keyring read that hangs (a keyring waiting on an unlock prompt nobody answers)
/// counts as failed after this long.
const KEYRING_TIMEOUT: Duration = Duration::from_secs(10);

/// A secret in the OS keyring (Secret Service on Linux, Keychain on macOS), re-read
/// every `KEYRING_RECHECK`; a failed read (locked keyring, D-Bus gone, entry removed)
/// leaves no value, so requests get 502 instead of a stale secret.
#[derive(Debug)]
pub struct KeyringSecret {
    service: String,
    account: String,
    state: Arc<Refreshed>,
}

impl KeyringSecret {
    pub async fn ensure(&self) {
        let (service, account) = (self.service.clone(), self.account.clone());
        self.state
            .refresh(KEYRING_RECHECK, move |_| match read_keyring(&service, &account) {
                Resolved::Ready(SecretValue::Static(s)) => Some(Some(s)),
                Resolved::Missing(why) | Resolved::Failed(why) => {
                    // The request only says the credential cannot be used; the cause is here.
                    tracing::warn!("{why}: requests that need it get 502 until it can be read");
                    Some(None)
                }
                _ => Some(None),
            })
            .await
    }
}

/// One read of `service`/`account` (blocking, on its own thread so that a keyring
/// that never answers cannot hold the caller past `KEYRING_TIMEOUT`).
fn read_keyring(service: &str, account: &str) -> Resolved {
    let name = format!("keyring entry {service}/{account}");
    let (tx, rx) = std::sync::mpsc::channel();
    let (svc, acct) = (service.to_string(), account.to_string());
    std::thread::spawn(move || {
        let read = keyring::Entry::new(&svc, &acct).and_then(|e| e.get_password()).map(Secret::new);
        let _ = tx.send(read);
    });
    match rx.recv_timeout(KEYRING_TIMEOUT) {
        Ok(Ok(secret)) => Resolved::Ready(SecretValue::Static(secret)),
        Ok(Err(keyring::Error::NoEntry)) => Resolved::Missing(format!("no {name}")),
        Ok(Err(e)) => Resolved::Failed(format!("{name}: {}", keyring_error(&e))),
        Err(_) => Resolved::Failed(format!(
            "{name}: the keyring did not answer within {} s",
            KEYRING_TIMEOUT.as_secs()
        )),
    }
}

/// A keyring error in words, never the entry's value.
fn keyring_error(e: &keyring::Error) -> String {
    match e {
        keyring::Error::NoStorageAccess(inner) => format!("the keyring cannot be used (locked?): {inner}"),
        keyring::Error::PlatformFailure(inner) => format!("the keyring failed: {inner}"),
        keyring::Error::BadEncoding(_) => "the value is not UTF-8".into(),
        other => other.to_string(),
    }
}

/// `value_keyring = "SERVICE/ACCOUNT"` read now: missing entry = inactive, any other
/// failure = failed.
fn open_keyring(service: &str, account: &str) -> Resolved {
    match read_keyring(service, account) {
        Resolved::Ready(SecretValue::Static(secret)) => {
            let k = KeyringSecret {
                service: service.to_string(),
                account: account.to_string(),
                state: Arc::new(Refreshed::new(Some(secret))),
            };
            Resolved::Ready(SecretValue::Keyring(Arc::new(k)))
        }
        other => other,
    }
}

/// How long a `value_file` check is trusted: a rotated, removed or unreadable file
/// takes effect within this time, without a `stat` on every request.
pub const FILE_RECHECK: Duration = Duration::from_secs(1);

/// A secret file, re-read when its identity (inode, size, mtime) changes. Editors and
/// Kubernetes replace files by rename, which changes the inode.
#[derive(Debug)]
pub struct WatchedFile {
    path: PathBuf,
    stamp: Arc<Mutex<Option<FileStamp>>>,
    state: Arc<Refreshed>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    /// chmod and chown change only this: a file made unreadable is read (and fails) again.
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

impl WatchedFile {
    /// The value as of the last check, when that check is recent (see `FILE_RECHECK`).
    /// No system call: the check itself happens in [`Self::ensure`].
    pub fn get(&self) -> Option<Secret> {
        self.state.current(FILE_RECHECK)
    }

    /// Check the file (one `stat`, a read only when it changed) on the blocking pool,
    /// when the last check is (nearly) stale. A file that disappears, turns unreadable
    /// or becomes writable by others leaves no value.
    pub async fn ensure(&self) {
        let (path, stamp) = (self.path.clone(), self.stamp.clone());
        self.state
            .refresh(FILE_RECHECK, move |has_value| {
                let now = std::fs::metadata(&path).ok().map(|m| FileStamp::of(&m));
                let mut known = stamp.lock().unwrap_or_else(|p| p.into_inner());
                if now.is_some() && *known == now && has_value {
                    return None;
                }
                *known = now;
                Some(match now {
                    None => None,
                    Some(_) => match read_file_once(&path) {
                        Resolved::Ready(SecretValue::Static(s)) => Some(s),
                        _ => None,
                    },
                })
            })
            .await
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
    Command(CommandSpec),
    /// `sealed = "lks1:..."`, opened with `seal.key` in `key_dir` (the CA directory).
    Sealed {
        sealed: Box<crate::seal::Sealed>,
        key_dir: PathBuf,
    },
    /// `value_keyring = "SERVICE/ACCOUNT"`.
    Keyring {
        service: String,
        account: String,
    },
}

/// `value_command`: argv, how long its output is used (None: for ever), and the names
/// of the variables of latchkey's environment it is given besides the minimal ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandSpec {
    pub argv: Vec<String>,
    pub ttl: Option<Duration>,
    /// `value_command_env`.
    pub env: Vec<String>,
}

/// What every `value_command` child gets from latchkey's environment: enough to find
/// programs and config and to print text, and never a secret latchkey holds.
pub const COMMAND_BASE_ENV: &[&str] = &["PATH", "HOME", "LANG"];

/// A command that has not finished by then is killed (with its process group) and
/// counts as failed: a hung secret helper never hangs the credential's requests.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

impl CommandSpec {
    /// The child's whole environment, read from `env` now.
    fn child_env(&self, env: &dyn Fn(&str) -> Option<String>) -> Vec<(String, Secret)> {
        COMMAND_BASE_ENV
            .iter()
            .map(|s| s.to_string())
            .chain(self.env.iter().cloned())
            .filter_map(|name| env(&name).map(|v| (name, Secret::new(v))))
            .collect()
    }
}

impl Source {
    pub fn resolve(&self, env: &dyn Fn(&str) -> Option<String>, all_vars: &[String]) -> Resolved {
        match self {
            Source::Value(t) => t.resolve(env, all_vars),
            Source::File(path) => read_file(path),
            Source::Command(spec) => {
                let child_env = spec.child_env(env);
                match (run_command(spec, &child_env), spec.ttl) {
                    (Resolved::Ready(SecretValue::Static(secret)), Some(ttl)) => {
                        let cmd = CommandSecret {
                            spec: Arc::new(spec.clone()),
                            env: Arc::new(child_env),
                            ttl,
                            state: Arc::new(Refreshed::new(Some(secret))),
                        };
                        Resolved::Ready(SecretValue::Command(Arc::new(cmd)))
                    }
                    (other, _) => other,
                }
            }
            Source::Sealed { sealed, key_dir } => open_sealed(sealed, key_dir),
            Source::Keyring { service, account } => open_keyring(service, account),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Value(t) if t.is_inline() => "inline value".into(),
            Source::Value(t) => format!("env {}", t.variables().join(", ")),
            Source::File(p) => format!("file {}", p.display()),
            Source::Command(spec) => {
                format!("command {}", spec.argv.first().map(String::as_str).unwrap_or(""))
            }
            Source::Sealed { sealed, .. } => format!("sealed for {}", sealed.hosts.join(", ")),
            Source::Keyring { service, account } => format!("keyring {service}/{account}"),
        }
    }
}

/// A sealed value: missing while this latchkey has no `seal.key` (the credential is
/// inactive), failed when the key is unusable or does not open it.
fn open_sealed(sealed: &crate::seal::Sealed, key_dir: &Path) -> Resolved {
    use crate::token::keys::{SEAL_KEY, read_key};
    match read_key(key_dir, SEAL_KEY) {
        Ok(None) => Resolved::Missing(format!("no {SEAL_KEY} in {}", key_dir.display())),
        Err(why) => Resolved::Failed(why),
        Ok(Some(text)) => match crate::seal::SealKey::from_text(&text).and_then(|k| sealed.open(&k)) {
            Ok(secret) => Resolved::Ready(SecretValue::Static(secret)),
            Err(why) => Resolved::Failed(format!("sealed value {why}")),
        },
    }
}

fn read_file(path: &Path) -> Resolved {
    let stamp = std::fs::metadata(path).ok().map(|m| FileStamp::of(&m));
    match read_file_once(path) {
        Resolved::Ready(SecretValue::Static(secret)) => {
            let file = WatchedFile {
                path: path.to_path_buf(),
                stamp: Arc::new(Mutex::new(stamp)),
                state: Arc::new(Refreshed::new(Some(secret))),
            };
            Resolved::Ready(SecretValue::File(Arc::new(file)))
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
    if let Err(why) = owner_only_writable(&meta) {
        return Resolved::Failed(format!("{} {why}", path.display()));
    }
    match std::fs::read_to_string(path) {
        Ok(s) => trimmed(s),
        Err(e) => Resolved::Failed(format!("{}: {e}", path.display())),
    }
}

/// Run a `value_command` with exactly `env` as its environment (blocking; callers on
/// the runtime use the blocking pool). Its stdout, trimmed, is the secret.
fn run_command(spec: &CommandSpec, env: &[(String, Secret)]) -> Resolved {
    run_command_within(spec, env, COMMAND_TIMEOUT)
}

fn run_command_within(spec: &CommandSpec, env: &[(String, Secret)], timeout: Duration) -> Resolved {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let Some((prog, args)) = spec.argv.split_first() else {
        return Resolved::Failed("value_command is empty".into());
    };
    let mut cmd = Command::new(prog);
    cmd.args(args).env_clear().stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v.expose());
    }
    // Its own process group, so a timeout also kills whatever it started.
    cmd.process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Resolved::Failed(format!("{prog}: {e}")),
    };
    let mut stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Zeroizing::new(Vec::new());
        let read = stdout.read_to_end(&mut out).map(|_| out);
        let _ = tx.send(read);
    });
    let output = rx.recv_timeout(timeout);
    if output.is_err() {
        // SAFETY: kill(2) on the child's process group; the child is not reaped yet.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
        return Resolved::Failed(format!("{prog} did not finish within {} ms", timeout.as_millis()));
    }
    let status = match child.wait() {
        Ok(s) => s,
        Err(e) => return Resolved::Failed(format!("{prog}: {e}")),
    };
    match output {
        Ok(Ok(_)) if !status.success() => Resolved::Failed(format!("{prog} exited with {status}")),
        Ok(Ok(out)) => match std::str::from_utf8(&out) {
            Ok(s) => trimmed(s.to_string()),
            Err(_) => Resolved::Failed(format!("{prog} printed non-UTF-8 output")),
        },
        _ => Resolved::Failed(format!("{prog}: cannot read its output")),
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
                Ok(m) => owner_only_writable(&m)
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

/// Why latchkey will not trust a file (its config, a secret file, the CA key): someone
/// else could write it. Reads as the end of a sentence that names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    #[error("is owned by uid {0}, not by this user")]
    Owner(u32),
    #[error("is writable by other users (mode {0:o}); run chmod go-w on it")]
    Writable(u32),
}

/// Ok when the file is owned by us (or root) and not writable by group or others.
pub fn owner_only_writable(meta: &std::fs::Metadata) -> Result<(), Untrusted> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid && meta.uid() != 0 {
        return Err(Untrusted::Owner(meta.uid()));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(Untrusted::Writable(meta.permissions().mode() & 0o777));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cloned_secret_is_the_same_bytes_not_a_copy() {
        let a = Secret::new("sk-live-0123456789".into());
        let b = a.clone();
        assert_eq!(a.expose().as_ptr(), b.expose().as_ptr(), "a clone must not copy the secret");
        assert_eq!(a, b);
        assert_ne!(a, Secret::new("sk-live-other".into()));
        assert_eq!(a, Secret::new("sk-live-0123456789".into()), "equal by value, not by address");
    }

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

    fn command(argv: &[&str], ttl: Option<u64>, env: &[&str]) -> Source {
        Source::Command(CommandSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ttl: ttl.map(Duration::from_secs),
            env: env.iter().map(|s| s.to_string()).collect(),
        })
    }

    #[test]
    fn commands() {
        let ok = command(&["echo", "tok"], None, &[]);
        assert_eq!(ready(ok.resolve(&env, &[])).get(&[]).unwrap().expose(), "tok");
        assert!(matches!(command(&["false"], None, &[]).resolve(&env, &[]), Resolved::Failed(_)));
        assert!(matches!(
            Source::File("/nonexistent/latchkey".into()).resolve(&env, &[]),
            Resolved::Missing(_)
        ));
    }

    /// The child sees PATH, HOME, LANG and what value_command_env names: nothing else.
    #[test]
    fn command_children_get_a_minimal_environment() {
        let full = |name: &str| match name {
            "PATH" => Some("/usr/bin:/bin".to_string()),
            "HOME" => Some("/home/me".into()),
            "VAULT_ADDR" => Some("https://vault".into()),
            "A" => Some("secret-a".into()),
            _ => None,
        };
        let src = command(&["sh", "-c", "env | sort | tr '\\n' ' '"], None, &["VAULT_ADDR"]);
        let out = ready(src.resolve(&full, &[])).get(&[]).unwrap();
        let vars: Vec<&str> = out
            .expose()
            .split_whitespace()
            .map(|kv| kv.split('=').next().unwrap())
            .filter(|k| !["PWD", "SHLVL", "_"].contains(k))
            .collect();
        assert_eq!(vars, ["HOME", "PATH", "VAULT_ADDR"], "{}", out.expose());
        assert!(!out.expose().contains("secret-a"));
    }

    #[test]
    fn a_hung_command_is_killed() {
        let spec = CommandSpec { argv: vec!["sleep".into(), "60".into()], ttl: None, env: vec![] };
        let started = Instant::now();
        // A short timeout for the test: the same code path as COMMAND_TIMEOUT.
        let r = run_command_within(&spec, &[], Duration::from_millis(200));
        assert!(matches!(r, Resolved::Failed(ref why) if why.contains("did not finish")), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    fn age(state: &Refreshed, by: Duration) {
        let mut c = state.cache();
        c.at = c.at.checked_sub(by).unwrap();
    }

    /// The hot path reads the cache only: a file removed after the last check is not
    /// noticed by `get` (no stat), and is by the next `ensure` once the check is due.
    #[tokio::test]
    async fn file_checks_happen_in_ensure_not_in_get() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tok");
        std::fs::write(&path, "v1\n").unwrap();
        let SecretValue::File(f) = ready(Source::File(path.clone()).resolve(&env, &[])) else { panic!() };
        std::fs::remove_file(&path).unwrap();
        assert_eq!(f.get().unwrap().expose(), "v1", "get makes no system call");
        f.ensure().await;
        assert_eq!(f.get().unwrap().expose(), "v1", "the last check is recent: not due");
        age(&f.state, FILE_RECHECK);
        assert!(f.get().is_none(), "a check older than FILE_RECHECK is never trusted");
        f.ensure().await;
        assert!(f.get().is_none(), "removed: no value (502), never the stale one");
        let mut masked = Vec::new();
        SecretValue::File(f.clone()).add_to(&mut masked);
        assert_eq!(masked[0].expose(), "v1", "still masked");
        std::fs::write(&path, "v2\n").unwrap();
        age(&f.state, FILE_RECHECK);
        f.ensure().await;
        assert_eq!(f.get().unwrap().expose(), "v2");
    }

    /// Many requests find the output due at once: the command runs once, on the
    /// blocking pool, and every one of them gets the new value.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_command_run_for_many_waiters() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("runs");
        let script = format!("echo run >> {}; sleep 0.3; echo tok", log.display());
        let src = command(&["sh", "-c", &script], Some(60), &[]);
        let SecretValue::Command(c) = ready(src.resolve(&env, &[])) else { panic!() };
        age(&c.state, Duration::from_secs(60));
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move {
                    c.ensure().await;
                    c.get().map(|s| s.expose().to_string())
                })
            })
            .collect();
        for w in waiters {
            assert_eq!(w.await.unwrap().as_deref(), Some("tok"));
        }
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 2, "load + one refresh");
    }
}
