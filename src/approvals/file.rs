//! `approvals.toml`: the hosts a person allowed or denied with scope `always`, beside
//! the config file. latchkey appends to it (0600) and re-reads it when it changes, so
//! a person may also edit it (entries are `allowed_domains` patterns).

use std::io::Write;
use std::path::Path;

use serde::Deserialize;

use crate::policy::{Destination, Host, Pattern, Verdict};

const HEADER: &str = "# Hosts a person allowed or denied with scope \"always\" (latchkey approvals, the web\n\
# view, the webhook). latchkey reads this file at start and whenever it changes; `host`\n\
# is an allowed_domains pattern. Remove an entry to be asked again.\n";

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    allow: Vec<Entry>,
    #[serde(default)]
    deny: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    host: String,
    #[allow(dead_code)]
    at: Option<String>,
}

/// The standing answers the file holds.
#[derive(Debug, Default)]
pub struct Standing {
    pub allow: Vec<Pattern>,
    pub deny: Vec<Pattern>,
}

impl Standing {
    /// A deny entry wins over an allow entry for the same host.
    pub fn verdict(&self, dest: &Destination) -> Option<Verdict> {
        let hit = |ps: &[Pattern]| {
            ps.iter().any(|p| {
                p.matches_host(&dest.host).is_some() && crate::policy::default_port_ok(p.port, &[], dest.port)
            })
        };
        if hit(&self.deny) {
            Some(Verdict::Denied)
        } else if hit(&self.allow) {
            Some(Verdict::Allowed)
        } else {
            None
        }
    }
}

message_error! {
    /// `approvals.toml` could not be read: why, with the file named.
    pub FileError
}

/// Read the file; an absent file holds nothing.
pub fn read(path: &Path) -> Result<Standing, FileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Standing::default()),
        Err(e) => return Err(format!("{}: {e}", path.display()).into()),
    };
    let raw: Raw = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let patterns = |entries: Vec<Entry>| -> Result<Vec<Pattern>, FileError> {
        entries
            .into_iter()
            .map(|e| {
                Pattern::parse(&e.host)
                    .map_err(|x| format!("{}: host {:?}: {x}", path.display(), e.host).into())
            })
            .collect()
    };
    Ok(Standing { allow: patterns(raw.allow)?, deny: patterns(raw.deny)? })
}

/// The pattern written for a destination: the host alone for ports 443 and 80 (as
/// `allowed_domains` reads it), else with its port.
pub fn pattern_for(dest: &Destination) -> String {
    match &dest.host {
        Host::Domain(d) if dest.port == 443 || dest.port == 80 => d.to_string(),
        _ => dest.authority(),
    }
}

/// Append one entry (`allow` or `deny`), creating the file 0600 with its header.
pub fn append(path: &Path, table: &str, dest: &Destination, at: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let fresh = !path.exists();
    let mut f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
    let mut text = String::new();
    if fresh {
        text.push_str(HEADER);
    }
    let host = toml::Value::String(pattern_for(dest)).to_string();
    text.push_str(&format!("\n[[{table}]]\nhost = {host}\nat = \"{at}\"\n"));
    f.write_all(text.as_bytes())?;
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_entries_read_back_and_deny_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("approvals.toml");
        let api = Destination::parse_authority("api.example.com:443", None).unwrap();
        let odd = Destination::parse_authority("odd.example.com:8443", None).unwrap();
        append(&path, "allow", &api, "2026-01-01T00:00:00Z").unwrap();
        append(&path, "allow", &odd, "2026-01-01T00:00:00Z").unwrap();
        let s = read(&path).unwrap();
        assert_eq!(s.verdict(&api), Some(Verdict::Allowed));
        assert_eq!(s.verdict(&odd), Some(Verdict::Allowed));
        let other_port = Destination::parse_authority("odd.example.com:443", None).unwrap();
        assert_eq!(s.verdict(&other_port), None);
        append(&path, "deny", &api, "2026-01-01T00:00:01Z").unwrap();
        assert_eq!(read(&path).unwrap().verdict(&api), Some(Verdict::Denied));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
