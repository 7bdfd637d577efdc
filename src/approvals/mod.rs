//! Approvals (SPEC 10, `on_unlisted = "ask"`): a connection or request to an unlisted
//! host waits here until a person answers (the web view, `latchkey approvals`, the
//! webhook) or `ask_timeout` passes. The decision stays pure: the runtime asks it
//! again with the answer (`policy::Question::person`).
//!
//! What is pending and what was decided lives in `local::Local` (this process and
//! `approvals.toml`) or, with `[cluster] redis`, in `crate::cluster::approvals` (Redis,
//! shared by every replica; `approvals.toml` is still read). Which one is asked, and
//! what happens when Redis does not answer (`on_store_error`), is decided here, as are
//! waiting, timeouts, the webhook and the live view's notices.

pub mod file;
mod local;
pub mod webhook;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cluster::approvals::SharedApprovals;
use crate::cluster::store::Unavailable;
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

impl Asking {
    /// A new pending approval for this ask, first asked now.
    pub fn pending(&self, id: String, waiting: usize) -> Pending {
        Pending {
            id,
            host: self.dest.host.to_string(),
            port: self.dest.port,
            agent: self.agent.clone(),
            credential: self.credential.clone(),
            method: self.method.clone(),
            path: self.path.clone(),
            since: now_text(),
            waiting,
        }
    }
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
    #[error("{0}")]
    Shared(String),
}

/// Redis holds the approvals (`[cluster]`, `on_store_error = "closed"`) and does not
/// answer: the message for the 503.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "shared state unavailable: approvals are kept in Redis at {0}, which does not answer; nothing was sent, retry shortly"
)]
pub struct SharedUnavailable(pub String);

/// The runtime's side: holds connections on the store, starts timers, tells the
/// webhook and the live view.
pub struct Approvals {
    /// This process's approvals and `approvals.toml` (with `[cluster]`: the file, and
    /// what was held while Redis was out of reach with `on_store_error = "open"`).
    local: Arc<Local>,
    /// `[cluster] redis`: pending and decided approvals shared by every replica.
    shared: Option<Arc<SharedApprovals>>,
    /// Bumped whenever the pending list changes (the live view re-reads it).
    pub changed: tokio::sync::watch::Sender<u64>,
}

impl Approvals {
    pub fn new(file: PathBuf, shared: Option<Arc<SharedApprovals>>) -> Arc<Approvals> {
        let local = Local::open(file);
        local.watch_file();
        let changed = tokio::sync::watch::Sender::new(0);
        if let Some(s) = &shared {
            s.watch(changed.clone());
        }
        Arc::new(Approvals { local, shared, changed })
    }

    /// The answer for `asking`: a standing one at once, else whatever a person says
    /// before `timeout` (after which: unanswered). Err: it would need Redis, which does
    /// not answer, and `on_store_error = "closed"`.
    pub async fn answer(
        self: &Arc<Self>,
        asking: Asking,
        timeout: Duration,
        webhook: Option<webhook::Hook>,
    ) -> Result<Verdict, SharedUnavailable> {
        // approvals.toml is honoured with or without Redis; a deny there wins.
        let file = self.local.standing(&asking.dest);
        if file == Some(Verdict::Denied) {
            return Ok(Verdict::Denied);
        }
        if let Some(shared) = &self.shared {
            match self.shared_answer(shared, &asking, file, timeout, webhook.clone()).await {
                Ok(v) => return Ok(v),
                Err(Unavailable) if file.is_some() => return Ok(file.unwrap_or_default()),
                Err(Unavailable) if !shared.fails_open() => {
                    return Err(SharedUnavailable(shared.server().to_string()));
                }
                Err(Unavailable) => tracing::warn!(
                    host = %asking.dest,
                    "approvals: shared state unavailable (Redis at {}); asking on this replica alone (on_store_error = \"open\")",
                    shared.server()
                ),
            }
        }
        if let Some(v) = file {
            return Ok(v);
        }
        Ok(self.local_answer(asking, timeout, webhook).await)
    }

    /// Held on the approval every replica sees; each waiter stops at its deadline
    /// itself, so the replica that opened it may die.
    async fn shared_answer(
        self: &Arc<Self>,
        shared: &Arc<SharedApprovals>,
        asking: &Asking,
        file: Option<Verdict>,
        timeout: Duration,
        webhook: Option<webhook::Hook>,
    ) -> Result<Verdict, Unavailable> {
        if let Some(v) = shared.standing(&asking.dest).await?.or(file) {
            return Ok(v);
        }
        let mut joined = shared.join(asking, timeout).await?;
        self.notify();
        if joined.opened {
            tracing::info!(host = %asking.dest, id = %joined.id, "held for approval (shared)");
            if let Some(hook) = webhook
                && let Ok(list) = shared.pending().await
                && let Some(p) = list.into_iter().find(|p| p.id == joined.id)
            {
                hook.send(self.clone(), p);
            }
        }
        let waited = tokio::time::timeout(joined.left, async {
            joined.answer.wait_for(Option::is_some).await.map(|v| *v).ok().flatten()
        })
        .await;
        let verdict = match waited {
            Ok(v) => v.unwrap_or(Verdict::Unanswered),
            // The deadline: unless an answer was recorded in Redis at the last moment.
            Err(_) => shared.expire(&joined.id).await,
        };
        self.notify();
        Ok(verdict)
    }

    /// Held in this process alone.
    async fn local_answer(
        self: &Arc<Self>,
        asking: Asking,
        timeout: Duration,
        webhook: Option<webhook::Hook>,
    ) -> Verdict {
        let mut joined = self.local.join(&asking);
        self.notify();
        if joined.opened {
            tracing::info!(host = %asking.dest, id = %joined.id, "held for approval");
            self.start_timer(joined.id.clone(), timeout);
            if let Some(hook) = webhook
                && let Some(p) = self.local.pending().into_iter().find(|p| p.id == joined.id)
            {
                hook.send(self.clone(), p);
            }
        }
        let answered = joined.answer.wait_for(Option::is_some).await.map(|v| *v);
        let verdict = answered.ok().flatten().unwrap_or(Verdict::Unanswered);
        self.notify();
        verdict
    }

    /// A person's (or the webhook's) answer to pending approval `id`, wherever it is held.
    pub async fn decide(&self, id: &str, choice: Choice, scope: Scope) -> Result<Pending, DecideError> {
        if choice == Choice::Deny && scope == Scope::Run {
            return Err(DecideError::DenyRun);
        }
        let decided = match &self.shared {
            Some(shared) if !self.local.holds(id) => {
                shared.decide(id, choice, scope).await.unwrap_or_else(|Unavailable| {
                    Err(DecideError::Shared(SharedUnavailable(shared.server().to_string()).to_string()))
                })
            }
            _ => self.local.decide(id, choice, scope),
        };
        if let Ok(p) = &decided {
            tracing::info!(host = %p.host, id, ?choice, ?scope, "approval answered");
        }
        self.notify();
        decided
    }

    /// What is pending: on every replica with `[cluster]` (plus what this one held
    /// alone while Redis was out of reach), else here.
    pub async fn pending(&self) -> Result<Vec<Pending>, SharedUnavailable> {
        let mut list = self.local.pending();
        if let Some(shared) = &self.shared {
            match shared.pending().await {
                Ok(all) => list.extend(all),
                Err(Unavailable) if shared.fails_open() => {}
                Err(Unavailable) => return Err(SharedUnavailable(shared.server().to_string())),
            }
        }
        Ok(list)
    }

    fn start_timer(&self, id: String, timeout: Duration) {
        let local = self.local.clone();
        let changed = self.changed.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            local.expire(&id);
            changed.send_modify(|n| *n += 1);
        });
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

/// An id a person can type: 8 hex digits, unguessable enough that a stale one never
/// answers a new request.
pub(crate) fn new_id() -> String {
    let mut b = [0u8; 4];
    let _ = aws_lc_rs::rand::fill(&mut b);
    hex::encode(b)
}

/// The time now as the API shows it (RFC 3339 UTC, seconds).
pub(crate) fn now_text() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}
