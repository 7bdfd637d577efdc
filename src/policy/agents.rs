//! `[agents.NAME]` as the policy sees them: what each client identity may reach and
//! which credentials it may use. Who a client *is* (its token) is the proxy's business
//! (`proxy::agent_auth`); what it may do is decided here.

use super::{Destination, Pattern, Refusal, RefusalKind, default_port_ok};
use crate::limits::Limits;

#[derive(Clone, Debug, Default)]
pub struct AgentRule {
    pub name: String,
    /// Credential indexes it may use; `None`: all.
    pub credentials: Option<Vec<usize>>,
    /// Its own allowlist, within the global policy (empty: what the policy allows).
    pub allowed: Vec<Pattern>,
    pub limits: Limits,
}

impl AgentRule {
    /// The agent's own allowlist, layered on the global policy.
    pub fn destination_refusal(&self, dest: &Destination) -> Option<Refusal> {
        if self.allowed.is_empty() {
            return None;
        }
        let allowed = self
            .allowed
            .iter()
            .any(|p| p.matches_host(&dest.host).is_some() && default_port_ok(p.port, &[], dest.port));
        (!allowed).then(|| {
            Refusal::new(
                RefusalKind::NotAllowlisted,
                format!("agent {} may not reach {dest} (its allowed_domains)", self.name),
            )
        })
    }

    /// May this agent use credential `index` (named `credential`)?
    pub fn credential_refusal(&self, index: usize, credential: &str) -> Option<Refusal> {
        let allowed = self.credentials.as_ref().is_none_or(|list| list.contains(&index));
        (!allowed).then(|| {
            Refusal::new(
                RefusalKind::AgentCredential,
                format!("agent {} may not use credential {credential}", self.name),
            )
        })
    }
}
