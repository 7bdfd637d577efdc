//! The quick pass over a held request body: most bodies hold nothing that could start a
//! match, and saying so needs neither a copy of the body (it is read in the pieces it
//! arrived in) nor any view of it. One multi-literal search covers the bundled rules'
//! literals, the user's literals and every form of latchkey's own secrets together; one
//! byte search finds the escapes a view would decode (`\/`, `\uXXXX`, `%XX`); a sparse
//! probe finds base64 runs long enough to be decoded. A body where any of these turn up
//! is joined and scanned whole (`Scanner::scan`): the quick pass only ever says "nothing
//! here", never what is there.
//!
//! Pieces are read in place; what spans a boundary between them is read in a small
//! seam (`reach` bytes either side): whatever the pass looks for is at most `reach + 1`
//! bytes long, so it lies in a piece or in the seam of a boundary it crosses.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{BASE64, Literals, MIN_BASE64_RUN, Scanner};

#[cfg(target_arch = "x86_64")]
mod avx2;
use crate::redact::{Redactor, Set};

/// The compiled quick pass for one set of own secrets.
#[derive(Debug)]
pub struct Quick {
    literals: Literals,
    /// Seam width: the longest literal or base64 run looked for, less one.
    reach: usize,
}

/// The quick pass for the own secrets in force, rebuilt only when they change (the
/// redactors are the credentials' cached ones, so the same `Arc`s come back).
#[derive(Debug, Default)]
pub struct Cache(Mutex<Option<Cached>>);

/// The redactors a quick pass was built for, and the pass.
type Cached = (Vec<Arc<Redactor>>, Arc<Quick>);

impl Cache {
    /// `None`: the scanner has user regexes, which no literal search can stand for.
    pub fn get(&self, scanner: &Scanner, own: Option<&Set>) -> Option<Arc<Quick>> {
        if !scanner.regexes.is_empty() {
            return None;
        }
        let members = own.map(Set::members).unwrap_or_default();
        let mut cached = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((key, quick)) = cached.as_ref()
            && key.len() == members.len()
            && key.iter().zip(members).all(|(a, b)| Arc::ptr_eq(a, b))
        {
            return Some(quick.clone());
        }
        // The key holds the redactors, so their addresses are not reused while cached.
        let quick = Arc::new(Quick::new(scanner, members)?);
        *cached = Some((members.to_vec(), quick.clone()));
        Some(quick)
    }
}

impl Quick {
    /// `None` when the literals cannot be searched together (then every body is
    /// scanned whole).
    fn new(scanner: &Scanner, own: &[Arc<Redactor>]) -> Option<Quick> {
        let mut patterns: Vec<&[u8]> = scanner.patterns.iter().map(|(p, _)| &p[..]).collect();
        patterns.extend(own.iter().flat_map(|r| r.forms()));
        patterns.sort();
        patterns.dedup();
        let longest = patterns.iter().map(|p| p.len()).max().unwrap_or(0);
        let literals = Literals::new(&patterns).ok()?;
        let reach = longest.max(MIN_BASE64_RUN) - 1;
        Some(Quick { literals, reach })
    }

    /// Is there certainly nothing in the body (`pieces` in order) for a scan to find?
    pub fn clean(&self, pieces: &[Bytes]) -> bool {
        if !pieces.iter().all(|p| self.clean_text(p)) {
            return false;
        }
        let mut seam = Vec::with_capacity(2 * self.reach);
        let mut before: Vec<u8> = Vec::with_capacity(self.reach);
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 && !before.is_empty() {
                seam.clear();
                seam.extend_from_slice(&before);
                for next in &pieces[i..] {
                    let want = self.reach - (seam.len() - before.len());
                    seam.extend_from_slice(&next[..want.min(next.len())]);
                    if seam.len() - before.len() == self.reach {
                        break;
                    }
                }
                if !self.clean_text(&seam) {
                    return false;
                }
            }
            // The last `reach` bytes of the body so far, across pieces.
            let take = piece.len().min(self.reach);
            let keep = (self.reach - take).min(before.len());
            before.drain(..before.len() - keep);
            before.extend_from_slice(&piece[piece.len() - take..]);
        }
        true
    }

    /// Is there certainly nothing in `text` for a scan to find?
    pub fn clean_text(&self, text: &[u8]) -> bool {
        self.literals.find(text, 0).is_none() && !escape_or_base64_run(text)
    }
}

/// Is there an escape some view decodes (`\/`, `\uXXXX`: JSON, the own-secret search
/// decodes every `\u`, the rules' view `\/` and `\u00XX`; `%XX`), or a run of
/// `MIN_BASE64_RUN` base64 characters (either alphabet)?
pub(super) fn escape_or_base64_run(text: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if avx2::supported() {
        // SAFETY: the CPU has what it needs (checked just above).
        return unsafe { avx2::escape_or_base64_run(text) };
    }
    has_escape(text) || has_base64_run(text)
}

/// The SIMD pass and the plain one agree (the fuzz target and the proptests check it).
#[cfg(any(test, feature = "fuzzing"))]
pub fn assert_passes_agree(text: &[u8]) {
    let plain = has_escape(text) || has_base64_run(text);
    assert_eq!(escape_or_base64_run(text), plain, "{:?}", String::from_utf8_lossy(text));
}

/// Is the escape at `at` (a `\\` or `%`) one a view decodes?
fn escape_at(text: &[u8], at: usize) -> bool {
    let hex = |at: usize, n: usize| text.get(at..at + n).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
    match text[at] {
        b'%' => hex(at + 1, 2),
        _ => match text.get(at + 1) {
            Some(b'/') => true,
            Some(b'u') => hex(at + 2, 4),
            _ => false,
        },
    }
}

fn has_escape(text: &[u8]) -> bool {
    memchr::memchr2_iter(b'\\', b'%', text).any(|at| escape_at(text, at))
}

/// Is there a run of `MIN_BASE64_RUN` base64 characters (either alphabet)? Only every
/// `MIN_BASE64_RUN`th byte is probed; from a probe that is one, the run's start is found
/// (looking back no further than a run's length) and its would-be last byte checked
/// first, back towards the probe: a byte that is not one rules out every run through it,
/// so the next probe is a run's length past it.
pub(super) fn has_base64_run(text: &[u8]) -> bool {
    const L: usize = MIN_BASE64_RUN;
    let is = |i: usize| BASE64[usize::from(text[i])];
    let mut p = L - 1;
    'probe: while p < text.len() {
        if !is(p) {
            p += L;
            continue;
        }
        let mut start = p;
        while start > 0 && p - start < L - 1 && is(start - 1) {
            start -= 1;
        }
        let end = start + L;
        if end > text.len() {
            return false;
        }
        let mut q = end - 1;
        while q > p {
            if !is(q) {
                p = q + L;
                continue 'probe;
            }
            q -= 1;
        }
        return true;
    }
    false
}
