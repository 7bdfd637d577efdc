//! The request log (SPEC section 7): one JSON line per request when `log_requests`.
//! Records carry names and paths, never values or query strings.

use std::io::Write;
use std::path::Path;
use std::sync::mpsc::{Sender, channel};

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub ts: String,
    pub client: String,
    pub agent: Option<String>,
    pub method: String,
    pub scheme: &'static str,
    pub host: String,
    pub port: u16,
    pub path: Option<String>,
    pub status: Option<u16>,
    pub decision: &'static str,
    pub reason: Option<String>,
    pub credential: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
    /// LLM token usage the response reported (`null` otherwise).
    pub usage: Option<crate::usage::Usage>,
}

/// A handle to the log writer thread; cheap to clone, a no-op when logging is off.
#[derive(Clone, Debug, Default)]
pub struct Audit {
    tx: Option<Sender<String>>,
}

impl Audit {
    pub fn off() -> Self {
        Audit { tx: None }
    }

    /// Open `path` for appending (0600, parent created) and write from a thread, so a
    /// slow disk never stalls the proxy's workers. Lines are hash-chained: each ends with
    /// `"prev"`, the SHA-256 of the line before it (the first line of a file: a random
    /// nonce), so an edited or removed line breaks the chain (`latchkey audit verify`).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut prev = chain_tail(path)?;
        let mut file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        let (tx, rx) = channel::<String>();
        std::thread::Builder::new().name("latchkey-audit".into()).spawn(move || {
            for record in rx {
                let line = chain(&record, &prev);
                prev = hash_hex(line.as_bytes());
                if let Err(e) = file.write_all(format!("{line}\n").as_bytes()) {
                    tracing::error!("request log write failed: {e}");
                }
            }
        })?;
        Ok(Audit { tx: Some(tx) })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn log(&self, record: &Record) {
        if let Some(tx) = &self.tx
            && let Ok(line) = serde_json::to_string(record)
        {
            let _ = tx.send(line);
        }
    }
}

/// Append `"prev"` to a one-object JSON line.
fn chain(record: &str, prev: &str) -> String {
    let body = record.strip_suffix('}').unwrap_or(record);
    format!("{body},\"prev\":\"{prev}\"}}")
}

fn hash_hex(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the chain of an existing file continues: the hash of its last line, or a fresh
/// random anchor for an empty or new file.
fn chain_tail(path: &Path) -> std::io::Result<String> {
    let last = match std::fs::read_to_string(path) {
        Ok(text) => text.lines().rev().find(|l| !l.trim().is_empty()).map(str::to_string),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    Ok(match last {
        Some(line) => hash_hex(line.as_bytes()),
        None => {
            let mut nonce = [0u8; 16];
            aws_lc_rs::rand::fill(&mut nonce).map_err(|_| std::io::Error::other("no randomness"))?;
            format!("nonce:{}", nonce.iter().map(|b| format!("{b:02x}")).collect::<String>())
        }
    })
}

/// Check a log's chain. `Ok(lines)` when intact; `Err((line number, why))` at the first
/// line that breaks it.
pub fn verify(text: &str) -> Result<usize, (usize, String)> {
    let mut expected: Option<String> = None;
    let mut count = 0;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|_| (n, "not a JSON line".to_string()))?;
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

/// RFC 3339 UTC with milliseconds.
pub fn now_ts() -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::now_utc().format(&fmt).unwrap_or_default()
}

/// The path of a request target without its query string.
pub fn path_only(target: &str) -> String {
    target.split(['?', '#']).next().unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn chain_detects_edits_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let lines: Vec<String> = {
            let mut prev = super::chain_tail(&path).unwrap();
            (0..4)
                .map(|i| {
                    let line = super::chain(&format!("{{\"n\":{i}}}"), &prev);
                    prev = super::hash_hex(line.as_bytes());
                    line
                })
                .collect()
        };
        let text = lines.join("\n");
        assert_eq!(super::verify(&text), Ok(4));
        assert_eq!(super::verify(&text.replace("\"n\":2", "\"n\":7")).unwrap_err().0, 4);
        let without_second = [&lines[0], &lines[2], &lines[3]].map(String::as_str).join("\n");
        assert_eq!(super::verify(&without_second).unwrap_err().0, 2);
        let without_first = lines[1..].join("\n");
        assert_eq!(super::verify(&without_first).unwrap_err().0, 1);
    }

    #[test]
    fn ts_and_path() {
        let ts = super::now_ts();
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.ends_with('Z'));
        assert_eq!(super::path_only("/v1/x?key=secret"), "/v1/x");
    }
}
