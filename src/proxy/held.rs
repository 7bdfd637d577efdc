//! Holding a connection or request for a person's answer (`Decision::Ask`,
//! `on_unlisted = "ask"`): what is shown to them, the webhook, the timeout.

use std::sync::Arc;

use super::Proxy;
use crate::approvals::{Asking, webhook::Hook};
use crate::config::Config;
use crate::policy::{Destination, Refusal, RefusalKind, Verdict};

impl Proxy {
    /// Wait for the answer about `asking` (a standing one comes at once); nobody
    /// answering within `ask_timeout` is `Unanswered`. With `[cluster]`, Redis out of
    /// reach and `on_store_error = "closed"`: 503 `shared-state` (whether a person
    /// allowed it cannot be known, and nobody on another replica could be asked).
    pub(super) async fn held(&self, config: &Config, asking: Asking) -> Result<Verdict, Refusal> {
        let timeout = config.policy.filters.ask_timeout;
        self.approvals
            .answer(asking, timeout, self.webhook(config))
            .await
            .map_err(|e| Refusal::new(RefusalKind::SharedState, e.to_string()).retry_after(1))
    }

    /// The webhook to tell, signed with the admin token (none without one).
    fn webhook(&self, config: &Config) -> Option<Hook> {
        let url = config.admin_access.webhook.clone()?;
        let key = self.admin_token.get()?.clone();
        let tls =
            super::upstream::client_tls(self.provider.clone(), config.upstream.ca_file.as_deref(), None)
                .ok()
                .map(Arc::new);
        Some(Hook { url, key, tls })
    }
}

/// What a person is shown: names, never a value.
pub(super) fn asking(
    config: &Config,
    dest: &Destination,
    agent: Option<usize>,
    method: &str,
    path: Option<&str>,
    credential: Option<usize>,
) -> Asking {
    Asking {
        dest: dest.clone(),
        agent: agent.and_then(|a| config.agents.get(a)).map(|a| a.name.clone()),
        credential: credential.and_then(|c| config.credentials.get(c)).map(|c| c.name.clone()),
        method: method.to_string(),
        path: path.map(str::to_string),
    }
}
