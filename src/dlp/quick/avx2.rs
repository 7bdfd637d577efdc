//! The quick pass's byte classes, 32 bytes at a time: base64 characters (by two nibble
//! lookups, as SIMD base64 decoders validate their input), backslashes followed by `/`
//! or `u`, and `%`. Each class becomes a bit mask; runs are counted on the masks.

use std::arch::x86_64::*;

use super::super::{BASE64, MIN_BASE64_RUN};
use super::escape_at;

const RUN: u32 = MIN_BASE64_RUN as u32;

/// Class bits by low nibble and by high nibble: a byte is base64 when the two share a
/// bit (bit 0: `+ - /`; 1: digits; 2: `A-O a-o`; 3: `P-Z _`; 4: `p-z`).
const LO: [i8; 16] =
    [0x1A, 0x1E, 0x1E, 0x1E, 0x1E, 0x1E, 0x1E, 0x1E, 0x1E, 0x1E, 0x1C, 0x05, 0x04, 0x05, 0x04, 0x0D];
const HI: [i8; 16] = [0, 0, 0x01, 0x02, 0x04, 0x08, 0x04, 0x10, 0, 0, 0, 0, 0, 0, 0, 0];

/// `super::escape_or_base64_run` with AVX2.
///
/// # Safety
/// The CPU must support AVX2, BMI1, LZCNT and POPCNT (`supported`).
#[target_feature(enable = "avx2,bmi1,lzcnt,popcnt")]
pub(super) unsafe fn escape_or_base64_run(text: &[u8]) -> bool {
    let mut run = 0u32;
    let mut i = 0;
    loop {
        match blocks(text, i, &mut run) {
            Stop::Run => return true,
            Stop::Escapes(at, mut escapes) => {
                while escapes != 0 {
                    if escape_at(text, at + escapes.trailing_zeros() as usize) {
                        return true;
                    }
                    escapes &= escapes - 1;
                }
                i = at + 64;
            }
            Stop::End(at) => {
                i = at;
                break;
            }
        }
    }
    for (at, b) in text.iter().enumerate().skip(i) {
        if matches!(b, b'\\' | b'%') && escape_at(text, at) {
            return true;
        }
        run = if BASE64[usize::from(*b)] { run + 1 } else { 0 };
        if run >= RUN {
            return true;
        }
    }
    false
}

/// Why `blocks` stopped.
enum Stop {
    /// A run long enough.
    Run,
    /// The block at this offset holds these escape candidates (its run is counted).
    Escapes(usize, u64),
    /// No whole block is left from this offset.
    End(usize),
}

/// The 64-byte blocks from `i` on, until one says more than "nothing here" (the hot
/// loop: no call in it, so its constants stay in registers).
#[inline(never)]
#[target_feature(enable = "avx2,bmi1,lzcnt,popcnt")]
fn blocks(text: &[u8], mut i: usize, run: &mut u32) -> Stop {
    let lane = |t: &[i8; 16]| {
        _mm256_setr_epi8(
            t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10], t[11], t[12], t[13], t[14],
            t[15], t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10], t[11], t[12], t[13],
            t[14], t[15],
        )
    };
    let (lo, hi) = (lane(&LO), lane(&HI));
    let nibble = _mm256_set1_epi8(0x0F);
    let byte = |b: u8| _mm256_set1_epi8(b as i8);
    let (backslash, percent, slash, u) = (byte(b'\\'), byte(b'%'), byte(b'/'), byte(b'u'));
    // 32 bytes (and the byte after them: an escape's second byte) as two masks.
    let half = |p: *const u8| {
        // SAFETY: the caller checked that 33 bytes from `p` are inside `text`.
        let (v, next) = unsafe { (_mm256_loadu_si256(p.cast()), _mm256_loadu_si256(p.add(1).cast())) };
        let class = _mm256_and_si256(
            _mm256_shuffle_epi8(lo, _mm256_and_si256(v, nibble)),
            _mm256_shuffle_epi8(hi, _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble)),
        );
        let other = _mm256_movemask_epi8(_mm256_cmpeq_epi8(class, _mm256_setzero_si256())) as u32;
        let json = _mm256_and_si256(
            _mm256_cmpeq_epi8(v, backslash),
            _mm256_or_si256(_mm256_cmpeq_epi8(next, slash), _mm256_cmpeq_epi8(next, u)),
        );
        let escapes = _mm256_movemask_epi8(_mm256_or_si256(json, _mm256_cmpeq_epi8(v, percent))) as u32;
        (!other, escapes)
    };
    while i + 65 <= text.len() {
        // SAFETY: `i + 65 <= text.len()`.
        let p = unsafe { text.as_ptr().add(i) };
        let (b0, e0) = half(p);
        // SAFETY: as above.
        let (b1, e1) = half(unsafe { p.add(32) });
        let base64 = u64::from(b1) << 32 | u64::from(b0);
        let escapes = u64::from(e1) << 32 | u64::from(e0);
        if long_run(run, base64) {
            return Stop::Run;
        }
        if escapes != 0 {
            return Stop::Escapes(i, escapes);
        }
        i += 64;
    }
    Stop::End(i)
}

/// Can `escape_or_base64_run` run here?
pub(super) fn supported() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("bmi1")
        && std::is_x86_feature_detected!("lzcnt")
        && std::is_x86_feature_detected!("popcnt")
}

/// Does a run reach `RUN` with the 64 bytes of mask `m` (bit k: byte k is base64)?
/// `run`: the base64 bytes just before them; afterwards, the ones ending them.
#[inline]
#[target_feature(enable = "bmi1,lzcnt,popcnt")]
fn long_run(run: &mut u32, m: u64) -> bool {
    if *run + m.trailing_ones() >= RUN {
        return true;
    }
    // A run of 27 inside the block covers two whole aligned bytes of `m` (all ones): a
    // cheap test (SWAR zero-byte search on `!m`) that ordinary text rarely passes.
    const ONES: u64 = 0x0101_0101_0101_0101;
    let zero = (!m).wrapping_sub(ONES) & m & (ONES << 7);
    if zero & (zero >> 8) != 0 {
        // Bit k of `x` is set when bits k..k+n are set: n = 2, 4, 8, 16, then 27.
        let x = m & (m >> 1);
        let x = x & (x >> 2);
        let x = x & (x >> 4);
        let x = x & (x >> 8);
        if x & (x >> (RUN - 16)) != 0 {
            return true;
        }
    }
    *run = m.leading_ones();
    false
}
