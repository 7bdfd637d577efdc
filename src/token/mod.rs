//! Scoped tokens (SPEC 11): Biscuit tokens signed by latchkey's Ed25519 root key, each
//! naming one credential, narrowed by checks on the request's host, port, path, method,
//! time and agent. Anyone holding a token can add a block of checks (attenuate) without
//! a key; nobody can remove one.
//!
//! `verify` is pure: (token, root public key, revocation set, the credential the policy
//! chose, the request facts) → the verified token or a typed refusal naming the check
//! that failed. It comes in two halves: `parse` (signatures, against the root key; the
//! runtime caches it in `state`) and `authorize` (revocation, credential, scope, time),
//! which the one decision (`policy::decision`) runs on every request that would get
//! the credential.

pub mod endpoint;
pub mod keys;
pub mod scope;
pub mod state;

use std::collections::HashSet;
use std::fmt;

use base64::Engine;
use biscuit_auth::builder::{BlockBuilder, Term};
use biscuit_auth::{Biscuit, KeyPair, PublicKey, UnverifiedBiscuit};

use scope::{CompiledBlock, Fact};
pub use scope::{HostRule, Request, Restriction};

/// Longest token text accepted (bytes, as it appears in the slot). A minted token is
/// about 300-600 bytes and each attenuation adds about 250.
pub const MAX_TOKEN_LEN: usize = 8192;

/// The authority fact naming the token's credential.
pub const CREDENTIAL_FACT: &str = "credential";

/// Hex digits of a token id: the first 16 bytes of Biscuit's revocation identifier
/// (the block's signature), unique for all practical purposes.
pub const ID_HEX: usize = 32;

/// Why a token is refused. Every variant names the check that failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenRefusal {
    TooLarge(usize),
    /// Not a Biscuit token, or a damaged one (truncated, altered).
    Malformed(String),
    /// Not signed by this latchkey's root key, or its signature chain is broken.
    Signature(String),
    /// This latchkey has no token key (yet): no token can be valid.
    NoKey,
    Revoked(String),
    /// The revocation list cannot be read: every token is refused until it can.
    RevocationUnknown(String),
    /// The token's authority block names no credential, or several.
    NoCredential,
    WrongCredential {
        token: String,
        here: String,
    },
    Check {
        block: usize,
        subject: &'static str,
        rule: String,
    },
    /// Biscuit's authorizer stopped (too many facts, too slow).
    TooCostly(String),
}

impl TokenRefusal {
    /// The failing check's name, as it appears in the refusal.
    pub fn check(&self) -> &'static str {
        match self {
            TokenRefusal::TooLarge(_) => "size",
            TokenRefusal::Malformed(_) => "format",
            TokenRefusal::Signature(_) | TokenRefusal::NoKey => "signature",
            TokenRefusal::Revoked(_) | TokenRefusal::RevocationUnknown(_) => "revocation",
            TokenRefusal::NoCredential | TokenRefusal::WrongCredential { .. } => "credential",
            TokenRefusal::Check { subject, .. } => subject,
            TokenRefusal::TooCostly(_) => "cost",
        }
    }
}

impl fmt::Display for TokenRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let check = self.check();
        match self {
            TokenRefusal::TooLarge(n) => {
                write!(f, "{check}: the token is {n} bytes, more than the {MAX_TOKEN_LEN} accepted")
            }
            TokenRefusal::Malformed(why) => write!(f, "{check}: not a valid Biscuit token ({why})"),
            TokenRefusal::Signature(why) => {
                write!(f, "{check}: not signed by this latchkey's token key ({why})")
            }
            TokenRefusal::NoKey => {
                write!(
                    f,
                    "{check}: this latchkey has no token key yet (create one with `latchkey token pubkey`)"
                )
            }
            TokenRefusal::Revoked(id) => write!(f, "{check}: token id {id} is revoked"),
            TokenRefusal::RevocationUnknown(why) => {
                write!(f, "{check}: the revocation list cannot be read ({why}); every token is refused")
            }
            TokenRefusal::NoCredential => {
                write!(f, "{check}: the token's first block must name exactly one credential")
            }
            TokenRefusal::WrongCredential { token, here } => write!(
                f,
                "{check}: the token is for credential {token}, and this request is for credential {here}"
            ),
            TokenRefusal::Check { block, subject, rule } => {
                let whose = if *block == 0 { "minted".to_string() } else { format!("attenuation {block}") };
                write!(
                    f,
                    "{subject}: the request is outside the token's scope: block {block} ({whose}) `{rule}`"
                )
            }
            TokenRefusal::TooCostly(why) => {
                write!(f, "{check}: checking the token's Datalog stopped ({why})")
            }
        }
    }
}

/// How a revocation list that cannot be read *because Redis does not answer* begins
/// (`[cluster]`, `crate::cluster::revoked`): such a refusal is a 503 `shared-state`,
/// not a 403 about the token.
pub const SHARED_UNAVAILABLE: &str = "shared state unavailable";

/// Revocation ids (lower-case hex, `ID_HEX` long), as read from the `revoked` list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Revoked(pub HashSet<String>);

impl Revoked {
    pub fn contains(&self, id: &str) -> bool {
        self.0.contains(id)
    }
}

/// Does a slot value look like a Biscuit token (rather than a placeholder or a key)?
/// URL-safe base64 of at least 64 characters whose first byte is a Biscuit container's
/// first field (root key id, or the authority block). A damaged token still looks like
/// one, so it is refused rather than treated as "no token".
pub fn looks_like_token(value: &str) -> bool {
    let b = value.as_bytes();
    if b.len() < 64 {
        return false;
    }
    let Ok(head) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&b[..4]) else { return false };
    // No early exit: the fold vectorises (this runs on every request carrying a token).
    let alphabet = |c: u8| c.is_ascii_alphanumeric() | (c == b'-') | (c == b'_') | (c == b'=');
    matches!(head.first(), Some(0x08 | 0x12)) && b.iter().fold(true, |ok, &c| ok & alphabet(c))
}

fn decode(text: &str) -> Result<Vec<u8>, TokenRefusal> {
    if text.len() > MAX_TOKEN_LEN {
        return Err(TokenRefusal::TooLarge(text.len()));
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|e| TokenRefusal::Malformed(format!("base64: {e}")))
}

/// A token whose signatures are verified, with what the request path needs of it.
#[derive(Debug)]
pub struct Verified {
    pub credential: String,
    /// Revocation ids of its blocks, authority first (see `ID_HEX`).
    pub ids: Vec<String>,
    checks: Checks,
    /// The last second it can be valid, when its checks bound time.
    pub expires: Option<u64>,
}

#[derive(Debug)]
enum Checks {
    /// Every block compiled: checked without Datalog.
    Compiled(Vec<CompiledBlock>),
    /// Some block is in a shape latchkey does not compile: Biscuit's authorizer decides.
    Datalog(Box<Biscuit>),
}

impl Verified {
    /// This token's own id (its last block's): revoking it revokes it and every token
    /// attenuated from it.
    pub fn id(&self) -> &str {
        self.ids.last().map(String::as_str).unwrap_or("")
    }

    /// Whether the fast path checks it (false: Biscuit's authorizer runs per request).
    pub fn is_compiled(&self) -> bool {
        matches!(self.checks, Checks::Compiled(_))
    }
}

/// A token whose signatures this latchkey verified, with the revocation list in force
/// when it was read: what the decision (`policy::decision`) checks against the request
/// with `authorize`, a pure function of the two, the credential and the request facts.
#[derive(Clone, Debug)]
pub struct Signed {
    pub token: std::sync::Arc<Verified>,
    pub revoked: std::sync::Arc<Revoked>,
}

/// Parse and check the signatures (the expensive part, cached by `state`).
pub fn parse(text: &str, root: &PublicKey) -> Result<Verified, TokenRefusal> {
    let bytes = decode(text)?;
    let token = Biscuit::from(&bytes, *root).map_err(|e| match e {
        biscuit_auth::error::Token::Format(biscuit_auth::error::Format::Signature(s)) => {
            TokenRefusal::Signature(s.to_string())
        }
        other => TokenRefusal::Malformed(other.to_string()),
    })?;
    let ids = token.revocation_identifiers().iter().map(|id| short_id(id)).collect();
    let sources = (0..token.block_count())
        .map(|i| block_source(&token, i))
        .collect::<Result<Vec<_>, _>>()
        .map_err(TokenRefusal::Malformed)?;
    let credential = credential_of(&sources[0])?;
    let third_party = (0..token.block_count()).any(|i| token.block_external_key(i).ok().flatten().is_some());
    let compiled: Option<Vec<CompiledBlock>> = if third_party {
        None
    } else {
        sources
            .iter()
            .enumerate()
            .map(|(i, s)| CompiledBlock::compile(s, if i == 0 { &[CREDENTIAL_FACT] } else { &[] }))
            .collect()
    };
    let (checks, expires) = match compiled {
        Some(blocks) => {
            let expires = blocks.iter().filter_map(CompiledBlock::deadline).min();
            (Checks::Compiled(blocks), expires)
        }
        None => (Checks::Datalog(Box::new(token)), None),
    };
    Ok(Verified { credential, ids, checks, expires })
}

fn block_source(token: &Biscuit, i: usize) -> Result<BlockBuilder, String> {
    let text = token.print_block_source(i).map_err(|e| e.to_string())?;
    BlockBuilder::new().code(&text).map_err(|e| format!("block {i}: {e}"))
}

fn credential_of(authority: &BlockBuilder) -> Result<String, TokenRefusal> {
    let mut names = authority.facts.iter().filter(|f| f.predicate.name == CREDENTIAL_FACT).map(|f| {
        match f.predicate.terms.as_slice() {
            [Term::Str(s)] => Some(s.clone()),
            _ => None,
        }
    });
    match (names.next(), names.next()) {
        (Some(Some(name)), None) => Ok(name),
        _ => Err(TokenRefusal::NoCredential),
    }
}

pub fn short_id(revocation_id: &[u8]) -> String {
    let mut id = hex::encode(revocation_id);
    id.truncate(ID_HEX);
    id
}

/// The credential the request is for: its name, and the credentials sharing its
/// placeholder (one credential to the client, SPEC 5), any of which a token may name.
pub struct Target<'a> {
    pub name: &'a str,
    pub shares_placeholder_with: &'a [String],
}

/// May this verified token be used for this request? Cheap: the request path runs it
/// for every request, with the current revocation set and time.
pub fn authorize(
    token: &Verified,
    revoked: &Revoked,
    target: &Target<'_>,
    req: &Request<'_>,
) -> Result<(), TokenRefusal> {
    if let Some(id) = token.ids.iter().find(|id| revoked.contains(id)) {
        return Err(TokenRefusal::Revoked(id.clone()));
    }
    let named = token.credential.as_str();
    if named != target.name && !target.shares_placeholder_with.iter().any(|n| n == named) {
        return Err(TokenRefusal::WrongCredential {
            token: named.to_string(),
            here: target.name.to_string(),
        });
    }
    match &token.checks {
        Checks::Compiled(blocks) => {
            for (i, block) in blocks.iter().enumerate() {
                if let Some((_, check)) = block.refusing(req) {
                    return Err(TokenRefusal::Check {
                        block: i,
                        subject: check.subject(),
                        rule: check.source.clone(),
                    });
                }
            }
            Ok(())
        }
        Checks::Datalog(biscuit) => run_authorizer(biscuit, req),
    }
}

/// The whole check, from text: `parse` then `authorize`.
pub fn verify(
    text: &str,
    root: &PublicKey,
    revoked: &Revoked,
    target: &Target<'_>,
    req: &Request<'_>,
) -> Result<Verified, TokenRefusal> {
    let token = parse(text, root)?;
    authorize(&token, revoked, target, req)?;
    Ok(token)
}

/// Biscuit's own authorizer over the request facts: the slow path, and the reference
/// the compiled path is tested against.
pub fn run_authorizer(token: &Biscuit, req: &Request<'_>) -> Result<(), TokenRefusal> {
    use biscuit_auth::error::{Logic, Token};
    let mut builder = biscuit_auth::AuthorizerBuilder::new();
    for fact in req.facts() {
        builder = builder.fact(fact).map_err(|e| TokenRefusal::Malformed(e.to_string()))?;
    }
    builder = builder
        .policy("allow if true")
        .map_err(|e| TokenRefusal::Malformed(e.to_string()))?
        .set_limits(biscuit_auth::AuthorizerLimits {
            max_facts: 1000,
            max_iterations: 100,
            // A backstop only: the fact and iteration limits bound the work; a tight
            // clock would refuse valid tokens on a loaded machine.
            max_time: std::time::Duration::from_secs(1),
        });
    let mut authorizer = builder.build(token).map_err(|e| TokenRefusal::Malformed(e.to_string()))?;
    match authorizer.authorize() {
        Ok(_) => Ok(()),
        Err(Token::FailedLogic(Logic::Unauthorized { checks, .. } | Logic::NoMatchingPolicy { checks })) => {
            Err(first_failed(&checks))
        }
        Err(Token::RunLimit(e)) => Err(TokenRefusal::TooCostly(e.to_string())),
        Err(e) => Err(TokenRefusal::TooCostly(e.to_string())),
    }
}

fn first_failed(checks: &[biscuit_auth::error::FailedCheck]) -> TokenRefusal {
    use biscuit_auth::error::FailedCheck;
    let (block, rule) = match checks.first() {
        Some(FailedCheck::Block(b)) => (b.block_id as usize, b.rule.clone()),
        Some(FailedCheck::Authorizer(a)) => (0, a.rule.clone()),
        None => (0, "no check".into()),
    };
    TokenRefusal::Check { block, subject: subject_of(&rule), rule }
}

/// The request fact a Datalog check is about, read from its text.
fn subject_of(rule: &str) -> &'static str {
    let named: Vec<Fact> =
        Fact::ALL.into_iter().filter(|f| rule.contains(&format!("{}(", f.name()))).collect();
    match named.as_slice() {
        [Fact::Time] => "expiry",
        [one] => one.name(),
        _ => "check",
    }
}

/// A new token for `credential`, signed by `root`, restricted by `r`.
pub fn mint(root: &KeyPair, credential: &str, r: &Restriction) -> Result<String, String> {
    let block = r.write(BlockBuilder::new())?;
    let builder = Biscuit::builder()
        .fact(biscuit_auth::builder::fact(CREDENTIAL_FACT, &[Term::Str(credential.to_string())]))
        .map_err(|e| e.to_string())?
        .merge(block);
    builder.build(root).and_then(|t| t.to_base64()).map_err(|e| e.to_string())
}

/// `token` with one more block of checks. Needs no key: any holder can narrow a token.
pub fn attenuate(token: &str, r: &Restriction) -> Result<String, String> {
    if r.is_empty() {
        return Err(
            "nothing to narrow: give at least one of --host, --port, --path, --method, --agent, --ttl".into(),
        );
    }
    let bytes = decode(token).map_err(|e| e.to_string())?;
    let parsed = UnverifiedBiscuit::from(&bytes).map_err(|e| format!("not a Biscuit token: {e}"))?;
    let block = r.write(BlockBuilder::new())?;
    parsed.append(block).and_then(|t| t.to_base64()).map_err(|e| e.to_string())
}

/// What `inspect` shows: no key needed, nothing verified.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Inspection {
    pub credential: Option<String>,
    /// This token's id (its last block's), for `revoke`.
    pub id: String,
    /// The earliest expiry among the blocks' time checks (RFC 3339), if any.
    pub expires: Option<String>,
    pub blocks: Vec<InspectedBlock>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct InspectedBlock {
    pub id: String,
    pub source: String,
}

pub fn inspect(token: &str) -> Result<Inspection, String> {
    let bytes = decode(token).map_err(|e| e.to_string())?;
    let parsed = UnverifiedBiscuit::from(&bytes).map_err(|e| format!("not a Biscuit token: {e}"))?;
    let ids: Vec<String> = parsed.revocation_identifiers().iter().map(|i| short_id(i)).collect();
    let mut blocks = Vec::new();
    let mut credential = None;
    let mut expires: Option<u64> = None;
    for (i, id) in ids.iter().enumerate() {
        let source = parsed.print_block_source(i).map_err(|e| e.to_string())?;
        if let Ok(b) = BlockBuilder::new().code(&source) {
            if i == 0 {
                credential = credential_of(&b).ok();
            }
            let allowed: &[&str] = if i == 0 { &[CREDENTIAL_FACT] } else { &[] };
            if let Some(deadline) = CompiledBlock::compile(&b, allowed).and_then(|c| c.deadline()) {
                expires = Some(expires.map_or(deadline, |e| e.min(deadline)));
            }
        }
        blocks.push(InspectedBlock { id: id.clone(), source: source.trim().to_string() });
    }
    Ok(Inspection {
        credential,
        id: ids.last().cloned().unwrap_or_default(),
        expires: expires.map(rfc3339),
        blocks,
    })
}

pub fn rfc3339(secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Credentials whose secret goes where a client writes a placeholder (a header slot,
/// a basic password, a query parameter): those a token can stand in for.
pub fn takes_token(cred: &crate::config::Credential) -> bool {
    matches!(cred.auth_type.as_str(), "header" | "bearer" | "basic" | "query")
}

/// `30s`, `5m`, `2h`, `1d` or plain seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().map_err(|_| format!("{s:?}: expected a duration like 30s, 5m, 2h or 1d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    match n.checked_mul(scale) {
        Some(0) => Err(format!("{s:?}: a duration must be positive")),
        Some(v) => Ok(v),
        None => Err(format!("{s:?}: too long")),
    }
}

#[cfg(test)]
mod tests;
