//! Phase "inject": the credential written into the request through its injector — the
//! `refresh` hook first (a minted token), the body buffered when `body_limit` asks for
//! it (a signing scheme hashes it), and a small request kept for one replay when
//! `replays_after_401` says the credential may be refused early.

use http::header;
use http::request::Parts;
use http_body_util::BodyExt;

use super::super::{Body, BoxError, respond};
use crate::config::Credential;
use crate::inject::{InjectError, TokenHttp};
use crate::policy::{Refusal, RefusalKind};

/// A request kept to be sent once more: its head (injected once already) and body.
pub struct Replay {
    pub parts: Parts,
    pub body: bytes::Bytes,
    pub captures: Vec<(String, String)>,
}

/// Largest request body kept for one replay after a 401.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// Write the credential into the request; the body that goes with it (the buffered
/// copy when the injector read it), and a replay when one is kept.
pub async fn inject(
    cred: &Credential,
    captures: &[(String, String)],
    parts: &mut Parts,
    body: Body,
    http: &dyn TokenHttp,
    may_replay: bool,
) -> Result<(Body, Option<Box<Replay>>), Refusal> {
    let mut body = write(cred, captures, parts, body, http).await?;
    // Boxed, the wait and the replay: kept for the few credentials that renew, they
    // would otherwise size every exchange.
    let replay = match cred.injector.replays_after_401() && may_replay {
        true => Box::pin(replayable(parts, &mut body))
            .await?
            .map(|(parts, body)| Box::new(Replay { parts, body, captures: captures.to_vec() })),
        false => None,
    };
    Ok((body, replay))
}

/// Write the credential once: the request's body comes back (buffered when the
/// injector signs it).
pub async fn write(
    cred: &Credential,
    captures: &[(String, String)],
    parts: &mut Parts,
    body: Body,
    http: &dyn TokenHttp,
) -> Result<Body, Refusal> {
    cred.injector.refresh(http).await.map_err(|e| refusal(cred, e))?;
    let (body, bytes) = match cred.injector.body_limit(parts) {
        None => (body, None),
        Some(limit) => {
            // Boxed: only a signing scheme waits for the whole body here.
            let bytes = Box::pin(buffer(body, limit)).await.map_err(|e| match e {
                None => Refusal::new(
                    RefusalKind::BodyTooLarge,
                    format!(
                        "credential {} signs request bodies up to {limit} bytes; this one is larger",
                        cred.name
                    ),
                ),
                Some(e) => Refusal::bad_request(format!("reading the request body failed: {e}")),
            })?;
            (respond::full(bytes.clone()), Some(bytes))
        }
    };
    // Files and commands are refreshed off the runtime threads, never in `inject`.
    cred.ready().await;
    cred.injector.inject(parts, captures, bytes.as_deref()).map_err(|e| refusal(cred, e))?;
    Ok(body)
}

/// An injector's failure, in latchkey's words.
fn refusal(cred: &Credential, e: InjectError) -> Refusal {
    match e {
        InjectError::Unavailable(why) => Refusal::new(
            RefusalKind::CredentialFailed,
            format!("credential {} cannot be used here: {why}", cred.name),
        ),
        InjectError::Mint(why) => Refusal::new(
            RefusalKind::CredentialFailed,
            format!("credential {}: cannot get a token: {why}", cred.name),
        ),
        InjectError::Refused { kind, message } => {
            Refusal::new(kind, format!("credential {}: {message}", cred.name))
        }
    }
}

/// A copy of a request whose body is small enough to send twice (declared length within
/// `REPLAY_LIMIT`, or none); the body is buffered and `body` replaced by the buffer.
async fn replayable(parts: &Parts, body: &mut Body) -> Result<Option<(Parts, bytes::Bytes)>, Refusal> {
    let declared =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
    match declared {
        Some(n) if n <= REPLAY_LIMIT && !chunked => {}
        None if !chunked && http_body::Body::is_end_stream(body) => {}
        _ => return Ok(None),
    }
    let taken = std::mem::replace(body, respond::empty());
    let bytes = buffer(taken, REPLAY_LIMIT as usize)
        .await
        .map_err(|_| Refusal::bad_request("reading the request body failed"))?;
    *body = respond::full(bytes.clone());
    let mut copy =
        http::Request::builder().method(parts.method.clone()).uri(parts.uri.clone()).version(parts.version);
    for (k, v) in &parts.headers {
        copy = copy.header(k, v);
    }
    let copy = copy.body(()).map_err(|_| Refusal::bad_request("cannot copy the request"))?.into_parts().0;
    Ok(Some((copy, bytes)))
}

/// The whole body, or `Err(None)` past `limit` bytes, `Err(Some(e))` on a read error.
async fn buffer(mut body: Body, limit: usize) -> Result<bytes::Bytes, Option<BoxError>> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(Some)?.into_data() {
            if buf.len() + data.len() > limit {
                return Err(None);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}
