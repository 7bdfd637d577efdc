//! The request log (SPEC section 7): one JSON line per request when `log_requests`.
//! Records carry names and paths, never values or query strings.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

use super::record::Record;

/// A handle to the log writer thread; cheap to clone, a no-op when logging is off.
#[derive(Clone, Debug, Default)]
pub struct Audit {
    tx: Option<Sender<Entry>>,
    health: Arc<Health>,
}

/// What the writer thread receives: a line, or a request to say when every line sent
/// before it is written and synced (shutdown: a replica stopped mid-load keeps every
/// line of the requests it completed).
#[derive(Debug)]
enum Entry {
    Line(String),
    Flushed(std::sync::mpsc::SyncSender<()>),
}

impl Audit {
    pub fn off() -> Self {
        Audit::default()
    }

    /// Open `path` for appending (0600, parent created) and write from a thread, so a
    /// slow disk never stalls the proxy's workers. Lines are hash-chained: each ends with
    /// `"prev"`, the SHA-256 of the line before it (the first line of a file: a random
    /// nonce), so an edited or removed line breaks the chain (`latchkey audit verify`).
    /// A write that fails (disk full) or a file that was removed is retried until it
    /// succeeds, the lines held meanwhile; `on_error` says whether requests are refused
    /// until then.
    pub fn open(path: &Path, hmac_key: Option<Vec<u8>>, on_error: OnLogError) -> std::io::Result<Self> {
        let (file, prev) = Writer::open(path)?;
        let key = hmac_key.map(|k| aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &k));
        let health =
            Arc::new(Health { failing: AtomicBool::new(false), block: on_error == OnLogError::Block });
        let writer =
            Writer { path: path.to_path_buf(), file, prev, key, backlog: VecDeque::new(), dropped: 0 };
        let (tx, rx) = channel::<Entry>();
        let shared = health.clone();
        std::thread::Builder::new().name("latchkey-audit".into()).spawn(move || writer.run(rx, shared))?;
        Ok(Audit { tx: Some(tx), health })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// The log is required (`on_log_error = "block"`) and cannot be written now.
    pub fn refusing(&self) -> bool {
        self.health.block && self.health.failing.load(Ordering::Relaxed)
    }

    pub fn log(&self, record: &Record) {
        if let Some(tx) = &self.tx {
            let mut line = Vec::with_capacity(512);
            record.write_json(&mut line);
            // JSON of UTF-8 text, escaped or copied whole: valid UTF-8 by construction.
            if let Ok(line) = String::from_utf8(line) {
                let _ = tx.send(Entry::Line(line));
            }
        }
    }

    /// Wait (up to `limit`) until every line logged so far is written and synced.
    pub fn flush(&self, limit: std::time::Duration) -> bool {
        let Some(tx) = &self.tx else { return true };
        let (done, written) = std::sync::mpsc::sync_channel(1);
        tx.send(Entry::Flushed(done)).is_ok() && written.recv_timeout(limit).is_ok()
    }
}

/// What latchkey does with requests while the request log cannot be written
/// (`[proxy.logging] on_log_error`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnLogError {
    /// Refuse every request (503 `log-unavailable`) until the log is written again:
    /// nothing is served unlogged when the log is required.
    #[default]
    Block,
    /// Keep serving; the lines wait in memory (up to `MAX_BACKLOG`) for the log to recover.
    Continue,
}

/// Lines held while the log cannot be written; beyond this the oldest are dropped (and
/// said so on stderr). In `block` mode no new request is admitted meanwhile, so only the
/// exchanges already in flight can add to it.
const MAX_BACKLOG: usize = 100_000;
/// How often a failing log is tried again, and a healthy one checked for removal.
const RETRY: Duration = Duration::from_millis(250);
const CHECK: Duration = Duration::from_secs(1);

/// Whether the log is being written; shared by the writer thread and the request path.
#[derive(Debug, Default)]
struct Health {
    failing: AtomicBool,
    block: bool,
}

/// The writer thread's side: the file, the chain, the lines not yet written.
struct Writer {
    path: PathBuf,
    file: std::fs::File,
    prev: String,
    key: Option<aws_lc_rs::hmac::Key>,
    backlog: VecDeque<String>,
    dropped: u64,
}

impl Writer {
    fn open(path: &Path) -> std::io::Result<(std::fs::File, String)> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let Anchor(prev) = chain_tail(path)?;
        let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        Ok((file, prev))
    }

    fn run(mut self, rx: Receiver<Entry>, health: Arc<Health>) {
        loop {
            let wait = if self.backlog.is_empty() { CHECK } else { RETRY };
            match rx.recv_timeout(wait) {
                Ok(entry) => self.take(entry),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.flush();
                    return;
                }
            }
            while let Ok(entry) = rx.try_recv() {
                self.take(entry);
            }
            let result = self.flush();
            let was = health.failing.swap(result.is_err(), Ordering::Relaxed);
            match (was, result) {
                (false, Err(e)) => tracing::error!(
                    "request log {} cannot be written: {e}; {}",
                    self.path.display(),
                    if health.block {
                        "refusing requests until it can"
                    } else {
                        "holding its lines in memory"
                    }
                ),
                (true, Ok(())) => tracing::warn!("request log {} is written again", self.path.display()),
                _ => {}
            }
        }
    }

    fn take(&mut self, entry: Entry) {
        match entry {
            Entry::Line(record) => self.hold(record),
            // Answered only once what came before is on disk; a log that cannot be
            // written leaves the caller to its time limit.
            Entry::Flushed(done) => {
                if self.flush().is_ok() && self.file.sync_data().is_ok() {
                    let _ = done.send(());
                }
            }
        }
    }

    fn hold(&mut self, record: String) {
        if self.backlog.len() >= MAX_BACKLOG {
            self.backlog.pop_front();
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                tracing::error!("request log: {} lines dropped while it could not be written", self.dropped);
            }
        }
        self.backlog.push_back(record);
    }

    /// Write every held line, in order. A removed file is created again (its chain
    /// starts afresh); a failed write is cut back off the file (no half line) and its
    /// line stays held.
    fn flush(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let meta = self.file.metadata()?;
        if meta.nlink() == 0 {
            (self.file, self.prev) = Writer::open(&self.path)?;
        }
        let mut len = self.file.metadata()?.len();
        while let Some(record) = self.backlog.front() {
            let mut line = chain(record, &self.prev);
            if let Some(key) = &self.key {
                line = sign(&line, key);
            }
            let hash = hash_hex(line.as_bytes());
            line.push('\n');
            if let Err(e) = self.file.write_all(line.as_bytes()) {
                let _ = self.file.set_len(len);
                return Err(e);
            }
            len += line.len() as u64;
            self.prev = hash;
            self.backlog.pop_front();
        }
        Ok(())
    }
}

/// Append `"prev"` to a one-object JSON line.
fn chain(record: &str, prev: &str) -> String {
    let body = record.strip_suffix('}').unwrap_or(record);
    format!("{body},\"prev\":\"{prev}\"}}")
}

/// Append `"hmac"`: HMAC-SHA256 of the line so far under a key the agent cannot read.
/// Without the key, a rewritten log can be re-chained but not re-signed.
fn sign(line: &str, key: &aws_lc_rs::hmac::Key) -> String {
    let tag = aws_lc_rs::hmac::sign(key, line.as_bytes());
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let body = line.strip_suffix('}').unwrap_or(line);
    format!("{body},\"hmac\":\"{hex}\"}}")
}

/// Check a signed line's `"hmac"`; `Err` says why it fails.
fn check_hmac(line: &str, v: &serde_json::Value, key: &aws_lc_rs::hmac::Key) -> Result<(), &'static str> {
    let tag = v["hmac"].as_str().ok_or("no \"hmac\" (line not signed)")?;
    let suffix = format!(",\"hmac\":\"{tag}\"}}");
    let unsigned = line.strip_suffix(&suffix).ok_or("\"hmac\" is not the last key")?;
    let bytes: Option<Vec<u8>> =
        (0..tag.len()).step_by(2).map(|i| u8::from_str_radix(tag.get(i..i + 2)?, 16).ok()).collect();
    let bytes = bytes.filter(|b| b.len() == 32).ok_or("\"hmac\" is not 64 hex digits")?;
    aws_lc_rs::hmac::verify(key, format!("{unsigned}}}").as_bytes(), &bytes)
        .map_err(|_| "HMAC does not match: the line was written without the key")
}

message_error! {
    /// An HMAC key file latchkey will not use: why (names the file).
    pub KeyFileError
}

/// Read an HMAC key file: it must exist, be non-empty, and be readable by its owner only.
pub fn read_hmac_key(path: &Path) -> Result<Vec<u8>, KeyFileError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(
            format!("{}: must not be readable or writable by others (chmod 600)", path.display()).into()
        );
    }
    let key = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if key.len() < 16 {
        return Err(format!(
            "{}: use at least 16 bytes of key (e.g. head -c 32 /dev/urandom)",
            path.display()
        )
        .into());
    }
    Ok(key)
}

fn hash_hex(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a file's hash chain continues: `"prev"` of the next line written.
struct Anchor(String);

/// Where the chain of an existing file continues: the hash of its last line, or a fresh
/// random anchor for an empty or new file.
fn chain_tail(path: &Path) -> std::io::Result<Anchor> {
    let last = match std::fs::read_to_string(path) {
        Ok(text) => text.lines().rev().find(|l| !l.trim().is_empty()).map(str::to_string),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    Ok(Anchor(match last {
        Some(line) => hash_hex(line.as_bytes()),
        None => {
            let mut nonce = [0u8; 16];
            aws_lc_rs::rand::fill(&mut nonce).map_err(|_| std::io::Error::other("no randomness"))?;
            format!("nonce:{}", nonce.iter().map(|b| format!("{b:02x}")).collect::<String>())
        }
    }))
}

/// Check a log's chain. `Ok(lines)` when intact; `Err((line number, why))` at the first
/// line that breaks it.
pub fn verify(text: &str, hmac_key: Option<&[u8]>) -> Result<usize, (usize, String)> {
    let key = hmac_key.map(|k| aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, k));
    let mut expected: Option<String> = None;
    let mut count = 0;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|_| (n, "not a JSON line".to_string()))?;
        if let Some(key) = &key {
            check_hmac(line, &v, key).map_err(|why| (n, why.to_string()))?;
        }
        let prev = v["prev"].as_str().ok_or((n, "no \"prev\" (not a chained line)".to_string()))?;
        match &expected {
            None if prev.starts_with("nonce:") => {}
            None => {
                return Err((n, "the first line does not start a chain: lines before it are missing".into()));
            }
            Some(want) if prev == want => {}
            Some(_) if prev.starts_with("nonce:") => {} // a new chain (file rotated and restarted)
            Some(_) => return Err((n, "the previous line was changed or removed".into())),
        }
        expected = Some(hash_hex(line.as_bytes()));
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    #[test]
    fn chain_detects_edits_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let lines: Vec<String> = {
            let super::Anchor(mut prev) = super::chain_tail(&path).unwrap();
            (0..4)
                .map(|i| {
                    let line = super::chain(&format!("{{\"n\":{i}}}"), &prev);
                    prev = super::hash_hex(line.as_bytes());
                    line
                })
                .collect()
        };
        let text = lines.join("\n");
        assert_eq!(super::verify(&text, None), Ok(4));
        assert_eq!(super::verify(&text.replace("\"n\":2", "\"n\":7"), None).unwrap_err().0, 4);
        let without_second = [&lines[0], &lines[2], &lines[3]].map(String::as_str).join("\n");
        assert_eq!(super::verify(&without_second, None).unwrap_err().0, 2);
        let without_first = lines[1..].join("\n");
        assert_eq!(super::verify(&without_first, None).unwrap_err().0, 1);
    }

    #[test]
    fn hmac_catches_a_rechained_forgery() {
        let key_bytes = b"0123456789abcdef0123456789abcdef";
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key_bytes);
        // Signed lines, then a forger without the key rewrites line 2 and re-chains.
        let write = |records: &[&str], signer: Option<&aws_lc_rs::hmac::Key>| -> String {
            let mut prev = "nonce:00".to_string();
            let mut out = Vec::new();
            for r in records {
                let mut line = super::chain(r, &prev);
                if let Some(k) = signer {
                    line = super::sign(&line, k);
                }
                prev = super::hash_hex(line.as_bytes());
                out.push(line);
            }
            out.join("\n")
        };
        let good = write(&["{\"n\":1}", "{\"n\":2}", "{\"n\":3}"], Some(&key));
        assert_eq!(super::verify(&good, Some(key_bytes)), Ok(3));
        let wrong =
            aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, b"forger's own key, 32 bytes long!");
        let mut forged: Vec<String> = good.lines().map(str::to_string).collect();
        let rest = write(&["{\"n\":1}", "{\"n\":9}", "{\"n\":3}"], Some(&wrong));
        forged[1] = rest.lines().nth(1).unwrap().to_string();
        let forged = forged.join("\n");
        assert_eq!(super::verify(&forged, Some(key_bytes)).unwrap_err().0, 2);
        // The unkeyed chain alone cannot tell a fully re-chained forgery apart.
        let rechained = write(&["{\"n\":1}", "{\"n\":9}", "{\"n\":3}"], None);
        assert_eq!(super::verify(&rechained, None), Ok(3));
        assert_eq!(super::verify(&rechained, Some(key_bytes)).unwrap_err().0, 1);
    }
}
