//! Scoped tokens as the decision sees them (SPEC 11, issue 17): what a request holds in
//! the winning credential's slot, and whether a token there allows this request — its
//! credential, host, port, canonical path, method, agent and time (`Question::at`),
//! against the revocation list in force. Verifying a token's signatures needs the root
//! key and a cache, so the runtime does that part (`token::state::TokenState::signed`)
//! and hands the result in; everything checked here is a function of the question.

use super::{CredentialRule, Question, Refusal, RefusalKind, RequestHead, canonical_path, override_methods};
use crate::token::{Request, Signed, Target, TokenRefusal, authorize};

/// What a request holds where a credential writes, as the runtime read it (the policy
/// never sees the value itself).
#[derive(Clone, Debug)]
pub enum InSlot {
    /// Nothing, or a value that is neither the placeholder nor a token.
    Other,
    /// The credential's placeholder (or a stand-in latchkey vended for it).
    Placeholder,
    /// Something shaped like a scoped token: its signatures verified, with the
    /// revocation list in force, or why that failed (a damaged token is still a token,
    /// refused, never forwarded as if it were no token).
    Token(Result<Signed, TokenRefusal>),
}

impl InSlot {
    /// For `require_placeholder`: a token stands where the placeholder goes.
    pub fn stands_for_placeholder(&self) -> bool {
        !matches!(self, InSlot::Other)
    }
}

/// The token check for a request the winning credential `rule` would get:
/// `Ok(Some(id))` when a token there allows it, `Ok(None)` when there is none and
/// none is required, else the `token` refusal naming the check that failed.
pub fn check(
    rule: &CredentialRule,
    agent: Option<&str>,
    q: &Question<'_>,
    head: &RequestHead<'_>,
    held: InSlot,
) -> Result<Option<String>, Refusal> {
    let signed = match held {
        InSlot::Token(Ok(signed)) => signed,
        InSlot::Token(Err(why)) => return Err(refused(None, &why)),
        InSlot::Other | InSlot::Placeholder if rule.require_token => {
            return Err(Refusal::new(
                RefusalKind::Token,
                format!(
                    "credential {} requires a scoped token in {}; mint one with `latchkey token mint --credential {}`",
                    rule.name, rule.token_slot, rule.name
                ),
            ));
        }
        InSlot::Other | InSlot::Placeholder => return Ok(None),
    };
    let host = match &q.dest.host {
        super::Host::Domain(d) => std::borrow::Cow::Borrowed(d.as_str()),
        ip => std::borrow::Cow::Owned(ip.to_string()),
    };
    let path = canonical_path(head.path);
    let req = Request {
        host: &host,
        port: q.dest.port,
        path: path.as_deref(),
        method: plain_method(head),
        agent,
        now: q.at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    };
    let target = Target { name: &rule.name, shares_placeholder_with: &rule.shares_placeholder_with };
    let id = signed.token.id();
    authorize(&signed.token, &signed.revoked, &target, &req).map_err(|why| refused(Some(id), &why))?;
    Ok(Some(id.to_string()))
}

/// The request method, unless a method override claims another one: then no `method`
/// fact at all, so a method-scoped token refuses the request (a server honouring the
/// override would run a method the token does not allow).
fn plain_method<'a>(head: &RequestHead<'a>) -> Option<&'a str> {
    override_methods(head).iter().all(|m| m == head.method).then_some(head.method)
}

fn refused(id: Option<&str>, why: &TokenRefusal) -> Refusal {
    if let TokenRefusal::RevocationUnknown(m) = why
        && m.starts_with(crate::token::SHARED_UNAVAILABLE)
    {
        // Nothing is wrong with the token: the shared revocation set is out of reach.
        return Refusal::new(RefusalKind::SharedState, m.clone()).retry_after(1);
    }
    let message = match id {
        Some(id) => format!("token {id} refused: {why}"),
        None => format!("token refused: {why}"),
    };
    Refusal::new(RefusalKind::Token, message)
}
