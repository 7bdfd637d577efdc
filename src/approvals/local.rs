//! The approvals of this process: pending ones in memory, `run` answers until exit,
//! `always` answers in `approvals.toml` (re-read when it changes).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::file::{self, Standing};
use super::{Asking, Choice, DecideError, Joined, Pending, Scope, new_id, now_text};
use crate::policy::{Destination, Verdict};

/// How often `approvals.toml` is looked at for edits.
const RECHECK: Duration = Duration::from_secs(1);

pub struct Local {
    path: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    pending: Vec<Entry>,
    /// Allowed with scope `run`.
    run: Vec<Destination>,
    file: Standing,
    /// Modification time and length of the file as last read.
    stamp: Option<(SystemTime, u64)>,
}

struct Entry {
    dest: Destination,
    info: Pending,
    tx: watch::Sender<Option<Verdict>>,
}

impl Local {
    /// The store for `path` (`approvals.toml`), read now.
    pub fn open(path: PathBuf) -> Arc<Local> {
        let local = Arc::new(Local { path, inner: Mutex::new(Inner::default()) });
        local.reread();
        local
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-read the file if it changed since it was last read. A file that no longer
    /// parses keeps the answers read before (and says why).
    fn reread(&self) {
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        if self.lock().stamp == stamp && stamp.is_some() {
            return;
        }
        match file::read(&self.path) {
            Ok(standing) => {
                let mut inner = self.lock();
                inner.file = standing;
                inner.stamp = stamp;
                // An edit may answer what is waiting now.
                let answered: Vec<(String, Verdict)> = inner
                    .pending
                    .iter()
                    .filter_map(|e| inner.file.verdict(&e.dest).map(|v| (e.info.id.clone(), v)))
                    .collect();
                drop(inner);
                for (id, v) in answered {
                    self.release(&id, v);
                }
            }
            Err(e) => {
                tracing::warn!("approvals: {e}; keeping the answers read before");
                self.lock().stamp = stamp;
            }
        }
    }

    /// Follow edits of the file (a person removing an entry, another tool adding one).
    pub fn watch_file(self: &Arc<Self>) {
        let weak: Weak<Local> = Arc::downgrade(self);
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        handle.spawn(async move {
            let mut tick = tokio::time::interval(RECHECK);
            loop {
                tick.tick().await;
                let Some(local) = weak.upgrade() else { return };
                let _ = tokio::task::spawn_blocking(move || local.reread()).await;
            }
        });
    }

    /// Release every waiter of pending approval `id` with `verdict`; its entry.
    fn release(&self, id: &str, verdict: Verdict) -> Option<(Destination, Pending)> {
        let mut inner = self.lock();
        let at = inner.pending.iter().position(|e| e.info.id == id)?;
        let entry = inner.pending.swap_remove(at);
        entry.tx.send_replace(Some(verdict));
        Some((entry.dest, entry.info))
    }
}

impl Local {
    /// A standing answer about `dest`: allowed for this run or always, or denied always.
    pub fn standing(&self, dest: &Destination) -> Option<Verdict> {
        let inner = self.lock();
        match inner.file.verdict(dest) {
            Some(v) => Some(v),
            None => inner.run.contains(dest).then_some(Verdict::Allowed),
        }
    }

    /// Wait on the pending approval for `asking.dest`, opening one if there is none.
    pub fn join(&self, asking: &Asking) -> Joined {
        let mut inner = self.lock();
        if let Some(e) = inner.pending.iter_mut().find(|e| e.dest == asking.dest) {
            e.info.waiting += 1;
            return Joined { id: e.info.id.clone(), opened: false, answer: e.tx.subscribe() };
        }
        let id = new_id();
        let (tx, answer) = watch::channel(None);
        let info = asking.pending(id.clone(), 1);
        inner.pending.push(Entry { dest: asking.dest.clone(), info, tx });
        Joined { id, opened: true, answer }
    }

    /// A person's answer: every waiter is released with it; `run`/`always` stand.
    pub fn decide(&self, id: &str, choice: Choice, scope: Scope) -> Result<Pending, DecideError> {
        if choice == Choice::Deny && scope == Scope::Run {
            return Err(DecideError::DenyRun);
        }
        let found =
            self.lock().pending.iter().find(|e| e.info.id == id).map(|e| (e.dest.clone(), e.info.clone()));
        let Some((dest, info)) = found else { return Err(DecideError::Unknown(id.to_string())) };
        if scope == Scope::Always {
            // Written before anyone is released: a restart keeps what was answered.
            let table = if choice == Choice::Allow { "allow" } else { "deny" };
            file::append(&self.path, table, &dest, &now_text())
                .map_err(|e| DecideError::File(format!("{}: {e}", self.path.display())))?;
        }
        if choice == Choice::Allow && scope != Scope::Once {
            self.lock().run.push(dest);
        }
        let verdict = if choice == Choice::Allow { Verdict::Allowed } else { Verdict::Denied };
        // The file's watcher may have released it already, with this same answer.
        self.release(id, verdict);
        if scope == Scope::Always {
            self.reread();
        }
        Ok(info)
    }

    /// Nobody answered in time: its waiters are released as unanswered.
    pub fn expire(&self, id: &str) {
        self.release(id, Verdict::Unanswered);
    }

    pub fn pending(&self) -> Vec<Pending> {
        self.lock().pending.iter().map(|e| e.info.clone()).collect()
    }

    /// Whether `id` is pending here (held while shared state was out of reach).
    pub fn holds(&self, id: &str) -> bool {
        self.lock().pending.iter().any(|e| e.info.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asking(host: &str) -> Asking {
        Asking {
            dest: Destination::parse_authority(host, None).unwrap(),
            agent: None,
            credential: None,
            method: "CONNECT".into(),
            path: None,
        }
    }

    #[test]
    fn waiters_for_one_host_share_one_approval() {
        let dir = tempfile::tempdir().unwrap();
        let store = Local::open(dir.path().join("approvals.toml"));
        let a = store.join(&asking("a.example:443"));
        let b = store.join(&asking("a.example:443"));
        let c = store.join(&asking("c.example:443"));
        assert!(a.opened && !b.opened && c.opened);
        assert_eq!(a.id, b.id);
        assert_eq!(store.pending().len(), 2);
        store.decide(&a.id, Choice::Allow, Scope::Once).unwrap();
        assert_eq!(*b.answer.borrow(), Some(Verdict::Allowed));
        assert_eq!(store.standing(&asking("a.example:443").dest), None, "once does not stand");
        assert_eq!(store.decide(&c.id, Choice::Deny, Scope::Run), Err(DecideError::DenyRun));
        store.decide(&c.id, Choice::Deny, Scope::Always).unwrap();
        let reopened = Local::open(dir.path().join("approvals.toml"));
        assert_eq!(reopened.standing(&asking("c.example:443").dest), Some(Verdict::Denied));
    }
}
