//! What the running proxy holds for tokens: the root public key and the revocation
//! list (both read from the CA directory and re-read within a second of changing), and
//! a bounded LRU of tokens whose signatures are verified, keyed by the token text
//! (which carries every signature), kept until they expire. A cached token costs a
//! hash lookup and a few comparisons per request; signatures are checked once.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use biscuit_auth::PublicKey;
use lru::LruCache;

use super::{Revoked, Signed, TokenRefusal, Verified, keys};

/// Tokens kept verified at once.
pub const CACHE_SIZE: usize = 4096;

/// How often the key and the revocation list are looked at.
pub const RECHECK: Duration = Duration::from_secs(1);

/// The root key and revocation set in force.
#[derive(Debug)]
pub struct Snapshot {
    pub root: Result<Option<PublicKey>, String>,
    pub revoked: Result<Arc<Revoked>, String>,
}

/// A revocation list, or why it cannot be read.
type RevokedList = Result<Arc<Revoked>, String>;

type Stamp = Option<(u64, u64, i64, i64, i64)>;

/// Verified tokens by their text, each with the root key it was verified with.
type Cache = LruCache<Box<str>, (PublicKey, Arc<Verified>)>;

pub struct TokenState {
    dir: PathBuf,
    current: RwLock<Arc<Snapshot>>,
    stamps: Mutex<(Stamp, Stamp)>,
    /// Each entry remembers the root key it was verified with (a rotation mid-request
    /// must not leave a token verified by the old key in the cache).
    cache: Mutex<Cache>,
    /// The two revocation lists the snapshot's is the union of: the file's, and the
    /// shared one (`[cluster]`, `crate::cluster::revoked`; `None` without a cluster).
    lists: Mutex<(RevokedList, Option<RevokedList>)>,
}

impl std::fmt::Debug for TokenState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenState").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.mtime(), m.mtime_nsec(), m.ctime_nsec()))
}

impl TokenState {
    /// Read the key and list in `ca_dir` now. Never creates the key: a proxy without
    /// one refuses every token until `latchkey token ...` creates it.
    pub fn new(ca_dir: &Path) -> TokenState {
        let state = TokenState {
            dir: ca_dir.to_path_buf(),
            current: RwLock::new(Arc::new(Snapshot { root: Ok(None), revoked: Ok(Arc::default()) })),
            stamps: Mutex::new((None, None)),
            cache: Mutex::new(LruCache::new(NonZeroUsize::new(CACHE_SIZE).expect("non-zero"))),
            lists: Mutex::new((Ok(Arc::default()), None)),
        };
        state.refresh(true);
        state
    }

    /// A state with no key and no directory: every token is refused (`signature`).
    /// For callers that decide without a running proxy's key (tests, fuzzing).
    pub fn keyless() -> TokenState {
        TokenState::new(Path::new("/nonexistent/latchkey-no-token-key"))
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-read what changed on disk (blocking: a `stat` of each file, a read when it
    /// changed). A new root key empties the cache.
    pub fn refresh(&self, force: bool) {
        let key_stamp = stamp(&self.dir.join(keys::TOKEN_KEY));
        let list_stamp = stamp(&self.dir.join(keys::REVOKED));
        let (key_changed, list_changed) = {
            let mut s = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
            let changed = (force || s.0 != key_stamp, force || s.1 != list_stamp);
            *s = (key_stamp, list_stamp);
            changed
        };
        if !key_changed && !list_changed {
            return;
        }
        let old = self.snapshot();
        let root = if key_changed {
            keys::token_root(&self.dir, false).map(|k| k.map(|k| k.public()))
        } else {
            old.root.clone()
        };
        // Held until the snapshot is written: a shared list put in force meanwhile
        // (`set_shared_revoked`) is not overwritten by a stale union.
        let mut lists = self.lists.lock().unwrap_or_else(|p| p.into_inner());
        if list_changed {
            lists.0 = keys::read_revoked(&self.dir).map(Arc::new);
        }
        let revoked = union(&lists.0, lists.1.as_ref());
        if key_changed {
            match &root {
                Ok(Some(k)) => tracing::info!("token root key {k}"),
                Ok(None) => {}
                Err(e) => tracing::warn!("token key unusable, every token is refused: {e}"),
            }
            self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
        if list_changed && let Err(e) = &lists.0 {
            tracing::warn!("revocation list unreadable, every token is refused: {e}");
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Snapshot { root, revoked });
        drop(lists);
    }

    /// Put the shared revocation list (`[cluster]`) in force beside the file's, or
    /// why it is unknown (then every token is refused: fail closed).
    pub fn set_shared_revoked(&self, shared: Result<Arc<Revoked>, String>) {
        let mut lists = self.lists.lock().unwrap_or_else(|p| p.into_inner());
        if lists.1.as_ref() == Some(&shared) {
            return;
        }
        lists.1 = Some(shared);
        let revoked = union(&lists.0, lists.1.as_ref());
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        *current = Arc::new(Snapshot { root: current.root.clone(), revoked });
    }

    /// Keep the snapshot current: a task that re-reads changed files every `RECHECK`,
    /// off the runtime threads, for as long as the state lives.
    pub fn watch(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        handle.spawn(async move {
            let mut tick = tokio::time::interval(RECHECK);
            loop {
                tick.tick().await;
                let Some(state) = weak.upgrade() else { return };
                let _ = tokio::task::spawn_blocking(move || state.refresh(false)).await;
            }
        });
    }

    /// A token from a request's slot, its signatures verified against the root key in
    /// force, with the revocation list in force — the decision's input — or why not (no
    /// key, an unreadable list, a bad signature or format).
    pub fn signed(&self, text: &str) -> Result<Signed, TokenRefusal> {
        let mut snapshot = self.snapshot();
        if matches!(snapshot.root, Ok(None)) {
            // Created a moment ago (`latchkey token mint`, `exec --token-ttl`): look now
            // rather than at the next periodic check. Only tokens sent to a keyless
            // proxy come here.
            self.refresh(false);
            snapshot = self.snapshot();
        }
        let revoked = snapshot.revoked.clone().map_err(TokenRefusal::RevocationUnknown)?;
        let token = self.verified(text, &snapshot)?;
        Ok(Signed { token, revoked })
    }

    /// The token verified against the current root key: from the cache, or parsed and
    /// cached. Expired entries are dropped on the way.
    pub fn verified(&self, text: &str, snapshot: &Snapshot) -> Result<Arc<Verified>, TokenRefusal> {
        let root = match &snapshot.root {
            Ok(Some(root)) => root,
            Ok(None) => return Err(TokenRefusal::NoKey),
            Err(e) => return Err(TokenRefusal::Signature(e.clone())),
        };
        let now = super::now();
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((key, v)) = cache.get(text) {
                if key == root && v.expires.is_none_or(|t| now <= t) {
                    return Ok(v.clone());
                }
                cache.pop(text);
            }
        }
        let verified = Arc::new(super::parse(text, root)?);
        if verified.expires.is_none_or(|t| now <= t) {
            self.cache.lock().unwrap_or_else(|p| p.into_inner()).put(text.into(), (*root, verified.clone()));
        }
        Ok(verified)
    }

    /// Tokens in the cache (for tests and metrics).
    pub fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The file's list and the shared one together; unknown if either is.
fn union(
    file: &Result<Arc<Revoked>, String>,
    shared: Option<&Result<Arc<Revoked>, String>>,
) -> Result<Arc<Revoked>, String> {
    let file = file.clone()?;
    match shared {
        None => Ok(file),
        Some(Err(e)) => Err(e.clone()),
        Some(Ok(s)) if s.0.is_empty() => Ok(file),
        Some(Ok(s)) => Ok(Arc::new(Revoked(file.0.union(&s.0).cloned().collect()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{Request, Restriction, Target, keys};

    fn write_key(dir: &Path, key: &biscuit_auth::KeyPair) {
        let text = format!("{}\n", key.private().to_prefixed_string());
        crate::ca::write_atomic(&dir.join(keys::TOKEN_KEY), text.as_bytes(), 0o600).unwrap();
    }

    /// A replaced token.key invalidates every token at once, cached ones included; the
    /// revocation list is re-read when it changes; an unreadable list refuses all.
    #[test]
    fn key_rotation_and_revocation_reach_cached_tokens() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let old = biscuit_auth::KeyPair::new();
        write_key(dir, &old);
        let state = TokenState::new(dir);
        let token = crate::token::mint(&old, "api", &Restriction::default()).unwrap();
        let use_it = || {
            let signed = state.signed(&token)?;
            let req =
                Request { host: "h", port: 443, path: Some("/"), method: Some("GET"), agent: None, now: 1 };
            let target = Target { name: "api", shares_placeholder_with: &[] };
            crate::token::authorize(&signed.token, &signed.revoked, &target, &req)
        };
        assert_eq!(use_it(), Ok(()));
        assert_eq!(state.cached(), 1);
        let id = crate::token::inspect(&token).unwrap().id;
        keys::add_revoked(dir, &id, "test").unwrap();
        state.refresh(false);
        assert_eq!(use_it(), Err(TokenRefusal::Revoked(id)));
        std::fs::write(dir.join(keys::REVOKED), "not an id\n").unwrap();
        state.refresh(false);
        assert_eq!(use_it().unwrap_err().check(), "revocation", "unreadable list: fail closed");
        std::fs::remove_file(dir.join(keys::REVOKED)).unwrap();
        write_key(dir, &biscuit_auth::KeyPair::new());
        state.refresh(false);
        assert_eq!(use_it().unwrap_err().check(), "signature", "the old key's tokens are gone");
        // A request that read the old key before the rotation and cached its token after
        // the cache was emptied: the entry is the old key's, never served under the new.
        let tmp = tempfile::tempdir().unwrap();
        write_key(tmp.path(), &old);
        let state = TokenState::new(tmp.path());
        let before = state.snapshot();
        write_key(tmp.path(), &biscuit_auth::KeyPair::new());
        state.refresh(false);
        assert!(state.verified(&token, &before).is_ok(), "in flight under the old key");
        assert_eq!(state.verified(&token, &state.snapshot()).unwrap_err().check(), "signature");
    }
}
