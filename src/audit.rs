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
    /// slow disk never stalls the proxy's workers.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        let (tx, rx) = channel::<String>();
        std::thread::Builder::new().name("latchkey-audit".into()).spawn(move || {
            for line in rx {
                if let Err(e) = file.write_all(line.as_bytes()) {
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
            && let Ok(mut line) = serde_json::to_string(record)
        {
            line.push('\n');
            let _ = tx.send(line);
        }
    }
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
    fn ts_and_path() {
        let ts = super::now_ts();
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.ends_with('Z'));
        assert_eq!(super::path_only("/v1/x?key=secret"), "/v1/x");
    }
}
