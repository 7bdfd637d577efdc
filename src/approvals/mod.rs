//! Approvals (SPEC 10, `on_unlisted = "ask"`): a connection or request to an unlisted
//! host waits here until a person answers (the web view, `latchkey approvals`, the
//! webhook) or `ask_timeout` passes. The decision stays pure: the runtime asks it
//! again with the answer (`policy::Question::person`).
//!
//! What is pending and what was decided lives behind [`Store`] (`local::Local` keeps
//! it in this process and `approvals.toml`; a shared store for many replicas can take
//! its place). Waiting, timeouts, the webhook and the live view's notices are here.

pub mod file;
mod local;
pub mod webhook;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::{Destination, Verdict};
pub use local::Local;

/// How long an answer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The connections and requests waiting now (an intercepted tunnel: for its life).
    Once,
    /// This host until latchkey restarts (allow only).
    Run,
    /// Written to `approvals.toml`.
    Always,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Choice {
    Allow,
    Deny,
}

/// What is asked about: the destination, and who asks for what (shown to the person).
#[derive(Clone, Debug)]
pub struct Asking {
    pub dest: Destination,
    pub agent: Option<String>,
    pub credential: Option<String>,
    pub method: String,
    /// Without query string; `None` for a tunnel.
    pub path: Option<String>,
}

/// One pending approval, as the API, the CLI and the webhook show it (names, never a
/// value).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pending {
    pub id: String,
    pub host: String,
    pub port: u16,
    pub agent: Option<String>,
    pub credential: Option<String>,
    pub method: String,
    pub path: Option<String>,
    /// RFC 3339 UTC: when it was first asked.
    pub since: String,
    /// Connections and requests waiting on it.
    pub waiting: usize,
}

/// What the store says when a waiter joins.
pub struct Joined {
    pub id: String,
    /// True for the first waiter: the one who tells the webhook and starts the timer.
    pub opened: bool,
    pub answer: tokio::sync::watch::Receiver<Option<Verdict>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecideError {
    #[error("no pending approval {0} (answered already, or timed out)")]
    Unknown(String),
    #[error("deny has no scope \"run\"; use once or always")]
    DenyRun,
    #[error("cannot write approvals.toml: {0}")]
    File(String),
}

/// Where pending approvals and standing answers live.
pub trait Store: Send + Sync {
    /// A standing answer about `dest`: allowed for this run or always, or denied always.
    fn standing(&self, dest: &Destination) -> Option<Verdict>;
    /// Wait on the pending approval for `asking.dest`, opening one if there is none.
    fn join(&self, asking: &Asking) -> Joined;
    /// A person's answer: every waiter is released with it; `run`/`always` stand.
    fn decide(&self, id: &str, choice: Choice, scope: Scope) -> Result<Pending, DecideError>;
    /// Nobody answered in time: its waiters are released as unanswered.
    fn expire(&self, id: &str);
    fn pending(&self) -> Vec<Pending>;
}

/// The runtime's side: holds connections on the store, starts timers, tells the
/// webhook and the live view.
pub struct Approvals {
    pub store: Arc<dyn Store>,
    /// Bumped whenever the pending list changes (the live view re-reads it).
    pub changed: tokio::sync::watch::Sender<u64>,
}

impl Approvals {
    pub fn new(file: PathBuf) -> Arc<Approvals> {
        let local = Local::open(file);
        let approvals =
            Arc::new(Approvals { store: local.clone(), changed: tokio::sync::watch::Sender::new(0) });
        local.watch_file();
        approvals
    }

    /// The answer for `asking`: a standing one at once, else whatever a person says
    /// before `timeout` (after which: unanswered).
    pub async fn answer(&self, asking: Asking, timeout: Duration, webhook: Option<webhook::Hook>) -> Verdict {
        if let Some(v) = self.store.standing(&asking.dest) {
            return v;
        }
        let mut joined = self.store.join(&asking);
        self.notify();
        if joined.opened {
            tracing::info!(host = %asking.dest, id = %joined.id, "held for approval");
            self.start_timer(joined.id.clone(), timeout);
            if let Some(hook) = webhook
                && let Some(p) = self.store.pending().into_iter().find(|p| p.id == joined.id)
            {
                hook.send(self.store.clone(), p, self.changed.clone());
            }
        }
        let answered = joined.answer.wait_for(Option::is_some).await.map(|v| *v);
        let verdict = answered.ok().flatten().unwrap_or(Verdict::Unanswered);
        self.notify();
        verdict
    }

    pub fn decide(&self, id: &str, choice: Choice, scope: Scope) -> Result<Pending, DecideError> {
        let decided = self.store.decide(id, choice, scope);
        if let Ok(p) = &decided {
            tracing::info!(host = %p.host, id, ?choice, ?scope, "approval answered");
        }
        self.notify();
        decided
    }

    fn start_timer(&self, id: String, timeout: Duration) {
        let store = self.store.clone();
        let changed = self.changed.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            store.expire(&id);
            changed.send_modify(|n| *n += 1);
        });
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

/// The time now as the API shows it (RFC 3339 UTC, seconds).
pub(crate) fn now_text() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}
