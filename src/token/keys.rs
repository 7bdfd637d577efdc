//! Key files beside `ca.key`: `token.key` (Ed25519, signs tokens) and `seal.key`
//! (X25519, opens sealed secrets), both 0600, created on first use under the CA
//! directory's lock so that replicas starting together on one directory agree on one
//! key (each reads back what is on disk). And `revoked`, the revocation list.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use zeroize::Zeroizing;

use super::{ID_HEX, Revoked};
use crate::ca::{DirLock, ensure_private_dir, write_atomic};

pub const TOKEN_KEY: &str = "token.key";
pub const SEAL_KEY: &str = "seal.key";
pub const REVOKED: &str = "revoked";

/// The key file `name` in `dir`, created with `generate` when absent. The text on disk
/// is returned, so concurrent creators all use the one that won.
pub fn open_or_create(
    dir: &Path,
    name: &str,
    generate: impl FnOnce() -> Result<Zeroizing<String>, String>,
) -> Result<Zeroizing<String>, String> {
    if let Some(existing) = read_key(dir, name)? {
        return Ok(existing);
    }
    ensure_private_dir(dir).map_err(|e| e.to_string())?;
    let lock = DirLock::exclusive(dir).map_err(|e| e.to_string())?;
    if lock.is_none() {
        return Err(format!(
            "{} is read-only and holds no {name}: create it where the directory is writable",
            dir.display()
        ));
    }
    if !dir.join(name).exists() {
        let text = generate()?;
        write_atomic(&dir.join(name), text.as_bytes(), 0o600).map_err(|e| e.to_string())?;
    }
    read_key(dir, name)?.ok_or_else(|| format!("{} vanished after it was written", dir.join(name).display()))
}

/// The key file's text, `None` when absent. A key others may read or write is refused.
pub fn read_key(dir: &Path, name: &str) -> Result<Option<Zeroizing<String>>, String> {
    let path = dir.join(name);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    crate::secrets::owner_only_writable(&meta).map_err(|w| format!("{} {w}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!("{} is readable by other users; run chmod 600 on it", path.display()));
    }
    let text =
        Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?);
    Ok(Some(text))
}

/// The token root key, created when `create` and absent.
pub fn token_root(dir: &Path, create: bool) -> Result<Option<biscuit_auth::KeyPair>, String> {
    let text = if create {
        Some(open_or_create(dir, TOKEN_KEY, || {
            Ok(Zeroizing::new(format!("{}\n", biscuit_auth::KeyPair::new().private().to_prefixed_string())))
        })?)
    } else {
        read_key(dir, TOKEN_KEY)?
    };
    let Some(text) = text else { return Ok(None) };
    let private: biscuit_auth::PrivateKey = text
        .trim()
        .parse()
        .map_err(|e| format!("{}: not an Ed25519 private key ({e})", dir.join(TOKEN_KEY).display()))?;
    Ok(Some(biscuit_auth::KeyPair::from(&private)))
}

/// The revocation list: one id per line (`#` starts a comment). Absent: nothing
/// revoked. A list others could write is refused (it could be emptied).
pub fn read_revoked(dir: &Path) -> Result<Revoked, String> {
    let path = dir.join(REVOKED);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Revoked::default()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    crate::secrets::owner_only_writable(&meta).map_err(|w| format!("{} {w}", path.display()))?;
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut ids = std::collections::HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        ids.insert(normalise_id(line).map_err(|why| format!("{}:{}: {why}", path.display(), n + 1))?);
    }
    Ok(Revoked(ids))
}

/// A revocation id as written by a user or another Biscuit tool: hex, at least
/// `ID_HEX` digits (a full Biscuit revocation id is cut to that).
pub fn normalise_id(raw: &str) -> Result<String, String> {
    let id = raw.trim().to_ascii_lowercase();
    if id.len() < ID_HEX || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{raw:?} is not a token id ({ID_HEX} or more hex digits)"));
    }
    Ok(id[..ID_HEX].to_string())
}

/// Add `id` to the revocation list (under the directory's lock, written atomically).
/// False when it was already there.
pub fn add_revoked(dir: &Path, id: &str, note: &str) -> Result<bool, String> {
    ensure_private_dir(dir).map_err(|e| e.to_string())?;
    let _lock = DirLock::exclusive(dir)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{} is read-only: the revocation list cannot be written", dir.display()))?;
    if read_revoked(dir)?.contains(id) {
        return Ok(false);
    }
    let path = dir.join(REVOKED);
    let mut text = std::fs::read_to_string(&path).unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("{id}  # {note}\n"));
    write_atomic(&path, text.as_bytes(), 0o644).map_err(|e| e.to_string())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn keys_are_private_created_once_and_shared() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        assert!(token_root(&dir, false).unwrap().is_none(), "not created by a reader");
        let keys: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6)
                .map(|_| s.spawn(|| token_root(&dir, true).unwrap().unwrap().public().to_string()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]), "replicas agree on one key");
        assert_eq!(std::fs::metadata(dir.join(TOKEN_KEY)).unwrap().mode() & 0o777, 0o600);
        std::fs::set_permissions(dir.join(TOKEN_KEY), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(token_root(&dir, false).unwrap_err().contains("chmod 600"));
    }

    #[test]
    fn revocation_list() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let id = "AB".repeat(32);
        assert!(read_revoked(dir).unwrap().0.is_empty());
        assert!(add_revoked(dir, &normalise_id(&id).unwrap(), "test").unwrap());
        assert!(!add_revoked(dir, &normalise_id(&id).unwrap(), "again").unwrap());
        let r = read_revoked(dir).unwrap();
        assert!(r.contains(&"ab".repeat(16)));
        assert!(normalise_id("xyz").is_err());
        std::fs::write(dir.join(REVOKED), "not-hex\n").unwrap();
        assert!(read_revoked(dir).unwrap_err().contains(":1:"));
    }
}
