//! Outbound scanning (`[proxy.dlp]`, docs/dlp.md): finding secrets in what a client
//! sends — latchkey's own live secrets in every form the response redactor knows, the
//! bundled high-confidence formats, and the user's rules — in the request target,
//! headers, body, WebSocket messages and gRPC messages.
//!
//! This module finds; it does not decide. What a finding means for a request (block,
//! redact, warn, or allowed to this host) is `policy::dlp`'s pure verdict; the exchange
//! phase that asks it is `proxy::exchange::dlp`.
//!
//! A buffer is read through the views an agent could hide a secret behind, each built
//! only when the buffer can hold it: JSON string escapes decoded, then percent-escapes
//! decoded, then every long run of base64 (either alphabet) decoded at each alignment.
//! A match in a view is mapped back onto the bytes it came from, so `redact` masks
//! exactly those (same length: JSON stays valid, `Content-Length` stays right).

pub mod decode;
pub mod quick;
pub mod rules;
pub mod stream;

use std::ops::Range;
use std::sync::{Arc, LazyLock};

use aho_corasick::{AhoCorasick, Input, MatchKind, Span, packed};
use base64::Engine;
use memchr::memmem;

use crate::redact::{Decoded, Set};
use rules::{Check, Extra, UserMatch};

/// `[proxy.dlp]` when enabled.
#[derive(Debug)]
pub struct Settings {
    pub scanner: Scanner,
    /// Request body bytes held and scanned whole before anything is forwarded.
    pub hold_bytes: usize,
    /// The quick pass over held bodies, for the own secrets in force.
    pub quick: quick::Cache,
}

impl Settings {
    pub fn new(scanner: Scanner, hold_bytes: usize) -> Settings {
        Settings { scanner, hold_bytes, quick: quick::Cache::default() }
    }
}

/// A `[[proxy.dlp.rule]]` checked and compiled; `Err` says what is wrong with it.
pub fn user_rule(r: &crate::config::raw::RawDlpRule, builtin: bool) -> Result<UserRule, String> {
    let valid =
        !r.id.is_empty() && r.id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err(format!("{:?}: an id is lowercase letters, digits and '-'", r.id));
    }
    if r.id == rules::OWN_SECRET || (builtin && rules::BUILTIN_IDS.contains(&r.id.as_str())) {
        return Err(format!("{:?} is a bundled rule's id already", r.id));
    }
    let matcher = match (&r.regex, &r.literal) {
        (Some(re), None) => {
            UserMatch::Regex(regex::bytes::Regex::new(re).map_err(|e| format!("{}: bad regex: {e}", r.id))?)
        }
        (None, Some(l)) if l.len() >= 4 => UserMatch::Literal(l.as_bytes().to_vec()),
        (None, Some(_)) => return Err(format!("{}: a literal needs at least 4 bytes", r.id)),
        _ => return Err(format!("{}: set exactly one of `regex` and `literal`", r.id)),
    };
    if let UserMatch::Regex(re) = &matcher
        && re.is_match(b"")
    {
        return Err(format!("{}: the regex matches the empty string", r.id));
    }
    Ok(UserRule { id: r.id.clone(), matcher })
}

/// A user's rule as the config compiled it.
#[derive(Debug)]
pub struct UserRule {
    pub id: String,
    pub matcher: UserMatch,
}

/// Where a literal found by the first pass leads.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// A bundled check, by index.
    Check(usize),
    /// A user's literal: the match is the literal itself.
    Literal { rule: usize, len: usize },
}

/// The compiled rules (no secret in them: own secrets are handed in per request).
#[derive(Debug)]
pub struct Scanner {
    /// Rule ids by index: the bundled ones (when on) first, then the user's.
    pub ids: Vec<Arc<str>>,
    checks: Vec<Check>,
    literals: Option<Literals>,
    /// Each literal and where it leads (a literal may start several rules' matches).
    patterns: Vec<(Vec<u8>, Target)>,
    regexes: Vec<(usize, regex::bytes::Regex)>,
}

/// One rule match: its rule, and the bytes it covers (an AWS key id and its secret are
/// one match in two places).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub rule: usize,
    pub range: Range<usize>,
    pub also: Option<Range<usize>>,
}

/// What a scan found: own secrets (counted) and rule matches.
#[derive(Debug, Default, Clone)]
pub struct Findings {
    pub own: usize,
    pub hits: Vec<Hit>,
}

impl Findings {
    pub fn is_empty(&self) -> bool {
        self.own == 0 && self.hits.is_empty()
    }

    pub fn extend(&mut self, other: Findings) {
        self.own += other.own;
        self.hits.extend(other.hits);
    }
}

/// Shortest base64 run decoded: 27 characters hold 20 bytes, the shortest bundled match.
const MIN_BASE64_RUN: usize = 27;

impl Scanner {
    pub fn new(builtin: bool, user: Vec<UserRule>) -> Result<Scanner, String> {
        let mut ids: Vec<Arc<str>> = Vec::new();
        let checks = if builtin {
            ids.extend(rules::BUILTIN_IDS.iter().map(|s| Arc::from(*s)));
            rules::builtin_checks()
        } else {
            Vec::new()
        };
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        let mut targets = Vec::new();
        for (i, c) in checks.iter().enumerate() {
            for l in c.literals {
                patterns.push(l.as_bytes().to_vec());
                targets.push(Target::Check(i));
            }
        }
        let mut regexes = Vec::new();
        for u in user {
            let rule = ids.len();
            ids.push(Arc::from(u.id.as_str()));
            match u.matcher {
                UserMatch::Literal(l) => {
                    targets.push(Target::Literal { rule, len: l.len() });
                    patterns.push(l);
                }
                UserMatch::Regex(r) => regexes.push((rule, r)),
            }
        }
        let literals = match patterns.is_empty() {
            true => None,
            false => Some(Literals::new(&patterns)?),
        };
        let patterns = patterns.into_iter().zip(targets).collect();
        Ok(Scanner { ids, checks, literals, patterns, regexes })
    }

    /// Everything `buf` holds: own secrets (when `own` is given) and rule matches.
    pub fn scan(&self, buf: &[u8], own: Option<&Set>) -> Findings {
        let mut findings = Findings::default();
        self.scan_views(buf, own, &mut findings);
        findings
    }

    /// A body held in the pieces it arrived in: the quick pass (`quick`) reads them in
    /// place, and only a body it cannot clear is joined and scanned whole.
    pub fn scan_pieces(
        &self,
        pieces: &[bytes::Bytes],
        own: Option<&Set>,
        quick: Option<&quick::Quick>,
    ) -> Findings {
        if quick.is_some_and(|q| q.clean(pieces)) {
            return Findings::default();
        }
        match pieces {
            [] => Findings::default(),
            [one] => self.scan(one, own),
            _ => self.scan(&pieces.concat(), own),
        }
    }

    /// Own secrets in the buffer (the redactor knows their encoded forms) and, when it
    /// has percent-escapes, in its decoded view (`%2D` for `-` is no canonical form);
    /// rule matches through the JSON-escape and percent-escape views, mapped back.
    fn scan_views(&self, src: &[u8], own: Option<&Set>, found: &mut Findings) {
        let mut json = Decoded::default();
        if hides_token_bytes(src) {
            json.decode(src);
        }
        let v1: &[u8] = if json.changed() { &json.text } else { src };
        let mut pct = Decoded::default();
        if memchr::memchr(b'%', v1).is_some() {
            pct.decode_percent(v1);
        }
        let v2: &[u8] = if pct.changed() { &pct.text } else { v1 };
        if let Some(set) = own {
            found.own += set.count(src);
            if found.own == 0 && pct.changed() {
                found.own += set.count(v2);
            }
        }
        let out = &mut found.hits;
        let start = out.len();
        self.scan_text(v2, out);
        self.scan_base64(v2, out);
        let back = |r: Range<usize>| {
            let r = if pct.changed() { pct.source(&r) } else { r };
            if json.changed() { json.source(&r) } else { r }
        };
        for h in &mut out[start..] {
            h.range = back(h.range.clone());
            h.also = h.also.take().map(back);
        }
    }

    /// Bundled checks where their literals occur, user literals and user regexes.
    fn scan_text(&self, text: &[u8], out: &mut Vec<Hit>) {
        if let Some(literals) = &self.literals {
            // Every position where some literal starts (one SIMD search, resumed a byte
            // on), then every literal that starts there.
            let mut at = 0;
            while let Some(p) = literals.find(text, at) {
                for (lit, target) in &self.patterns {
                    if !text[p..].starts_with(lit) {
                        continue;
                    }
                    match *target {
                        Target::Check(i) => out.extend(self.verify(i, text, p)),
                        Target::Literal { rule, len } => {
                            out.push(Hit { rule, range: p..p + len, also: None })
                        }
                    }
                }
                at = p + 1;
            }
        }
        for (rule, re) in &self.regexes {
            out.extend(re.find_iter(text).filter(|m| !m.is_empty()).map(|m| Hit {
                rule: *rule,
                range: m.range(),
                also: None,
            }));
        }
    }

    /// A bundled check at `at`, where one of its literals starts.
    fn verify(&self, i: usize, text: &[u8], at: usize) -> Option<Hit> {
        let c = &self.checks[i];
        if c.token_tail && at > 0 && rules::is_token_byte(text[at - 1]) && !rules::after_escape(text, at) {
            return None;
        }
        let window = &text[at..(at + rules::LONGEST_MATCH).min(text.len())];
        let (mut range, group) = match c.extra {
            Extra::Group => {
                let caps = c.regex.captures(window)?;
                (at..at + caps.get(0)?.end(), caps.get(1).map(|g| at + g.start()..at + g.end()))
            }
            _ => (at..at + c.regex.find(window)?.end(), None),
        };
        if c.token_tail && text.get(range.end).is_some_and(|b| rules::continues(*b, c.dashes)) {
            return None;
        }
        let mut also = None;
        match c.extra {
            Extra::None => {}
            Extra::Group => range = group?,
            Extra::AwsSecretNearby => {
                // AWS's documentation example pair is everywhere in docs and tests.
                if text[range.clone()].ends_with(b"EXAMPLE") {
                    return None;
                }
                also = Some(rules::aws_secret_near(text, range.clone())?);
            }
            Extra::JwtKid => {
                if !rules::jwt_has_kid(&text[range.clone()]) {
                    return None;
                }
            }
            Extra::PemBlock => range.end = rules::pem_end(text, at, range.end),
        }
        Some(Hit { rule: c.rule, range, also })
    }

    /// Every run of base64 long enough to hold a match, decoded at each alignment and
    /// searched; a match covers the characters it was decoded from.
    fn scan_base64(&self, text: &[u8], out: &mut Vec<Hit>) {
        let mut decoded = Vec::new();
        let mut found = Vec::new();
        for run in base64_runs(text) {
            for skip in 0..4 {
                let chars = &text[run.start + skip..run.end];
                // A last quantum of one character holds no byte; two or three hold some.
                let usable = chars.len() - usize::from(chars.len() % 4 == 1);
                if usable < MIN_BASE64_RUN {
                    break;
                }
                decoded.clear();
                if !decode_any_base64(&chars[..usable], &mut decoded) {
                    continue;
                }
                found.clear();
                self.scan_text(&decoded, &mut found);
                let base = run.start + skip;
                let enc =
                    |r: &Range<usize>| base + r.start / 3 * 4..(base + r.end.div_ceil(3) * 4).min(run.end);
                out.extend(found.drain(..).map(|h| Hit {
                    rule: h.rule,
                    range: enc(&h.range),
                    also: h.also.as_ref().map(enc),
                }));
            }
        }
    }
}

/// Does `src` hold a JSON escape that stands for a byte a match could hold (`\/`, or
/// `\uXXXX` of printable ASCII)? The common escapes (`\n`, `\"`, `\\`, `\t`, non-ASCII
/// `\u`) stand for bytes no match holds; the checks see past them where they sit
/// (`rules::after_escape`), so most JSON bodies are searched as they are, uncopied.
fn hides_token_bytes(src: &[u8]) -> bool {
    // Two SIMD substring searches; `\u00XX` is the only `\u` form of printable ASCII.
    // The searchers are built once (this runs on every header value of every request).
    static SLASH: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b"\\/"));
    static ASCII: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b"\\u00"));
    SLASH.find(src).is_some()
        || ASCII.find_iter(src).any(|at| {
            let hex = src.get(at + 4..at + 6).and_then(|h| std::str::from_utf8(h).ok());
            hex.and_then(|h| u8::from_str_radix(h, 16).ok()).is_some_and(|c| (0x21..0x7f).contains(&c))
        })
}

/// The literal search: SIMD (Teddy) for a handful of literals, as in `redact`; the
/// automaton with its prefilter otherwise.
#[derive(Debug)]
enum Literals {
    Packed(packed::Searcher),
    Automaton(AhoCorasick),
}

impl Literals {
    fn new<P: AsRef<[u8]>>(patterns: &[P]) -> Result<Literals, String> {
        let packed = packed::Config::new()
            .match_kind(packed::MatchKind::LeftmostFirst)
            .builder()
            .extend(patterns)
            .build();
        match packed {
            Some(s) => Ok(Literals::Packed(s)),
            None => AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostFirst)
                .build(patterns)
                .map(Literals::Automaton)
                .map_err(|e| e.to_string()),
        }
    }

    /// Where the first literal at or after `at` starts.
    fn find(&self, text: &[u8], at: usize) -> Option<usize> {
        match self {
            Literals::Packed(s) => s.find_in(text, Span::from(at..text.len())).map(|m| m.start()),
            Literals::Automaton(ac) => ac.find(Input::new(text).span(at..text.len())).map(|m| m.start()),
        }
    }
}

/// Standard base64 without padding, lenient about the unused bits of a last quantum
/// (a run cut at any alignment has them).
const LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Decode base64 in either alphabet (no padding).
fn decode_any_base64(chars: &[u8], out: &mut Vec<u8>) -> bool {
    let std: Vec<u8>;
    let chars = if chars.iter().any(|b| *b == b'-' || b == &b'_') {
        std = chars
            .iter()
            .map(|b| match b {
                b'-' => b'+',
                b'_' => b'/',
                b => *b,
            })
            .collect();
        &std[..]
    } else {
        chars
    };
    LENIENT.decode_vec(chars, out).is_ok()
}

/// Bytes of either base64 alphabet.
const BASE64: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'-' || b == b'_';
        i += 1;
    }
    t
};

/// The maximal runs of base64 characters at least `MIN_BASE64_RUN` long. Only every
/// `MIN_BASE64_RUN`th byte is looked at first: a run that long covers one of them, so
/// text of short words and binary data are passed over quickly.
fn base64_runs(text: &[u8]) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut probe = MIN_BASE64_RUN - 1;
    std::iter::from_fn(move || {
        while probe < text.len() {
            if !BASE64[usize::from(text[probe])] {
                probe += MIN_BASE64_RUN;
                continue;
            }
            let mut start = probe;
            while start > 0 && BASE64[usize::from(text[start - 1])] {
                start -= 1;
            }
            let mut end = probe + 1;
            while end < text.len() && BASE64[usize::from(text[end])] {
                end += 1;
            }
            probe = end + MIN_BASE64_RUN;
            if end - start >= MIN_BASE64_RUN {
                return Some(start..end);
            }
        }
        None
    })
}

/// Rule ids and counts, for the log line and the span: never the matched text.
pub fn summary(
    ids: &[Arc<str>],
    findings: &Findings,
    counted: impl Fn(&Hit) -> bool,
) -> Vec<(Arc<str>, u32)> {
    let mut out: Vec<(Arc<str>, u32)> = Vec::new();
    if findings.own > 0 {
        out.push((Arc::from(rules::OWN_SECRET), findings.own as u32));
    }
    for h in findings.hits.iter().filter(|h| counted(h)) {
        let id = &ids[h.rule];
        match out.iter_mut().find(|(i, _)| i == id) {
            Some((_, n)) => *n += 1,
            None => out.push((id.clone(), 1)),
        }
    }
    out
}

impl Scanner {
    /// Mask `first` in place, then what masking brought to light (a token glued to a
    /// masked one stands alone once its neighbour is `*`), until nothing `counted` is
    /// left (a few rounds at most: each masks more bytes).
    pub fn mask_all(&self, buf: &mut [u8], first: &[&Hit], counted: impl Fn(&Hit) -> bool) {
        mask(buf, first);
        for _ in 0..8 {
            let more = self.scan(buf, None);
            let left: Vec<&Hit> = more.hits.iter().filter(|h| counted(h)).collect();
            if left.is_empty() {
                return;
            }
            mask(buf, &left);
        }
    }
}

/// Mask the hits' bytes in place (same length).
pub fn mask(buf: &mut [u8], hits: &[&Hit]) {
    for h in hits {
        for r in std::iter::once(&h.range).chain(h.also.as_ref()) {
            if let Some(b) = buf.get_mut(r.clone()) {
                b.fill(b'*');
            }
        }
    }
}

#[cfg(test)]
mod tests;
