//! Phase "screen" (`[proxy.dlp]`, docs/dlp.md): the request is scanned for secrets
//! before anything of it goes upstream — its target, its headers (not the credential's
//! own slot: injection overwrites it), and its body: up to `hold_bytes` held and
//! scanned whole (decoded first when compressed), the rest scanned as it streams with
//! the tail a match could start in held back. The decision is `policy::dlp`'s.
//!
//! Past `hold_bytes` the request has already started upstream; a refused match there
//! ends the upstream request before the matching bytes are sent (the upstream sees a
//! body cut short, never the secret) and the client gets the same 403.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderName;
use http::request::Parts;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use super::super::respond::{self, Protocol};
use super::super::route::Route;
use super::super::{Body, BoxError};
use crate::config::{Config, Credential};
use crate::dlp::{Findings, Hit, Settings, quick::Quick, stream::Stream};
use crate::policy::{DlpAction, DlpVerdict, Refusal, RefusalKind};
use crate::redact::Set;
use crate::telemetry::Record;

/// What screening did, for the exchange's record (and `warned`).
pub struct Screened {
    pub body: Body,
    pub warned: bool,
}

/// Screen the request (head and held body); the body to forward comes back.
pub async fn screen(
    config: &Arc<Config>,
    route: &Route,
    parts: &mut Parts,
    body: Body,
    credential: Option<&Credential>,
    upgrade: bool,
    record: &mut Record,
) -> Result<Screened, Refusal> {
    let Some(dlp) = config.dlp.clone() else { return Ok(Screened { body, warned: false }) };
    let own = own_secrets(config);
    let slots = credential.map(|c| &c.slot_headers[..]).unwrap_or_default();
    // The quick pass for the own secrets in force: the head's and the body's.
    let quick = dlp.quick.get(&dlp.scanner, own.as_ref());
    let mut head = scan_head(&dlp, own.as_ref(), quick.as_deref(), parts, slots);
    let grpc = Protocol::of(&parts.headers) == Protocol::Grpc;
    let mut held = match upgrade {
        true => Held::default(),
        false => held_body(config, &dlp, body, grpc).await?,
    };
    let (in_body, compressed) = scan_body(&dlp, own.as_ref(), quick.as_deref(), parts, &held)?;
    let policy = &config.policy.dlp;
    let counted = |h: &&Hit| !policy.allowed(&dlp.scanner.ids[h.rule], &route.dest);
    let all: Vec<&Hit> = head.iter().flat_map(|(_, f)| f.hits.iter()).chain(&in_body.hits).collect();
    let own_count = head.iter().map(|(_, f)| f.own).sum::<usize>() + in_body.own;
    let ids: Vec<&str> = all.iter().filter(|h| counted(h)).map(|h| &*dlp.scanner.ids[h.rule]).collect();
    let verdict = policy.verdict(&route.dest, own_count, &ids);
    if own_count > 0 || !all.is_empty() {
        let found = Findings { own: own_count, hits: all.iter().map(|h| (*h).clone()).collect() };
        note(record, &dlp, &found, &verdict, policy, route);
    }
    let warned = matches!(verdict, DlpVerdict::Warn);
    match verdict {
        DlpVerdict::Forward | DlpVerdict::Warn => {}
        DlpVerdict::Block(r) => return Err(r),
        DlpVerdict::Redact => {
            let body_hits: Vec<&Hit> = in_body.hits.iter().filter(counted).collect();
            if compressed && !body_hits.is_empty() {
                return Err(refusal(
                    "the compressed request body holds a secret that cannot be masked in place; send it uncompressed"
                        .into(),
                ));
            }
            let mut bytes = held.joined();
            dlp.scanner.mask_all(&mut bytes, &body_hits, |h| counted(&h));
            held.pieces = vec![bytes.freeze()];
            mask_head(&dlp.scanner, parts, &mut head, counted)?;
        }
    }
    let body = forward(held, Tail::new(dlp, own, config.clone(), route.dest.clone(), grpc));
    Ok(Screened { body, warned })
}

/// The body held whole, within `[proxy] timeout` (a body trickling in is bounded as
/// the upstream would bound it).
async fn held_body(config: &Config, dlp: &Settings, body: Body, grpc: bool) -> Result<Held, Refusal> {
    let limit = config.proxy.timeout;
    let mut held = tokio::time::timeout(limit, hold(body, dlp.hold_bytes, grpc)).await.map_err(|_| {
        Refusal::bad_request(format!("the request body did not arrive within {}s", limit.as_secs()))
    })??;
    held.flush();
    Ok(held)
}

/// What the held body holds (decoded first when compressed), and whether it was.
fn scan_body(
    dlp: &Settings,
    own: Option<&Set>,
    quick: Option<&Quick>,
    parts: &Parts,
    held: &Held,
) -> Result<(Findings, bool), Refusal> {
    let codings = crate::dlp::decode::codings(&parts.headers).map_err(|c| {
        refusal(format!(
            "the request body is in Content-Encoding {c:?}, which latchkey cannot decode to scan"
        ))
    })?;
    if codings.is_empty() || held.len == 0 {
        return Ok((dlp.scanner.scan_pieces(&held.pieces, own, quick), false));
    }
    if held.rest.is_some() {
        return Err(refusal(format!(
            "a compressed request body over [proxy.dlp] hold_bytes ({} bytes) cannot be scanned",
            dlp.hold_bytes
        )));
    }
    let plain = crate::dlp::decode::decode(&held.joined(), &codings, 16 * dlp.hold_bytes)
        .map_err(|e| refusal(format!("the compressed request body cannot be scanned: {e}")))?;
    Ok((dlp.scanner.scan(&plain, own), true))
}

/// The body that goes upstream: the held bytes, then (if the body went on) the rest,
/// scanned as it streams.
fn forward(held: Held, mut tail: Tail) -> Body {
    let prefix: VecDeque<Bytes> = held.pieces.into_iter().filter(|p| !p.is_empty()).collect();
    match held.rest {
        None if prefix.len() <= 1 => respond::full(prefix.into_iter().next().unwrap_or_default()),
        None => Pieces(prefix).boxed(),
        Some(rest) => {
            tail.stream = Stream::new(held.len as u64, tail.grpc);
            tail.prefix = prefix;
            tail.inner = Some(rest);
            tail.boxed()
        }
    }
}

/// The held body as it arrived, piece by piece (no copy), its length known.
struct Pieces(VecDeque<Bytes>);

impl HttpBody for Pieces {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.pop_front().map(|p| Ok(Frame::data(p))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.iter().map(|p| p.len() as u64).sum())
    }
}

fn refusal(message: String) -> Refusal {
    Refusal::new(RefusalKind::Dlp, message)
}

/// What the WebSocket relay needs to scan the client's messages (`None`: DLP is off).
pub fn ws_screen(config: &Arc<Config>, route: &Route) -> Option<super::super::wsscreen::WsScreen> {
    let dlp = config.dlp.clone()?;
    Some(super::super::wsscreen::WsScreen {
        dlp,
        own: own_secrets(config),
        config: config.clone(),
        dest: route.dest.clone(),
    })
}

/// Every credential's live (and recently rotated) secrets: none may leave in a request.
fn own_secrets(config: &Config) -> Option<Set> {
    Set::new(
        config.credentials.iter().filter_map(|c| c.redactor.get(|out| c.injector.secrets(out))).collect(),
    )
}

/// A part of the request head that held something.
enum HeadPart {
    Target,
    Header(usize),
}

fn scan_head(
    dlp: &Settings,
    own: Option<&Set>,
    quick: Option<&Quick>,
    parts: &Parts,
    slots: &[HeaderName],
) -> Vec<(HeadPart, Findings)> {
    if quick.is_some_and(|q| head_is_clean(q, parts, slots)) {
        return Vec::new();
    }
    scan_parts(dlp, own, parts, slots)
}

/// The target and each header value (not the credential's slots) scanned on its own.
fn scan_parts(
    dlp: &Settings,
    own: Option<&Set>,
    parts: &Parts,
    slots: &[HeaderName],
) -> Vec<(HeadPart, Findings)> {
    let mut out = Vec::new();
    if let Some(pq) = parts.uri.path_and_query() {
        let f = dlp.scanner.scan(pq.as_str().as_bytes(), own);
        if !f.is_empty() {
            out.push((HeadPart::Target, f));
        }
    }
    for (i, (name, value)) in parts.headers.iter().enumerate() {
        if slots.contains(name) {
            continue;
        }
        let f = dlp.scanner.scan(value.as_bytes(), own);
        if !f.is_empty() {
            out.push((HeadPart::Header(i), f));
        }
    }
    out
}

/// Does the quick pass (`crate::dlp::quick`) clear the target and every scanned header
/// value at once? They are read joined by NUL (`redact::joined_by_nul`): whatever the
/// pass would find in one of them it finds in the joined text, so a clear head holds
/// nothing a scan of each part would find. One pass costs a fraction of one per header.
fn head_is_clean(quick: &Quick, parts: &Parts, slots: &[HeaderName]) -> bool {
    let target = parts.uri.path_and_query().map(|pq| pq.as_str().as_bytes());
    let values = parts.headers.iter().filter(|(name, _)| !slots.contains(name)).map(|(_, v)| v.as_bytes());
    crate::redact::joined_by_nul(target.into_iter().chain(values), |joined| quick.clean_text(joined))
}

/// Mask what `redact` masks in the target and header values (same length).
fn mask_head(
    scanner: &crate::dlp::Scanner,
    parts: &mut Parts,
    head: &mut [(HeadPart, Findings)],
    counted: impl Fn(&&Hit) -> bool,
) -> Result<(), Refusal> {
    let bad = || refusal("cannot rebuild the request after masking".into());
    for (part, f) in head.iter() {
        let hits: Vec<&Hit> = f.hits.iter().filter(&counted).collect();
        if hits.is_empty() {
            continue;
        }
        match part {
            HeadPart::Target => {
                let mut pq =
                    parts.uri.path_and_query().map(|p| p.as_str().as_bytes().to_vec()).unwrap_or_default();
                scanner.mask_all(&mut pq, &hits, |h| counted(&h));
                let mut uri = std::mem::take(&mut parts.uri).into_parts();
                uri.path_and_query = Some(http::uri::PathAndQuery::try_from(pq).map_err(|_| bad())?);
                parts.uri = http::Uri::from_parts(uri).map_err(|_| bad())?;
            }
            HeadPart::Header(i) => {
                if let Some((_, value)) = parts.headers.iter_mut().nth(*i) {
                    let mut v = value.as_bytes().to_vec();
                    scanner.mask_all(&mut v, &hits, |h| counted(&h));
                    *value = http::HeaderValue::from_bytes(&v).map_err(|_| bad())?;
                }
            }
        }
    }
    Ok(())
}

/// The log line, the span and the record name the rule ids and counts, never the text.
fn note(
    record: &mut Record,
    dlp: &Settings,
    found: &Findings,
    verdict: &DlpVerdict,
    policy: &crate::policy::DlpPolicy,
    route: &Route,
) {
    let summary = crate::dlp::summary(&dlp.scanner.ids, found, |_| true);
    let action = match verdict {
        DlpVerdict::Forward => "allowed",
        DlpVerdict::Block(_) => "block",
        DlpVerdict::Redact => DlpAction::Redact.name(),
        DlpVerdict::Warn => DlpAction::Warn.name(),
    };
    let rules: Vec<String> = summary.iter().map(|(id, n)| format!("{id}:{n}")).collect();
    let rules = rules.join(",");
    tracing::warn!(target: "latchkey::dlp", dest = %route.dest, action, configured = policy.action.name(), rules = %rules, "outbound secret");
    record.dlp = Some(crate::telemetry::record::Dlp { action, rules: summary });
}

/// The request body held whole (up to the limit), in the pieces it arrived in (not
/// copied: most bodies are cleared by the quick pass without being joined), and what
/// follows it.
#[derive(Default)]
struct Held {
    pieces: Vec<Bytes>,
    len: usize,
    rest: Option<Body>,
    /// Small pieces gathered into one (a body in tiny chunks would otherwise cost a
    /// `Bytes` and a seam per chunk).
    small: BytesMut,
}

/// Pieces smaller than this are gathered (copied) into one.
const SMALL_PIECE: usize = 4096;

impl Held {
    /// One copy of the whole held body, to decode or mask.
    fn joined(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(self.len);
        for p in &self.pieces {
            out.extend_from_slice(p);
        }
        out
    }

    fn push(&mut self, data: Bytes) {
        self.len += data.len();
        if data.len() < SMALL_PIECE {
            self.small.extend_from_slice(&data);
            if self.small.len() >= SMALL_PIECE {
                self.flush();
            }
            return;
        }
        self.flush();
        self.pieces.push(data);
    }

    /// The gathered small pieces become a piece.
    fn flush(&mut self) {
        if !self.small.is_empty() {
            self.pieces.push(self.small.split().freeze());
        }
    }
}

/// Read the body until it ends or `limit` bytes are held; a gRPC body stops at a
/// message's end too (a streaming call waits for its first answer before it sends on).
async fn hold(mut body: Body, limit: usize, grpc: bool) -> Result<Held, Refusal> {
    let mut held = Held::default();
    let mut messages = crate::redact::GrpcMessages::default();
    if body.is_end_stream() {
        return Ok(held);
    }
    loop {
        match body.frame().await {
            None => return Ok(held),
            Some(Err(e)) => {
                return Err(Refusal::bad_request(format!("reading the request body failed: {e}")));
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let message_end = grpc && messages.feed(&data);
                    held.push(data);
                    if body.is_end_stream() {
                        return Ok(held);
                    }
                    if held.len >= limit || message_end {
                        held.rest = Some(body);
                        return Ok(held);
                    }
                }
                Err(frame) => {
                    // Trailers end the body: they follow the held bytes.
                    let trailers = frame.into_trailers().unwrap_or_default();
                    let rest = http_body_util::Empty::<Bytes>::new()
                        .map_err(|e| -> BoxError { match e {} })
                        .with_trailers(async move { Some(Ok(trailers)) })
                        .boxed();
                    held.rest = Some(rest);
                    return Ok(held);
                }
            },
        }
    }
}

/// The body past what was held: scanned as it streams (see the module doc).
struct Tail {
    inner: Option<Body>,
    prefix: VecDeque<Bytes>,
    stream: Stream,
    grpc: bool,
    dlp: Arc<Settings>,
    own: Option<Set>,
    config: Arc<Config>,
    dest: crate::policy::Destination,
    trailers: Option<http::HeaderMap>,
    done: bool,
}

/// A secret found past the held part, refused: the upstream request is ended.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BlockedSecret(pub Refusal);

impl Tail {
    fn new(
        dlp: Arc<Settings>,
        own: Option<Set>,
        config: Arc<Config>,
        dest: crate::policy::Destination,
        grpc: bool,
    ) -> Tail {
        Tail {
            inner: None,
            prefix: VecDeque::new(),
            stream: Stream::new(0, grpc),
            grpc,
            dlp,
            own,
            config,
            dest,
            trailers: None,
            done: false,
        }
    }

    /// Scan a chunk; what may be released, or the refusal.
    fn pass(&mut self, data: &[u8], last: bool) -> Result<Bytes, BoxError> {
        let found = self.stream.feed(data, &self.dlp.scanner, self.own.as_ref(), last);
        if !found.is_empty() {
            let policy = &self.config.policy.dlp;
            let counted: Vec<&Hit> = found
                .hits
                .iter()
                .filter(|h| !policy.allowed(&self.dlp.scanner.ids[h.rule], &self.dest))
                .collect();
            let ids: Vec<&str> = counted.iter().map(|h| &*self.dlp.scanner.ids[h.rule]).collect();
            let verdict = policy.verdict(&self.dest, found.own, &ids);
            let summary = crate::dlp::summary(&self.dlp.scanner.ids, &found, |_| true);
            let rules: Vec<String> = summary.iter().map(|(id, n)| format!("{id}:{n}")).collect();
            tracing::warn!(target: "latchkey::dlp", dest = %self.dest, rules = %rules.join(","), "outbound secret in a streamed body");
            match verdict {
                DlpVerdict::Block(r) => return Err(Box::new(BlockedSecret(r))),
                DlpVerdict::Redact => {
                    let (scanner, dest) = (&self.dlp.scanner, &self.dest);
                    let keep = |h: &Hit| !policy.allowed(&scanner.ids[h.rule], dest);
                    scanner.mask_all(self.stream.window(), &counted, keep);
                }
                DlpVerdict::Warn | DlpVerdict::Forward => {}
            }
        }
        Ok(self.stream.release(self.own.as_ref(), last))
    }
}

impl HttpBody for Tail {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(p) = this.prefix.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        loop {
            if this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let last = this.inner.as_ref().is_none_or(|b| b.is_end_stream());
                        this.done = last;
                        match this.pass(&data, last) {
                            Err(e) => return Poll::Ready(Some(Err(e))),
                            Ok(out) if !out.is_empty() => return Poll::Ready(Some(Ok(Frame::data(out)))),
                            Ok(_) => {}
                        }
                    }
                    Err(frame) => {
                        this.trailers = frame.into_trailers().ok();
                        this.done = true;
                        match this.pass(&[], true) {
                            Err(e) => return Poll::Ready(Some(Err(e))),
                            Ok(out) if !out.is_empty() => return Poll::Ready(Some(Ok(Frame::data(out)))),
                            Ok(_) => {}
                        }
                    }
                },
                Poll::Ready(None) => {
                    this.done = true;
                    match this.pass(&[], true) {
                        Err(e) => return Poll::Ready(Some(Err(e))),
                        Ok(out) if !out.is_empty() => return Poll::Ready(Some(Ok(Frame::data(out)))),
                        Ok(_) => {}
                    }
                }
            }
        }
    }

    /// Ended also before the first poll when the body it wraps has (a request without a
    /// body): nothing is held back and nothing is left to scan, and the request may then
    /// go as one without a body (the own upstream client, an h2 HEADERS with END_STREAM).
    fn is_end_stream(&self) -> bool {
        let inner_ended = self.done || self.inner.as_ref().is_none_or(|b| b.is_end_stream());
        self.prefix.is_empty() && inner_ended && self.stream.held() == 0 && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.as_ref().map(|b| b.size_hint()).unwrap_or_default();
        let before = (self.stream.held() + self.prefix.iter().map(Bytes::len).sum::<usize>()) as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + before);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + before);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use proptest::prelude::*;

    const OWN: &str = "own-live-secret-0123456789";

    fn settings() -> (Settings, Set) {
        let secret = crate::secrets::Secret::new(OWN.into());
        let set = Set::new(vec![Arc::new(crate::redact::Redactor::new(&[secret]).unwrap())]).unwrap();
        (Settings::new(crate::dlp::Scanner::new(true, vec![]).unwrap(), 1 << 16), set)
    }

    /// Pieces a header value or target is made of: clean words, finds (bundled-rule
    /// samples, the own secret and its encodings) and the halves of escapes.
    fn pieces() -> Vec<String> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("k={OWN}"));
        [
            "application/json",
            "gzip, br",
            "oha/1.16.0",
            "*/*",
            "text",
            " ",
            "-",
            "=",
            "x",
            "AKIAZ7QWERTY2UIOPLKJ",
            "ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5",
            "sk_live_51HxAbCdEfGhIjKlMnOpQrStUv",
            OWN,
            &b64,
            "own%2Dlive-secret-0123456789",
            "\\",
            "u0041",
            "\\u00",
            "%",
            "2D",
            "/",
        ]
        .map(String::from)
        .to_vec()
    }

    fn clean_for(dlp: &Settings, own: &Set, parts: &Parts, slots: &[HeaderName]) -> bool {
        let quick = dlp.quick.get(&dlp.scanner, Some(own)).unwrap();
        head_is_clean(&quick, parts, slots)
    }

    fn head(target: &str, values: &[String]) -> Parts {
        let mut req = http::Request::builder().uri(format!("/{}", target.replace(['\\', ' '], "_")));
        for (i, v) in values.iter().enumerate() {
            req = req.header(format!("x-h{i}"), v.as_str());
        }
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_joined_head_pass_clears_clean_heads_and_not_a_find_in_any_part() {
        let (dlp, set) = settings();
        let clean = head("v1/messages", &["application/json".into(), "oha/1.16.0".into()]);
        assert!(clean_for(&dlp, &set, &clean, &[]));
        let finds = ["ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5", OWN, "own%2Dlive-secret-0123456789"];
        for find in finds {
            for at in 0..3 {
                let mut values: Vec<String> = vec!["text".into(); 3];
                values[at] = format!("x {find} y");
                let h = head("v1/messages", &values);
                assert!(!clean_for(&dlp, &set, &h, &[]), "{find} in header {at}");
                assert!(!scan_parts(&dlp, Some(&set), &h, &[]).is_empty(), "{find} in header {at}");
            }
        }
        // In the credential's slot it is not looked for (injection overwrites it).
        let slot: HeaderName = "x-h0".parse().unwrap();
        let h = head("v1/messages", &[OWN.into()]);
        assert!(clean_for(&dlp, &set, &h, &[slot]));
    }

    proptest! {
        /// Whatever a head is made of, the joined pass clears it only when the scan of
        /// each part on its own finds nothing.
        #[test]
        fn a_cleared_head_holds_nothing_a_scan_per_part_finds(
            target in proptest::collection::vec(0usize..21, 0..4),
            values in proptest::collection::vec(proptest::collection::vec(0usize..21, 0..5), 0..5),
        ) {
            let (dlp, set) = settings();
            let p = pieces();
            let join = |ix: &[usize]| ix.iter().map(|i| p[*i].as_str()).collect::<String>();
            let values: Vec<String> = values.iter().map(|v| join(v)).collect();
            let h = head(&join(&target), &values);
            if clean_for(&dlp, &set, &h, &[]) {
                prop_assert!(scan_parts(&dlp, Some(&set), &h, &[]).is_empty(), "{:?}", h);
            }
        }
    }
}
