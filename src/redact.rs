//! Response redaction (invariant 5): every live secret, in every form an upstream might
//! echo it, is replaced by a mask of the same length before the client sees it —
//! streaming, holding back the trailing bytes that could still belong to a masked form.
//!
//! What is held back never depends on the secret's value: it is the trailing run of
//! bytes from a fixed alphabet (the bytes any masked form can consist of), up to the
//! longest span a form can take. An agent that has an upstream echo its guesses sees the
//! same framing and timing for a right and a wrong guess of the same length.

use aho_corasick::{AhoCorasick, Input, MatchKind, Span, packed};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use bytes::{Bytes, BytesMut};
use memchr::memmem;

use std::ops::Range;
use std::sync::{Arc, LazyLock, Mutex};

use crate::secrets::Secret;
use zeroize::Zeroizing;

/// How long a value rotated out of a credential stays masked.
pub const RETIRED_FOR: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A credential's redactor, rebuilt only when its secret values change (rotation,
/// newly minted tokens). Values rotated out stay masked for `RETIRED_FOR`.
#[derive(Debug, Default)]
pub struct Cache(Mutex<CacheState>);

#[derive(Debug, Default)]
struct CacheState {
    current: Vec<Secret>,
    /// The values of the latest ask, compared with `current`: kept (empty) between
    /// asks, so a response's ask allocates nothing.
    asked: Vec<Secret>,
    retired: Vec<(Secret, std::time::Instant)>,
    redactor: Option<Arc<Redactor>>,
    /// `redactor` as a set of one: what a response whose host only this credential
    /// names is masked with (the usual case), made once rather than per response.
    alone: Option<Set>,
}

impl Cache {
    /// The redactor for the values `secrets` adds (the credential's
    /// `Injector::secrets`), made again only when they changed.
    pub fn get(&self, secrets: impl FnOnce(&mut Vec<Secret>)) -> Option<Arc<Redactor>> {
        self.current(secrets).redactor.clone()
    }

    /// [`Self::get`]'s redactor alone, as a [`Set`].
    pub fn alone(&self, secrets: impl FnOnce(&mut Vec<Secret>)) -> Option<Set> {
        self.current(secrets).alone.clone()
    }

    fn current(&self, secrets: impl FnOnce(&mut Vec<Secret>)) -> std::sync::MutexGuard<'_, CacheState> {
        let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut asked = std::mem::take(&mut st.asked);
        // Asked under this lock: a secret source takes only locks of its own, never this.
        secrets(&mut asked);
        // Nothing retired, the usual state: no clock read on a response's way out.
        let expired = !st.retired.is_empty() && {
            let now = std::time::Instant::now();
            st.retired.iter().any(|(_, at)| now.duration_since(*at) >= RETIRED_FOR)
        };
        if st.redactor.is_some() && st.current == asked && !expired {
            asked.clear();
            st.asked = asked;
        } else {
            st.renew(asked);
        }
        st
    }
}

impl CacheState {
    /// New values: the ones they replace are retired (still masked for `RETIRED_FOR`).
    fn renew(&mut self, secrets: Vec<Secret>) {
        let now = std::time::Instant::now();
        let old = std::mem::take(&mut self.current);
        for s in old.into_iter().filter(|s| !secrets.contains(s)) {
            self.retired.push((s, now));
        }
        self.retired.retain(|(s, at)| now.duration_since(*at) < RETIRED_FOR && !secrets.contains(s));
        let mut all = secrets.clone();
        all.extend(self.retired.iter().map(|(s, _)| s.clone()));
        self.current = secrets;
        self.redactor = Redactor::new(&all).map(Arc::new);
        self.alone = self.redactor.clone().and_then(|r| Set::new(vec![r]));
    }
}

/// Forms shorter than this are not masked: they would hit ordinary text.
const MIN_FORM: usize = 8;
const MASK: u8 = b'*';
/// A JSON `\uXXXX` escape is six bytes for one decoded byte at most (a surrogate pair is
/// twelve for four): the widest a form can be spread in a response.
const ESCAPE_WIDTH: usize = 6;

/// The byte strings that reveal `secret`: raw, base64 and base64url at each of the three
/// alignments (the characters that depend only on the secret), URL-encoded and
/// JSON-escaped (with and without `\/`). Forms with some characters `\u`-escaped are
/// found by decoding the escapes (see `find`).
pub fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![secret.to_vec()];
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        for pad in 0..3usize {
            let mut input = vec![0u8; pad];
            input.extend_from_slice(secret);
            let encoded = engine.encode(&input).into_bytes();
            let start = (pad * 8).div_ceil(6);
            let end = ((pad + secret.len()) * 8 / 6).min(encoded.len());
            if start < end {
                out.push(encoded[start..end].to_vec());
            }
        }
    }
    out.push(crate::inject::encode_component(&String::from_utf8_lossy(secret)).into_bytes());
    out.push(json_escape(secret, true));
    out.push(json_escape(secret, false));
    out.retain(|f| f.len() >= MIN_FORM);
    out.sort();
    out.dedup();
    out
}

fn json_escape(s: &[u8], slash: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for &b in s {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'/' if slash => out.extend_from_slice(b"\\/"),
            b if b < 0x20 => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            b => out.push(b),
        }
    }
    out
}

/// The bytes held back when they end a chunk: every printable ASCII character and every
/// non-ASCII byte, but not whitespace, controls or the JSON/markup punctuation that ends
/// a record (`"` `,` `{` `}` `[` `]` `<` `>`). Fixed, so that what is held back says
/// nothing about a secret; a secret holding one of the excluded bytes adds that byte
/// (which tells a prober only that the byte occurs in some secret).
fn base_alphabet() -> [bool; 256] {
    let mut a = [false; 256];
    for (b, slot) in a.iter_mut().enumerate() {
        let b = b as u8;
        *slot = (b.is_ascii_graphic() || b >= 0x80) && !b"\",{}[]<>".contains(&b);
    }
    a
}

/// Finds the leftmost-longest form at or after a position. A handful of patterns is
/// the SIMD (Teddy) searcher's home ground; aho-corasick's own prefilter choice (rare
/// bytes) is four times slower on binary bodies, so it is only the fallback for machines
/// without SIMD or sets too large for Teddy.
#[derive(Debug)]
enum Matcher {
    Packed(packed::Searcher),
    Automaton(AhoCorasick),
}

impl Matcher {
    fn new(patterns: &[Vec<u8>]) -> Option<Matcher> {
        let packed = packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostLongest)
            .builder()
            .extend(patterns)
            .build();
        match packed {
            Some(s) => Some(Matcher::Packed(s)),
            None => {
                let ac =
                    AhoCorasick::builder().match_kind(MatchKind::LeftmostLongest).build(patterns).ok()?;
                Some(Matcher::Automaton(ac))
            }
        }
    }

    fn find(&self, buf: &[u8], at: usize) -> Option<Range<usize>> {
        match self {
            Matcher::Packed(s) => s.find_in(buf, Span::from(at..buf.len())).map(|m| m.range()),
            Matcher::Automaton(ac) => ac.find(Input::new(buf).span(at..buf.len())).map(|m| m.range()),
        }
    }
}

/// A matcher for a set of secrets' forms.
#[derive(Debug)]
pub struct Redactor {
    matcher: Matcher,
    /// The forms, ASCII case-insensitively: header names arrive lowercased, and a
    /// lowercased secret still gives most of it away.
    names: AhoCorasick,
    /// Bytes any form can consist of, escaped or not.
    alphabet: [bool; 256],
    /// The most bytes a form can take in a response: the longest form, every byte escaped.
    span: usize,
    /// The forms themselves, for outbound scanning's quick pass (`dlp::quick`).
    forms: Vec<Zeroizing<Vec<u8>>>,
}

impl Redactor {
    /// `None` when there is nothing long enough to look for.
    pub fn new(secrets: &[Secret]) -> Option<Redactor> {
        let mut patterns: Vec<Vec<u8>> = secrets.iter().flat_map(|s| forms(s.expose().as_bytes())).collect();
        patterns.sort();
        patterns.dedup();
        if patterns.is_empty() {
            return None;
        }
        let matcher = Matcher::new(&patterns)?;
        let names = AhoCorasick::builder().ascii_case_insensitive(true).build(&patterns).ok()?;
        let mut alphabet = base_alphabet();
        for b in patterns.iter().flatten() {
            alphabet[usize::from(*b)] = true;
        }
        let span = ESCAPE_WIDTH * patterns.iter().map(Vec::len).max().unwrap_or(0);
        let forms = patterns.into_iter().map(Zeroizing::new).collect();
        Some(Redactor { matcher, names, alphabet, span, forms })
    }

    /// Mask every occurrence in place; returns how many were masked.
    pub fn mask(&self, buf: &mut [u8]) -> usize {
        fill(buf, &find(std::iter::once(self), buf))
    }

    fn find_plain(&self, buf: &[u8], out: &mut Vec<Range<usize>>) {
        // Every match start is found: after a match the search resumes one byte on, so a
        // form overlapping an earlier one is masked too.
        let mut at = 0;
        while let Some(m) = self.matcher.find(buf, at) {
            at = m.start + 1;
            out.push(m);
        }
    }

    /// Every form looked for.
    pub(crate) fn forms(&self) -> impl Iterator<Item = &[u8]> {
        self.forms.iter().map(|f| &f[..])
    }

    /// Does a header name hold a secret (in any letter case)?
    pub fn names_secret(&self, name: &[u8]) -> bool {
        self.names.is_match(name)
    }

    /// How many trailing bytes of `buf` to hold back: the trailing run of alphabet bytes,
    /// shorter than the widest form — whatever those bytes are.
    pub fn holdback(&self, buf: &[u8]) -> usize {
        holdback(buf, &self.alphabet, self.span)
    }
}

fn fill(buf: &mut [u8], ranges: &[Range<usize>]) -> usize {
    for r in ranges {
        buf[r.clone()].fill(MASK);
    }
    ranges.len()
}

fn holdback(buf: &[u8], alphabet: &[bool; 256], span: usize) -> usize {
    let cap = span.saturating_sub(1);
    buf.iter().rev().take(cap).take_while(|b| alphabet[usize::from(**b)]).count()
}

/// Every occurrence of the members' forms in `buf`, found on the unmasked bytes (one
/// secret's mask never hides another secret's occurrence). Forms with `\uXXXX` escapes
/// (any character, either hex case, mixed with `\/` and the other JSON escapes): a
/// buffer holding a `\u` escape is searched once more with its escapes decoded, and each
/// match is mapped back onto the bytes it came from. A buffer without one costs a
/// single SIMD substring scan more.
fn find<'a>(members: impl Iterator<Item = &'a Redactor> + Clone, buf: &[u8]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    for m in members.clone() {
        m.find_plain(buf, &mut out);
    }
    if has_unicode_escape(buf) {
        // Decoding starts at the buffer's first byte: a buffer that begins inside an
        // escape misreads that one escape, and what it hides is literal text, which the
        // plain search above has seen.
        let mut decoded = Decoded::default();
        decoded.decode(buf);
        let mut found = Vec::new();
        for m in members {
            m.find_plain(&decoded.text, &mut found);
        }
        out.extend(found.iter().map(|r| decoded.source(r)));
    }
    out
}

fn has_unicode_escape(buf: &[u8]) -> bool {
    // Built once: `memmem::find_iter` builds its searcher on every call (a few hundred
    // instructions), and this runs on every response chunk and scanned header value.
    static ESCAPE: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b"\\u"));
    ESCAPE
        .find_iter(buf)
        .any(|at| buf.get(at + 2..at + 6).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)))
}

/// Text with its JSON (or percent) escapes decoded, and where each escape came from.
/// Outbound scanning (`crate::dlp`) reads requests through it too.
#[derive(Default)]
pub(crate) struct Decoded {
    pub(crate) text: Vec<u8>,
    /// One per escape, in order: (start in `text`, decoded length, start in the
    /// source, source length). Bytes between escapes are copied one for one.
    escapes: Vec<(usize, usize, usize, usize)>,
}

impl Decoded {
    /// JSON string unescaping of `src`; what is not a valid escape is copied as it is.
    pub(crate) fn decode(&mut self, src: &[u8]) {
        self.text.clear();
        self.escapes.clear();
        self.text.reserve(src.len());
        let mut i = 0;
        loop {
            // Escape-dense text (`\u4f60\u597d…`) meets the next backslash at once.
            let at = match src.get(i) {
                Some(b'\\') => i,
                Some(_) => match memchr::memchr(b'\\', &src[i..]) {
                    Some(n) => i + n,
                    None => break,
                },
                None => break,
            };
            self.text.extend_from_slice(&src[i..at]);
            match escape_at(&src[at..]) {
                Some((c, used)) => {
                    let mut utf8 = [0u8; 4];
                    let bytes = c.encode_utf8(&mut utf8).as_bytes();
                    self.escapes.push((self.text.len(), bytes.len(), at, used));
                    self.text.extend_from_slice(bytes);
                    i = at + used;
                }
                None => {
                    self.text.push(b'\\');
                    i = at + 1;
                }
            }
        }
        self.text.extend_from_slice(&src[i..]);
    }

    /// Percent-decoding of `src` (`%XX`); what is not a valid escape is copied as it is.
    pub(crate) fn decode_percent(&mut self, src: &[u8]) {
        self.text.clear();
        self.escapes.clear();
        self.text.reserve(src.len());
        let mut i = 0;
        while let Some(n) = memchr::memchr(b'%', &src[i..]) {
            let at = i + n;
            self.text.extend_from_slice(&src[i..at]);
            let hex = src.get(at + 1..at + 3).map(|h| (HEX[usize::from(h[0])], HEX[usize::from(h[1])]));
            match hex {
                Some((a, b)) if (a | b) & 0x10 == 0 => {
                    self.escapes.push((self.text.len(), 1, at, 3));
                    self.text.push(a << 4 | b);
                    i = at + 3;
                }
                _ => {
                    self.text.push(b'%');
                    i = at + 1;
                }
            }
        }
        self.text.extend_from_slice(&src[i..]);
    }

    /// Were any escapes decoded?
    pub(crate) fn changed(&self) -> bool {
        !self.escapes.is_empty()
    }

    /// The source range decoded range `r` came from (escapes it touches count whole).
    pub(crate) fn source(&self, r: &Range<usize>) -> Range<usize> {
        self.source_of(r.start, false)..self.source_of(r.end - 1, true)
    }

    /// Where decoded byte `d` starts (or, with `end`, ends) in the source.
    fn source_of(&self, d: usize, end: bool) -> usize {
        // The last escape starting at or before `d`.
        let n = self.escapes.partition_point(|e| e.0 <= d);
        let Some(&(text, len, src, used)) = n.checked_sub(1).map(|k| &self.escapes[k]) else {
            return d + usize::from(end);
        };
        if d < text + len {
            return if end { src + used } else { src };
        }
        src + used + (d - text - len) + usize::from(end)
    }
}

/// The character a JSON escape at the start of `s` stands for, and its length.
fn escape_at(s: &[u8]) -> Option<(char, usize)> {
    let c = match *s.get(1)? {
        b'"' => '"',
        b'\\' => '\\',
        b'/' => '/',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        b'u' => return unicode_escape(s),
        _ => return None,
    };
    Some((c, 2))
}

/// `\uXXXX`, or a surrogate pair `\uD8xx\uDCxx`; a lone surrogate is no character.
fn unicode_escape(s: &[u8]) -> Option<(char, usize)> {
    let unit = hex4(s.get(2..6)?)?;
    if !(0xD800..0xDC00).contains(&unit) {
        return Some((char::from_u32(unit)?, 6));
    }
    let low = s.get(6..8).filter(|e| e == b"\\u").and_then(|_| hex4(s.get(8..12)?))?;
    if !(0xDC00..0xE000).contains(&low) {
        return None;
    }
    Some((char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))?, 12))
}

fn hex4(h: &[u8]) -> Option<u32> {
    let [a, b, c, d] = *h else { return None };
    let (a, b, c, d) = (HEX[usize::from(a)], HEX[usize::from(b)], HEX[usize::from(c)], HEX[usize::from(d)]);
    if (a | b | c | d) & 0x10 != 0 {
        return None;
    }
    Some(u32::from(a) << 12 | u32::from(b) << 8 | u32::from(c) << 4 | u32::from(d))
}

/// Hex digit values; 0x10 marks a byte that is not one.
const HEX: [u8; 256] = {
    let mut t = [0x10u8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// The redactors that apply to one response (every credential naming its host), with
/// what they hold back combined.
///
/// Shared: a credential's cache keeps its set of one, and every response masked with it
/// holds a reference rather than a copy of the 256-entry alphabet.
#[derive(Debug, Clone)]
pub struct Set(Arc<Members>);

#[derive(Debug)]
struct Members {
    members: Vec<Arc<Redactor>>,
    alphabet: [bool; 256],
    span: usize,
}

impl Set {
    /// `None` when there is nothing to mask.
    pub fn new(members: Vec<Arc<Redactor>>) -> Option<Set> {
        let mut alphabet = members.first()?.alphabet;
        for m in &members[1..] {
            for (a, b) in alphabet.iter_mut().zip(m.alphabet.iter()) {
                *a |= *b;
            }
        }
        let span = members.iter().map(|m| m.span).max().unwrap_or(0);
        Some(Set(Arc::new(Members { members, alphabet, span })))
    }

    /// Mask every member's secrets in place; returns how many occurrences were masked.
    pub fn mask(&self, buf: &mut [u8]) -> usize {
        fill(buf, &find(self.0.members.iter().map(|m| &**m), buf))
    }

    /// A masked copy of `buf` when it holds a secret; `None` (and no copy) when not.
    pub fn masked(&self, buf: &[u8]) -> Option<Vec<u8>> {
        let found = find(self.0.members.iter().map(|m| &**m), buf);
        if found.is_empty() {
            return None;
        }
        let mut copy = buf.to_vec();
        fill(&mut copy, &found);
        Some(copy)
    }

    pub fn names_secret(&self, name: &[u8]) -> bool {
        self.0.members.iter().any(|m| m.names_secret(name))
    }

    pub(crate) fn members(&self) -> &[Arc<Redactor>] {
        &self.0.members
    }

    /// How many occurrences of the members' secrets `buf` holds (nothing is masked).
    pub fn count(&self, buf: &[u8]) -> usize {
        find(self.0.members.iter().map(|m| &**m), buf).len()
    }

    pub fn holdback(&self, buf: &[u8]) -> usize {
        holdback(buf, &self.0.alphabet, self.0.span)
    }
}

thread_local! {
    /// [`joined_by_nul`]'s buffer, zeroed after each use.
    static JOINED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Header values (and a request target) in one buffer, each followed by NUL: a byte none
/// of them can hold, which ends every escape and base64 run. A search over the result
/// finds whatever it finds in any one part (each is a substring), so "nothing here"
/// answers for every part at once; a find spanning a NUL is only a false alarm, which
/// callers answer by searching part by part.
///
/// Read by `read` in a buffer the thread keeps: asked of every head, it allocates
/// nothing once the thread has read one head of this size.
pub(crate) fn joined_by_nul<'a, R>(
    parts: impl Iterator<Item = &'a [u8]>,
    read: impl FnOnce(&[u8]) -> R,
) -> R {
    /// A buffer grown past this (a head of many large values) is not kept.
    const KEEP: usize = 16 * 1024;
    let join = |joined: &mut Vec<u8>| {
        for part in parts {
            joined.extend_from_slice(part);
            joined.push(0);
        }
    };
    JOINED.with(|cell| {
        let Ok(mut joined) = cell.try_borrow_mut() else {
            // Asked again from inside `read`: a buffer of its own.
            let mut own = Zeroizing::new(Vec::new());
            join(&mut own);
            return read(&own);
        };
        joined.clear();
        join(&mut joined);
        let out = read(&joined);
        // What was read may hold a secret an upstream echoed: not left in the buffer.
        zeroize::Zeroize::zeroize(joined.as_mut_slice());
        if joined.capacity() > KEEP {
            *joined = Vec::new();
        }
        out
    })
}

/// The redactors of credentials `naming` (those that name a response's host, found by
/// `Policy::naming_host` in `config`); `None`: nothing to mask.
pub fn for_credentials(config: &crate::config::Config, naming: &[usize]) -> Option<Set> {
    if let [one] = naming {
        let c = config.credentials.get(*one)?;
        return c.redactor.alone(|out| c.injector.secrets(out));
    }
    let members = naming
        .iter()
        .filter_map(|&i| config.credentials.get(i))
        .filter_map(|c| c.redactor.get(|out| c.injector.secrets(out)))
        .collect();
    Set::new(members)
}

/// Redaction over a stream of chunks.
#[derive(Debug)]
pub struct Stream {
    set: Set,
    carry: BytesMut,
    /// The held bytes and the start of a large chunk, searched together (`push_beside`).
    seam: Vec<u8>,
    /// Set for gRPC bodies: the message framing, so nothing is held past a message's end.
    grpc: Option<GrpcMessages>,
}

/// What a chunk pushed releases, in order: the bytes, and a second piece when a large
/// chunk was released beside the held bytes before it rather than joined to them.
pub type Released = (Bytes, Option<Bytes>);

impl Stream {
    pub fn new(set: Set) -> Self {
        Stream { set, carry: BytesMut::new(), seam: Vec::new(), grpc: None }
    }

    /// The redactors this stream masks with (a body's trailers are masked with them too).
    pub fn set(&self) -> &Set {
        &self.set
    }

    /// A stream of gRPC length-prefixed messages. A message is complete in itself, and
    /// a bidirectional call waits for it: at a message's end everything is released.
    /// That point comes from the message lengths, never from a secret.
    pub fn grpc(set: Set) -> Self {
        Stream { grpc: Some(GrpcMessages::default()), ..Stream::new(set) }
    }

    /// Add a chunk; returns what can be released now.
    pub fn push(&mut self, mut chunk: Bytes) -> Released {
        let message_end = self.grpc.as_mut().is_some_and(|g| g.feed(&chunk));
        if self.is_clean(&chunk) {
            // What `carry` would have been, searched in place: released without a copy,
            // all but its tail (a download's every byte went through `carry` before).
            let keep = if message_end { 0 } else { self.set.holdback(&chunk) };
            self.carry.extend_from_slice(&chunk.split_off(chunk.len() - keep));
            return (chunk, None);
        }
        if !message_end && !self.carry.is_empty() && chunk.len() >= self.set.0.span {
            return self.push_beside(chunk);
        }
        self.carry.extend_from_slice(&chunk);
        self.set.mask(&mut self.carry);
        let keep = if message_end { 0 } else { self.set.holdback(&self.carry) };
        (self.carry.split_to(self.carry.len() - keep).freeze(), None)
    }

    /// A chunk at least as wide as the widest form, after held bytes (almost every chunk
    /// of a binary download: its last byte is nearly always in the alphabet). A form
    /// that began in the held bytes ends within the chunk's first `span - 1` bytes, so
    /// only those are joined to them to be searched, and the chunk goes on as it came
    /// instead of being copied behind them. Released as two pieces — the held bytes,
    /// then the chunk less its own held tail — whether or not anything was masked: the
    /// pieces' lengths come from the lengths and the alphabet alone, never the secret.
    fn push_beside(&mut self, mut chunk: Bytes) -> Released {
        let held = self.carry.len();
        let keep = self.set.holdback(&chunk);
        self.seam.clear();
        self.seam.extend_from_slice(&self.carry);
        self.seam.extend_from_slice(&chunk[..self.set.0.span.saturating_sub(1)]);
        let clean = self.set.count(&self.seam) == 0 && self.set.count(&chunk) == 0;
        // Response bytes, perhaps an echoed secret: not left lying in a kept buffer.
        self.seam.fill(0);
        self.seam.clear();
        if clean {
            let tail = chunk.split_off(chunk.len() - keep);
            let before = self.carry.split().freeze();
            self.carry.extend_from_slice(&tail);
            return (before, Some(chunk));
        }
        // Something to mask: searched joined, as every chunk once was.
        self.carry.extend_from_slice(&chunk);
        self.set.mask(&mut self.carry);
        let before = self.carry.split_to(held).freeze();
        let rest = self.carry.split_to(self.carry.len() - keep).freeze();
        (before, Some(rest))
    }

    /// Add the last chunk (the body says it is over): everything is released.
    pub fn push_last(&mut self, chunk: Bytes) -> Bytes {
        if self.is_clean(&chunk) {
            return chunk;
        }
        self.carry.extend_from_slice(&chunk);
        self.set.mask(&mut self.carry);
        self.finish()
    }

    /// Nothing is held back and `chunk` holds no secret: it needs no masking and no
    /// joining to what came before.
    fn is_clean(&self, chunk: &[u8]) -> bool {
        self.carry.is_empty() && self.set.count(chunk) == 0
    }

    /// Bytes held back, not yet released.
    pub fn held(&self) -> usize {
        self.carry.len()
    }

    /// End of stream: release what was held back (it can no longer become a form).
    pub fn finish(&mut self) -> Bytes {
        self.carry.split().freeze()
    }
}

/// Where gRPC messages (a flag byte, a 4-byte big-endian length, the message) end.
#[derive(Debug, Default)]
pub(crate) struct GrpcMessages {
    /// Prefix bytes of the next message seen so far.
    prefix: Vec<u8>,
    /// Bytes of the current message still to come.
    remaining: u64,
}

impl GrpcMessages {
    /// Follow `data`; true when it ends exactly where a message ends.
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = data.len().min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = data.len().min(5 - self.prefix.len());
            self.prefix.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.prefix.len() == 5 {
                let len = [self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]];
                self.remaining = u64::from(u32::from_be_bytes(len));
                self.prefix.clear();
            }
        }
        self.prefix.is_empty() && self.remaining == 0
    }
}

#[cfg(test)]
mod tests {
    /// What was joined does not stay in the thread's buffer: a response head that echoed
    /// a secret leaves zeros behind, nested calls included.
    #[test]
    fn the_joined_buffer_is_zeroed_after_reading() {
        let parts = [&b"token sk-live-0123456789"[..], b"x"];
        let inner = super::joined_by_nul(parts.into_iter(), |outer| {
            assert_eq!(outer, b"token sk-live-0123456789\0x\0");
            super::joined_by_nul(parts.into_iter(), |nested| nested.len())
        });
        assert_eq!(inner, 27);
        super::JOINED.with(|buf| {
            let buf = buf.borrow();
            assert_eq!(buf.len(), 27, "kept for the next head, zeroed");
            assert!(buf.iter().all(|b| *b == 0), "{buf:?}");
        });
    }

    use super::*;
    use proptest::prelude::*;

    const SECRET: &str = "sk-ant-api03-REALsecretVALUE_xyz";

    fn redactor() -> Redactor {
        Redactor::new(&[Secret::new(SECRET.into())]).unwrap()
    }

    fn stream() -> Stream {
        Stream::new(Set::new(vec![Arc::new(redactor())]).unwrap())
    }

    /// `Stream::push` of a copy of `chunk`: what it released, both pieces joined.
    fn push(s: &mut Stream, chunk: &[u8]) -> Bytes {
        match s.push(Bytes::copy_from_slice(chunk)) {
            (out, None) => out,
            (first, Some(then)) => [first, then].concat().into(),
        }
    }

    /// `text` pushed cut at `cuts` (any positions, wrapped into it), then finished: all
    /// that was released.
    fn pushed_in_pieces(text: &[u8], cuts: Vec<usize>) -> Vec<u8> {
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (text.len() + 1)).collect();
        cuts.sort();
        let mut s = stream();
        let mut out = Vec::new();
        let mut last = 0;
        for c in cuts.into_iter().chain([text.len()]) {
            out.extend_from_slice(&push(&mut s, &text[last..c]));
            last = c;
        }
        out.extend_from_slice(&s.finish());
        out
    }

    /// The lengths of the pieces `chunks` are released in, and the text released.
    fn pieces(chunks: &[&[u8]]) -> (Vec<usize>, Vec<u8>) {
        let mut s = stream();
        let (mut lengths, mut text) = (Vec::new(), Vec::new());
        let mut release = |b: Bytes| {
            lengths.push(b.len());
            text.extend_from_slice(&b);
        };
        for chunk in chunks {
            let (out, then) = s.push(Bytes::copy_from_slice(chunk));
            release(out);
            then.into_iter().for_each(&mut release);
        }
        release(s.finish());
        (lengths, text)
    }

    #[test]
    fn a_large_chunk_after_held_bytes_goes_on_as_it_came() {
        let span = stream().set.0.span;
        let mut s = stream();
        let (out, _) = s.push(Bytes::from_static(b"{\"a\": \"held-at-the-end"));
        assert_eq!(out, Bytes::from_static(b"{\"a\": \""), "the alphabet run is held");
        let chunk = Bytes::from(format!("{}\", \"b\": tail", "x".repeat(span)));
        let (before, then) = s.push(chunk.clone());
        assert_eq!(before, Bytes::from_static(b"held-at-the-end"));
        let then = then.expect("the chunk as a second piece");
        assert_eq!(then.as_ptr(), chunk.as_ptr(), "not copied");
        assert_eq!(then, chunk.slice(..chunk.len() - 4), "less its own held tail");
        assert_eq!(s.finish(), Bytes::from_static(b"tail"));
    }

    #[test]
    fn pieces_are_the_same_for_a_secret_and_a_wrong_guess_of_its_length() {
        let span = stream().set.0.span;
        let wrong = SECRET.replace("REAL", "FAKE");
        let (mut seen, mut masked) = (None, 0);
        for echoed in [SECRET, &wrong] {
            // The echo starts in the held tail of one chunk and ends in the next.
            let first = format!("{}\n{}", "a".repeat(span), &echoed[..10]);
            let second = format!("{}{}\n", &echoed[10..], "b".repeat(2 * span));
            let (lengths, text) = pieces(&[first.as_bytes(), second.as_bytes()]);
            assert!(!String::from_utf8_lossy(&text).contains("REALsecret"));
            masked += usize::from(text.windows(SECRET.len()).any(|w| w.iter().all(|b| *b == MASK)));
            assert_eq!(*seen.get_or_insert(lengths.clone()), lengths, "{echoed}");
        }
        assert_eq!(masked, 1, "the secret was masked and the guess was not");
    }

    fn whole(text: &[u8]) -> Vec<u8> {
        let mut s = stream();
        let mut out = push(&mut s, text).to_vec();
        out.extend_from_slice(&s.finish());
        out
    }

    #[test]
    fn every_form_is_masked_same_length() {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("user:{SECRET}"));
        let url = crate::inject::encode_component(SECRET);
        let json = format!(r#"{{"echo":"{}"}}"#, SECRET.replace('/', "\\/"));
        for text in [
            format!("key={SECRET}&x=1"),
            format!("Basic {b64}"),
            format!("q={url}"),
            json,
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("ab{SECRET}cd")),
        ] {
            let out = whole(text.as_bytes());
            assert_eq!(out.len(), text.len());
            let out = String::from_utf8(out).unwrap();
            assert!(!out.contains(SECRET), "{out}");
            assert!(out.contains("********"), "{text} → {out}");
        }
        assert_eq!(whole(b"nothing to see"), b"nothing to see");
    }

    #[test]
    fn overlapping_occurrences_are_all_masked() {
        let r = Redactor::new(&[Secret::new("abababababab".into())]).unwrap();
        let mut text = b"xabababababababab!".to_vec();
        r.mask(&mut text);
        assert_eq!(text, b"x****************!");
    }

    #[test]
    fn the_fallback_matcher_finds_what_the_packed_one_finds() {
        let patterns = forms(SECRET.as_bytes());
        let Some(Matcher::Packed(_)) = Matcher::new(&patterns) else { panic!("SIMD searcher expected here") };
        let packed = Matcher::new(&patterns).unwrap();
        let ac = AhoCorasick::builder().match_kind(MatchKind::LeftmostLongest).build(&patterns).unwrap();
        let fallback = Matcher::Automaton(ac);
        let b64 = base64::engine::general_purpose::STANDARD.encode(SECRET);
        let text = format!("a{SECRET}b {b64} {SECRET}{SECRET}");
        for at in 0..text.len() {
            assert_eq!(packed.find(text.as_bytes(), at), fallback.find(text.as_bytes(), at), "from {at}");
        }
    }

    #[test]
    fn rotated_out_values_stay_masked() {
        let cache = Cache::default();
        let old = Secret::new("old-secret-value-111".into());
        let new = Secret::new("new-secret-value-222".into());
        cache.get(|out| out.push(old.clone())).unwrap();
        let r = cache.get(|out| out.push(new.clone())).unwrap();
        let mut text = b"old-secret-value-111 new-secret-value-222".to_vec();
        assert_eq!(r.mask(&mut text), 2, "{}", String::from_utf8_lossy(&text));
        assert!(
            Arc::ptr_eq(&r, &cache.get(|out| out.push(new)).unwrap()),
            "unchanged values reuse the automaton"
        );
    }

    #[test]
    fn what_is_held_back_does_not_depend_on_the_secret() {
        let mut s = stream();
        assert_eq!(&push(&mut s, b"data: hello\n\n")[..], b"data: hello\n\n", "SSE events are not delayed");
        assert_eq!(&push(&mut s, b"{\"a\":\"b\"}")[..], b"{\"a\":\"b\"}", "nor JSON records");
        // A possible start of the secret and a certain non-start are held alike.
        for guess in ["sk-ant-api0", "sk-ant-XXX0", "zzzzzzzzzz0"] {
            let mut s = stream();
            let out = push(&mut s, format!("echo: @{guess}").as_bytes());
            assert_eq!(&out[..], b"echo: ", "{guess}");
            assert_eq!(s.held(), guess.len() + 1);
        }
        let mut s = stream();
        let out = push(&mut s, b"data: sk-ant-api0");
        assert_eq!(&out[..], b"data: ");
        let out = push(&mut s, b"3-REALsecretVALUE_xyz!\n");
        assert_eq!(out.len(), SECRET.len() + 2);
        assert!(!String::from_utf8_lossy(&out).contains("REAL"));
    }

    #[test]
    fn grpc_messages_are_released_whole_at_their_end() {
        let message = |payload: &[u8]| {
            let mut m = vec![0u8];
            m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            m.extend_from_slice(payload);
            m
        };
        let mut s = Stream::grpc(Set::new(vec![Arc::new(redactor())]).unwrap());
        let first = message(b"pong:ping0");
        assert_eq!(&push(&mut s, &first[..7])[..], &first[..5], "inside a message: held as usual");
        assert_eq!(&push(&mut s, &first[7..])[..], &first[7 - 2..], "at its end: all of it");
        let second = message(format!("echo {SECRET}").as_bytes());
        let mut out = push(&mut s, &second[..20]).to_vec();
        out.extend_from_slice(&push(&mut s, &second[20..]));
        assert_eq!(out.len(), second.len());
        assert!(!String::from_utf8_lossy(&out).contains("REAL"), "masked across chunks");
        assert_eq!(&push(&mut s, &message(b""))[..], &message(b"")[..], "an empty message ends too");
    }

    #[test]
    fn a_long_run_is_held_only_up_to_the_widest_form() {
        let r = redactor();
        let widest = r.span;
        let text = vec![b'x'; widest * 3];
        assert_eq!(r.holdback(&text), widest - 1);
        let mut s = stream();
        assert_eq!(push(&mut s, &text).len(), text.len() - (widest - 1));
    }

    #[test]
    fn unicode_escaped_forms_are_masked() {
        let r = redactor();
        let escape = |c: char, upper: bool| {
            let hex = format!("{:04x}", c as u32);
            format!("\\u{}", if upper { hex.to_uppercase() } else { hex })
        };
        let every: String = SECRET.chars().map(|c| escape(c, true)).collect();
        let some: String = SECRET
            .chars()
            .enumerate()
            .map(|(i, c)| if i % 3 == 0 { escape(c, i % 2 == 0) } else { c.to_string() })
            .collect();
        let one = format!("{}{}", escape(SECRET.chars().next().unwrap(), false), &SECRET[1..]);
        for escaped in [every, some, one] {
            let text = format!(r#"{{"model":"{escaped}","n":1}}"#);
            let mut bytes = text.clone().into_bytes();
            assert!(r.mask(&mut bytes) >= 1, "{text}");
            let out = String::from_utf8(bytes).unwrap();
            assert_eq!(out.len(), text.len());
            let decoded: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert!(!decoded["model"].as_str().unwrap().contains("REALsecret"), "{out}");
            assert!(out.starts_with(r#"{"model":""#) && out.ends_with(r#"","n":1}"#), "only the form: {out}");
        }
        // A JSON-escaped backslash before `u` is no escape: nothing decodes there.
        let mut plain = br#"path \\u0041 and \u00e9t\u00E9"#.to_vec();
        assert_eq!(r.mask(&mut plain), 0);
    }

    #[test]
    fn escapes_decode_as_json_does() {
        let mut d = Decoded::default();
        let src = br#"a\u0042\/\\u\ud83d\ude00\ud800x\q"#;
        d.decode(src);
        assert_eq!(String::from_utf8(d.text.clone()).unwrap(), "aB/\\u\u{1F600}\\ud800x\\q");
        // Decoded "B/" is source "\u0042\/"; the emoji's four bytes are its twelve.
        assert_eq!(d.source(&(1..3)), 1..9);
        assert_eq!(d.source(&(5..9)), 12..24);
        assert_eq!(d.source(&(6..7)), 12..24, "part of an escape maps to all of it");
        assert_eq!(d.source(&(0..1)), 0..1);
        assert_eq!(d.source(&(9..d.text.len())), 24..src.len());
    }

    proptest! {
        /// Large chunks too (released beside the held bytes): whatever the chunking and
        /// wherever the forms fall, none gets through and nothing else changes.
        #[test]
        fn no_chunking_of_a_long_body_lets_a_secret_through(
            segments in proptest::collection::vec(
                (1usize..900, any::<proptest::sample::Index>(), proptest::option::of(0usize..200)),
                1..6,
            ),
            mut cuts in proptest::collection::vec(0usize..6000, 0..8),
        ) {
            let mut forms = forms(SECRET.as_bytes());
            // The widest a form can be: every character a `\uXXXX` escape.
            forms.push(SECRET.chars().flat_map(|c| format!("\\u{:04x}", c as u32).into_bytes()).collect());
            let mut text = Vec::new();
            for (i, (pad, form, cut_into)) in segments.iter().enumerate() {
                text.extend(std::iter::repeat_n(b"az09-_"[i % 6], *pad));
                // Cut inside the form as well as anywhere: where a chunk ends in a form.
                cuts.extend(cut_into.map(|at| text.len() + at));
                text.extend_from_slice(&forms[form.index(forms.len())]);
            }
            let out = pushed_in_pieces(&text, cuts);
            prop_assert_eq!(out.len(), text.len());
            for f in &forms {
                prop_assert!(!out.windows(f.len()).any(|w| w == &f[..]));
            }
            let kept = text.iter().zip(&out).filter(|(a, b)| a == b || **b == MASK).count();
            prop_assert_eq!(kept, text.len(), "only masks differ");
        }

        /// Whatever the chunking, no form of the secret gets through.
        #[test]
        fn no_chunking_lets_a_secret_through(
            before in "[ -~]{0,40}",
            after in "[ -~]{0,40}",
            cuts in proptest::collection::vec(0usize..200, 0..8),
            which in 0usize..5,
            escaped in proptest::collection::vec(any::<bool>(), SECRET.len()),
        ) {
            let form = match which {
                0 => SECRET.to_string(),
                1 => base64::engine::general_purpose::STANDARD.encode(format!("x{SECRET}")),
                2 => crate::inject::encode_component(SECRET),
                3 => format!("\"{SECRET}\""),
                _ => SECRET
                    .chars()
                    .zip(&escaped)
                    .map(|(c, e)| if *e { format!("\\u{:04X}", c as u32) } else { c.to_string() })
                    .collect(),
            };
            let text = format!("{before}{form}{after}");
            let bytes = text.as_bytes();
            let out = pushed_in_pieces(bytes, cuts);
            prop_assert_eq!(out.len(), bytes.len());
            let out = String::from_utf8_lossy(&out).into_owned();
            prop_assert!(!out.contains(SECRET));
            prop_assert!(!out.contains("REALsecret"), "no part of an escaped form: {}", out);
            for f in forms(SECRET.as_bytes()) {
                prop_assert!(!out.as_bytes().windows(f.len()).any(|w| w == &f[..]));
            }
        }
    }
}
