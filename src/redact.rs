//! Response redaction (invariant 5): every live secret, in every form an upstream might
//! echo it, is replaced by a mask of the same length before the client sees it —
//! streaming, holding back only bytes that could still begin a masked form.

use aho_corasick::{AhoCorasick, Input, MatchKind, Span, packed};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use bytes::{Bytes, BytesMut};

use std::sync::{Arc, Mutex};

use crate::secrets::Secret;

/// How long a value rotated out of a credential stays masked.
pub const RETIRED_FOR: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A credential's redactor, rebuilt only when its secret values change (rotation,
/// newly minted tokens). Values rotated out stay masked for `RETIRED_FOR`.
#[derive(Debug, Default)]
pub struct Cache(Mutex<CacheState>);

#[derive(Debug, Default)]
struct CacheState {
    current: Vec<Secret>,
    retired: Vec<(Secret, std::time::Instant)>,
    redactor: Option<Arc<Redactor>>,
}

impl Cache {
    pub fn get(&self, secrets: Vec<Secret>) -> Option<Arc<Redactor>> {
        let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let expired = st.retired.iter().any(|(_, at)| now.duration_since(*at) >= RETIRED_FOR);
        if st.redactor.is_some() && st.current == secrets && !expired {
            return st.redactor.clone();
        }
        let old = std::mem::take(&mut st.current);
        for s in old.into_iter().filter(|s| !secrets.contains(s)) {
            st.retired.push((s, now));
        }
        st.retired.retain(|(s, at)| now.duration_since(*at) < RETIRED_FOR && !secrets.contains(s));
        let mut all = secrets.clone();
        all.extend(st.retired.iter().map(|(s, _)| s.clone()));
        st.current = secrets;
        st.redactor = Redactor::new(&all).map(Arc::new);
        st.redactor.clone()
    }
}

/// Forms shorter than this are not masked: they would hit ordinary text.
const MIN_FORM: usize = 8;
const MASK: u8 = b'*';

/// The byte strings that reveal `secret`: raw, base64 and base64url at each of the three
/// alignments (the characters that depend only on the secret), URL-encoded and
/// JSON-escaped.
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
    out.push(json_escape(secret));
    out.retain(|f| f.len() >= MIN_FORM);
    out.sort();
    out.dedup();
    out
}

fn json_escape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for &b in s {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'/' => out.extend_from_slice(b"\\/"),
            b if b < 0x20 => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            b => out.push(b),
        }
    }
    out
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

    fn find(&self, buf: &[u8], at: usize) -> Option<std::ops::Range<usize>> {
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
    patterns: Vec<Vec<u8>>,
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
        Some(Redactor { matcher, patterns })
    }

    /// Mask every occurrence in place; returns how many were masked.
    pub fn mask(&self, buf: &mut [u8]) -> usize {
        // Every match start is found: after a match the search resumes one byte on, so a
        // form overlapping an earlier one is masked too.
        let mut ranges = Vec::new();
        let mut at = 0;
        while let Some(m) = self.matcher.find(buf, at) {
            at = m.start + 1;
            ranges.push(m);
        }
        for r in &ranges {
            buf[r.clone()].fill(MASK);
        }
        ranges.len()
    }

    /// How many trailing bytes of `buf` could be the start of a form (to hold back).
    pub fn holdback(&self, buf: &[u8]) -> usize {
        let longest = self.patterns.iter().map(Vec::len).max().unwrap_or(1);
        (1..longest.min(buf.len() + 1))
            .rev()
            .find(|&k| {
                let tail = &buf[buf.len() - k..];
                self.patterns.iter().any(|p| p.len() > k && p.starts_with(tail))
            })
            .unwrap_or(0)
    }
}

/// Redaction over a stream of chunks.
#[derive(Debug)]
pub struct Stream {
    redactor: Arc<Redactor>,
    carry: BytesMut,
}

impl Stream {
    pub fn new(redactor: Arc<Redactor>) -> Self {
        Stream { redactor, carry: BytesMut::new() }
    }

    /// Add a chunk; returns what can be released now.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.carry.extend_from_slice(chunk);
        self.redactor.mask(&mut self.carry);
        let keep = self.redactor.holdback(&self.carry);
        self.carry.split_to(self.carry.len() - keep).freeze()
    }

    /// End of stream: release what was held back (it can no longer become a form).
    pub fn finish(&mut self) -> Bytes {
        self.carry.split().freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &str = "sk-ant-api03-REALsecretVALUE_xyz";

    fn redactor() -> Redactor {
        Redactor::new(&[Secret::new(SECRET.into())]).unwrap()
    }

    fn whole(text: &[u8]) -> Vec<u8> {
        let mut s = Stream::new(Arc::new(redactor()));
        let mut out = s.push(text).to_vec();
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
        cache.get(vec![old.clone()]).unwrap();
        let r = cache.get(vec![new.clone()]).unwrap();
        let mut text = b"old-secret-value-111 new-secret-value-222".to_vec();
        assert_eq!(r.mask(&mut text), 2, "{}", String::from_utf8_lossy(&text));
        assert!(Arc::ptr_eq(&r, &cache.get(vec![new]).unwrap()), "unchanged values reuse the automaton");
    }

    #[test]
    fn only_possible_prefixes_are_held_back() {
        let mut s = Stream::new(Arc::new(redactor()));
        assert_eq!(&s.push(b"data: hello\n\n")[..], b"data: hello\n\n", "SSE events are not delayed");
        let out = s.push(b"data: sk-ant-api0");
        assert_eq!(&out[..], b"data: ", "a possible start is held");
        let out = s.push(b"3-REALsecretVALUE_xyz!");
        assert_eq!(out.len(), SECRET.len() + 1);
        assert!(!String::from_utf8_lossy(&out).contains("REAL"));
    }

    proptest! {
        /// Whatever the chunking, no form of the secret gets through.
        #[test]
        fn no_chunking_lets_a_secret_through(
            before in "[ -~]{0,40}",
            after in "[ -~]{0,40}",
            cuts in proptest::collection::vec(0usize..200, 0..8),
            which in 0usize..4,
        ) {
            let form = match which {
                0 => SECRET.to_string(),
                1 => base64::engine::general_purpose::STANDARD.encode(format!("x{SECRET}")),
                2 => crate::inject::encode_component(SECRET),
                _ => format!("\"{SECRET}\""),
            };
            let text = format!("{before}{form}{after}");
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort();
            let mut s = Stream::new(Arc::new(redactor()));
            let mut out = Vec::new();
            let mut last = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                out.extend_from_slice(&s.push(&bytes[last..c]));
                last = c;
            }
            out.extend_from_slice(&s.finish());
            prop_assert_eq!(out.len(), bytes.len());
            let out = String::from_utf8_lossy(&out).into_owned();
            prop_assert!(!out.contains(SECRET));
            for f in forms(SECRET.as_bytes()) {
                prop_assert!(!out.as_bytes().windows(f.len()).any(|w| w == &f[..]));
            }
        }
    }
}
