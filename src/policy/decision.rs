//! The decision: one pure function from (who asks, where to, what request — or none
//! yet, for a tunnel —, when) to what latchkey does. Every path asks exactly this: a
//! CONNECT and a connection the jail redirected (no request head), each request on the
//! proxy port or inside an intercepted tunnel, `latchkey explain` and `/latchkey/explain`.
//! Nothing here does I/O, reads a clock or sees a secret; what changes between calls
//! (rate-limit state, the verified-token cache) stays in the runtime, which is told
//! here which budgets to check, and which hands in what a request holds in a
//! credential's slot (`InSlot`: its placeholder, or a scoped token with its signatures
//! already verified — the token's scope, revocation and expiry are checked here).

use std::borrow::Cow;
use std::time::SystemTime;

use super::scoped::{self, InSlot};
use super::{
    CredState, CredentialRule, Destination, Policy, Refusal, RefusalKind, RequestHead, except, is_trace,
};

/// What is asked.
#[derive(Clone, Copy)]
pub struct Question<'a> {
    /// The `[agents]` identity asking (index into `policy.agents`); `None` without agents.
    pub agent: Option<usize>,
    /// The destination: the CONNECT authority, the absolute-URI authority, or the name
    /// a redirected connection's address stands for — never a Host header.
    pub dest: &'a Destination,
    /// The request; `None` for a tunnel before a byte of it is read.
    pub head: Option<&'a RequestHead<'a>>,
    /// When it is asked: rules that expire (a scoped token's time checks) compare
    /// against this, never against the clock.
    pub at: SystemTime,
    /// What a person said about this destination (`on_unlisted = "ask"`): the runtime
    /// keeps the answers (approvals are state, like rate limits) and asks again with
    /// the one it holds.
    pub person: Verdict,
}

/// A person's answer about an unlisted destination, as handed in with the question.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Verdict {
    /// Nobody has said anything (yet): an unlisted host is asked about.
    #[default]
    Unasked,
    Allowed,
    Denied,
    /// Nobody answered within `ask_timeout`.
    Unanswered,
}

impl<'a> Question<'a> {
    /// A question asked now.
    pub fn now(agent: Option<usize>, dest: &'a Destination, head: Option<&'a RequestHead<'a>>) -> Self {
        Question { agent, dest, head, at: SystemTime::now(), person: Verdict::Unasked }
    }

    /// The same question, with what a person answered.
    pub fn answered(self, person: Verdict) -> Self {
        Question { person, ..self }
    }
}

/// What latchkey does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Refused: latchkey answers itself (SPEC 6) and nothing goes upstream.
    Block(Refusal),
    /// A tunnel (no head) spliced blind: no credential or filter applies to its host.
    Tunnel,
    /// A tunnel (no head) latchkey opens: each request inside is asked about on its own.
    Intercept,
    /// Forwarded without a credential, and why.
    Pass { reason: Cow<'static, str>, budgets: Budgets },
    /// Forwarded with `credential` written in (regex captures of its host pattern, for
    /// `${PREFIX{capture}}` secrets), in place of the placeholder or of `token`, the id
    /// of the scoped token that allowed it.
    Inject { credential: usize, captures: Vec<(String, String)>, budgets: Budgets, token: Option<String> },
    /// Answered by latchkey itself with `credential`'s stand-in token (a client library's
    /// token refresh against latchkey's stub credentials file); never forwarded.
    Vend { credential: usize },
    /// Unlisted, and `on_unlisted = "ask"`: hold the connection or request (nothing goes
    /// upstream) until a person answers, then ask again with the answer
    /// (`Question::person`).
    Ask,
}

/// The rate limits and token budgets a forwarded request must be admitted under (the
/// runtime keeps their state): its credential's and its agent's, when they have any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budgets {
    pub credential: Option<usize>,
    pub agent: Option<usize>,
}

impl Budgets {
    pub fn is_empty(&self) -> bool {
        self.credential.is_none() && self.agent.is_none()
    }
}

impl Policy {
    /// The decision. `in_slot(i)`: what the request holds where credential i writes
    /// (its placeholder, a scoped token — verified by the runtime — or other); asked
    /// once, for the credential that would be injected.
    pub fn decide(&self, q: &Question<'_>, in_slot: impl Fn(usize) -> InSlot) -> Decision {
        if let Some(r) = q.agent.and_then(|a| self.agents[a].destination_refusal(q.dest)) {
            return Decision::Block(r);
        }
        if let Some(r) = self.domain_refusal(q.dest) {
            return Decision::Block(r);
        }
        if self.filters.on_unlisted == super::OnUnlisted::Ask && self.unlisted(q.dest) {
            match q.person {
                Verdict::Allowed => {}
                Verdict::Unasked => return Decision::Ask,
                Verdict::Denied => return Decision::Block(not_approved(q.dest, "denied".into())),
                Verdict::Unanswered => {
                    let why = format!("no answer in {} s", self.filters.ask_timeout.as_secs());
                    return Decision::Block(not_approved(q.dest, why));
                }
            }
        }
        let Some(head) = q.head else {
            return self.tunnel(q.dest);
        };
        if let Some(credential) = self.vending(q.dest, head) {
            return Decision::Vend { credential };
        }
        self.request(q, head, in_slot)
    }

    /// A tunnel is opened when anything could apply inside it: a credential (not
    /// inactive) naming its host, a content filter, outbound scanning (`[proxy.dlp]`),
    /// a token endpoint latchkey answers, or `intercept = "all"`.
    fn tunnel(&self, dest: &Destination) -> Decision {
        let needs_intercept = self.intercept_all
            || !self.filters.content.is_empty()
            || self.dlp.enabled
            || self.credentials.iter().any(|c| {
                !matches!(c.state, CredState::Inactive(_))
                    && (super::host_rank(c, dest).is_some()
                        || c.vends.as_ref().is_some_and(|v| v.dest == *dest))
            });
        if needs_intercept { Decision::Intercept } else { Decision::Tunnel }
    }

    /// The active credential whose token endpoint this request is, if any.
    fn vending(&self, dest: &Destination, head: &RequestHead<'_>) -> Option<usize> {
        if !head.tls {
            return None;
        }
        self.credentials.iter().position(|c| {
            c.state == CredState::Active
                && c.vends
                    .as_ref()
                    .is_some_and(|v| v.dest == *dest && v.method == head.method && v.path == head.path)
        })
    }

    /// One request: content filters, the winning credential and every rule that keeps
    /// it off this request, the agent's credentials, a scoped token in its slot, then
    /// the budgets to admit it under.
    fn request(
        &self,
        q: &Question<'_>,
        head: &RequestHead<'_>,
        in_slot: impl Fn(usize) -> InSlot,
    ) -> Decision {
        if let Some(pattern) = self.head_pattern(head) {
            return Decision::Block(Refusal::new(
                RefusalKind::BlockedPattern,
                format!("request matches blocked pattern {pattern:?}"),
            ));
        }
        let agent_budget = q.agent.filter(|a| !self.agents[*a].limits.is_empty());
        let Some(index) = self.winner(q.dest, head) else {
            let reason = self.pass_reason(q.dest, head);
            return Decision::Pass { reason, budgets: Budgets { credential: None, agent: agent_budget } };
        };
        let rule = &self.credentials[index];
        if let Some(pattern) = except::excluded_by(&rule.except_paths, head.path) {
            return excepted(rule, pattern, agent_budget);
        }
        if let Some(d) = self.keeps_off(rule, q.dest, head, agent_budget) {
            return d;
        }
        let held = in_slot(index);
        if rule.require_placeholder && !held.stands_for_placeholder() {
            return Decision::Block(Refusal::new(
                RefusalKind::PlaceholderRequired,
                format!("credential {} requires its placeholder in the request", rule.name),
            ));
        }
        if let Some(r) = q.agent.and_then(|a| self.agents[a].credential_refusal(index, &rule.name)) {
            return Decision::Block(r);
        }
        if is_trace(head) {
            return Decision::Block(Refusal::new(
                RefusalKind::TraceRefused,
                "TRACE/TRACK (in any case, or as a method override) echo the request, credential included; refused on credentialed routes",
            ));
        }
        if let Some(host) = rule.never_to.iter().find(|h| **h == q.dest.host) {
            return Decision::Block(Refusal::new(
                RefusalKind::MintingEndpoint,
                format!(
                    "credential {}: {host} mints credentials; latchkey does not send its token there",
                    rule.name
                ),
            ));
        }
        let agent_name = q.agent.map(|a| self.agents[a].name.as_str());
        let token = match scoped::check(rule, agent_name, q, head, held) {
            Ok(token) => token,
            Err(r) => return Decision::Block(r),
        };
        let captures = rule
            .patterns
            .iter()
            .find(|p| p.is_regex() && self.usable(rule, p, q.dest))
            .map(|p| p.captures(&q.dest.host))
            .unwrap_or_default();
        let credential_budget = (!rule.limits.is_empty()).then_some(index);
        let budgets = Budgets { credential: credential_budget, agent: agent_budget };
        Decision::Inject { credential: index, captures, budgets, token }
    }

    /// What keeps the winning credential off this request: it failed, the request is
    /// plain HTTP (both refused), or a browser page sent it (an `Origin` the credential
    /// does not list: passed without it).
    fn keeps_off(
        &self,
        rule: &CredentialRule,
        dest: &Destination,
        head: &RequestHead<'_>,
        agent: Option<usize>,
    ) -> Option<Decision> {
        if let CredState::Failed(why) = &rule.state {
            return Some(Decision::Block(Refusal::new(
                RefusalKind::CredentialFailed,
                format!("credential {} is unavailable ({why}); fix its source", rule.name),
            )));
        }
        if !head.tls && !rule.allow_http {
            return Some(Decision::Block(Refusal::new(
                RefusalKind::PlainHttp,
                format!("credential {} is only sent over TLS; use https://{}", rule.name, dest.host),
            )));
        }
        let origin = head.headers.get(http::header::ORIGIN)?;
        let allowed = origin
            .to_str()
            .map(|o| rule.allowed_origins.iter().any(|a| a.eq_ignore_ascii_case(o)))
            .unwrap_or(false);
        (!allowed).then(|| Decision::Pass {
            reason: format!("request carries an Origin not in credential {}'s allowed_origins", rule.name)
                .into(),
            budgets: Budgets { credential: None, agent },
        })
    }
}

/// The winner's `except_paths` keep it off this path: the request passes without it,
/// or is refused when the client expects the placeholder to be replaced.
fn excepted(rule: &CredentialRule, pattern: &str, agent: Option<usize>) -> Decision {
    let why = format!("credential {} is never sent to this path (except_paths {pattern:?})", rule.name);
    if rule.require_placeholder {
        return Decision::Block(Refusal::new(
            RefusalKind::ExceptPath,
            format!("{why}; its placeholder is not replaced here"),
        ));
    }
    Decision::Pass { reason: why.into(), budgets: Budgets { credential: None, agent } }
}

/// The refusal of an unlisted host a person denied or left unanswered, written for the
/// model to relay to its user (SPEC 10).
fn not_approved(dest: &Destination, why: String) -> Refusal {
    Refusal::new(
        RefusalKind::NotApproved,
        format!(
            "{} is not allowed by the user's egress policy ({why}); ask the user to allow it with latchkey approvals or the web view",
            dest.host
        ),
    )
}
