//! The rules outbound scanning looks for: the bundled high-confidence set (each with a
//! stable id, documented in docs/dlp.md) and the user's `[[proxy.dlp.rule]]` entries.
//!
//! A bundled rule is a literal that starts every match (found by one multi-literal
//! search over the whole buffer) and an anchored check run only where a literal was
//! found, so the cost on ordinary text is one SIMD pass; user regexes run as they are.

use regex::bytes::Regex;

/// The id reported when one of latchkey's own live secrets is found (always blocked).
pub const OWN_SECRET: &str = "latchkey-secret";

/// The bundled rule ids, in the order docs/dlp.md lists them.
pub const BUILTIN_IDS: [&str; 10] = [
    "aws-access-key",
    "github-pat",
    "anthropic-key",
    "openai-key",
    "slack-token",
    "stripe-live-key",
    "google-api-key",
    "private-key",
    "gcp-service-account",
    "jwt",
];

/// The longest span a bundled match can take (a PEM block to its END line).
pub const LONGEST_MATCH: usize = 16 * 1024;

/// What is checked besides the anchored regex.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Extra {
    None,
    /// An AWS secret access key within `AWS_NEARBY` bytes; both are the match.
    AwsSecretNearby,
    /// The JWT header names a `kid`.
    JwtKid,
    /// A PEM block: the match runs to its `-----END ...-----` line.
    PemBlock,
    /// The first capture group is the match (the value of a JSON key).
    Group,
}

/// One bundled check: where it may start, what must follow, and what the match is.
#[derive(Debug)]
pub struct Check {
    pub rule: usize,
    pub literals: &'static [&'static str],
    pub regex: Regex,
    /// The match must stand alone: no token byte before it, and after it no byte of
    /// its own alphabet (the token would go on).
    pub token_tail: bool,
    /// The token's own alphabet goes on with `-` and `_` besides letters and digits.
    pub dashes: bool,
    pub extra: Extra,
}

/// (rule index in `BUILTIN_IDS`, literals, anchored regex, stands alone, extra).
type Spec = (usize, &'static [&'static str], &'static str, bool, Extra);

/// Rules whose tokens hold `-` or `_` after their prefix.
const DASHED: [usize; 4] = [2, 3, 6, 9];

const SPECS: [Spec; 11] = [
    (0, &["AKIA", "ASIA"], r"^(?:AKIA|ASIA)[A-Z2-7]{16}", true, Extra::AwsSecretNearby),
    (
        1,
        &["ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"],
        r"^(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59})",
        true,
        Extra::None,
    ),
    (2, &["sk-"], r"^sk-ant-[a-z]{2,8}[0-9]{2}-[A-Za-z0-9_-]{32,400}", true, Extra::None),
    (
        3,
        &["sk-"],
        r"^sk-(?:(?:proj|svcacct|admin)-[A-Za-z0-9_-]{40,400}|[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20})",
        true,
        Extra::None,
    ),
    (
        4,
        &["xoxb-", "xoxp-", "xoxa-", "xoxr-", "xoxs-"],
        r"^xox[baprs]-(?:[0-9]+-){1,3}[A-Za-z0-9]{8,64}",
        true,
        Extra::None,
    ),
    (5, &["sk_live_", "rk_live_"], r"^[sr]k_live_[A-Za-z0-9]{20,247}", true, Extra::None),
    (6, &["AIza"], r"^AIza[0-9A-Za-z_-]{35}", true, Extra::None),
    (
        7,
        &["-----BEGIN "],
        r"^-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----(?:\s|\\[nrt])+[A-Za-z0-9+/=]{40}",
        false,
        Extra::PemBlock,
    ),
    (8, &["\"private_key_id\""], r#"^"private_key_id"\s{0,8}:\s{0,8}"([0-9a-f]{40})""#, false, Extra::Group),
    // The same inside a JSON string (a key file pasted into a prompt).
    (
        8,
        &["\\\"private_key_id\\\""],
        r#"^\\"private_key_id\\"\s{0,8}:\s{0,8}\\"([0-9a-f]{40})\\""#,
        false,
        Extra::Group,
    ),
    (
        9,
        &["eyJ"],
        r"^eyJ[A-Za-z0-9_-]{10,4000}\.eyJ[A-Za-z0-9_-]{10,8000}\.[A-Za-z0-9_-]{20,1000}",
        true,
        Extra::JwtKid,
    ),
];

pub fn builtin_checks() -> Vec<Check> {
    SPECS
        .iter()
        .map(|&(rule, literals, re, token_tail, extra)| Check {
            rule,
            literals,
            regex: Regex::new(re).expect("bundled DLP regexes compile"),
            token_tail,
            dashes: DASHED.contains(&rule),
            extra,
        })
        .collect()
}

/// Bytes a token may be glued to: its match must not follow one.
pub fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Is the byte before `at` the letter of a JSON escape (`\n`, `\r`, `\t`, `\"`)? Such a
/// token stands alone in the text the JSON stands for.
pub fn after_escape(text: &[u8], at: usize) -> bool {
    at >= 2 && text[at - 2] == b'\\' && matches!(text[at - 1], b'n' | b'r' | b't' | b'"')
}

/// Does `b` continue a token of this alphabet (so the match is not whole)?
pub fn continues(b: u8, dashes: bool) -> bool {
    b.is_ascii_alphanumeric() || (dashes && (b == b'_' || b == b'-'))
}

/// How far from an AWS key id its secret may be.
pub const AWS_NEARBY: usize = 256;

/// An AWS secret access key near `key` in `text`: 40 characters of base64's alphabet,
/// standing alone, with upper case, lower case and a digit (a hex digest has no upper
/// case, a word no digit).
pub fn aws_secret_near(text: &[u8], key: std::ops::Range<usize>) -> Option<std::ops::Range<usize>> {
    let from = key.start.saturating_sub(AWS_NEARBY);
    let to = (key.end + AWS_NEARBY).min(text.len());
    let alpha = |b: u8| b.is_ascii_alphanumeric() || b == b'/' || b == b'+';
    let mut i = from;
    while i < to {
        if !alpha(text[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < text.len() && alpha(text[i]) {
            i += 1;
        }
        // A run right after a JSON escape (`\nZx9...`) starts after its letter.
        let start = if rules_escape_start(text, start) { start + 1 } else { start };
        let run = &text[start..i];
        let alone = text.get(i).is_none_or(|b| *b != b'=');
        if run.len() == 40
            && alone
            && run.iter().any(u8::is_ascii_lowercase)
            && run.iter().any(u8::is_ascii_uppercase)
            && run.iter().any(u8::is_ascii_digit)
        {
            return Some(start..i);
        }
    }
    None
}

fn rules_escape_start(text: &[u8], start: usize) -> bool {
    start >= 1 && text[start - 1] == b'\\' && matches!(text[start], b'n' | b'r' | b't')
}

/// Does a JWT's header (its first segment, base64url) name a `kid`?
pub fn jwt_has_kid(token: &[u8]) -> bool {
    use base64::Engine;
    let header = token.split(|b| *b == b'.').next().unwrap_or_default();
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(header));
    decoded.is_ok_and(|h| memchr::memmem::find(&h, b"\"kid\"").is_some())
}

/// Where a PEM block that starts at `at` ends: after its `-----END ...-----` line, or
/// (no END line within reach) at `fallback`.
pub fn pem_end(text: &[u8], at: usize, fallback: usize) -> usize {
    let reach = &text[at..(at + LONGEST_MATCH).min(text.len())];
    let Some(end) = memchr::memmem::find(reach, b"-----END ") else { return fallback };
    let tail = &reach[end + 9..];
    match memchr::memmem::find(&tail[..tail.len().min(64)], b"-----") {
        Some(n) => at + end + 9 + n + 5,
        None => fallback,
    }
}

/// A user's `[[proxy.dlp.rule]]`.
#[derive(Debug)]
pub enum UserMatch {
    Literal(Vec<u8>),
    Regex(Regex),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_compiles_and_names_a_documented_id() {
        let checks = builtin_checks();
        assert!(checks.iter().all(|c| c.rule < BUILTIN_IDS.len()));
        for (i, _) in BUILTIN_IDS.iter().enumerate() {
            assert!(checks.iter().any(|c| c.rule == i), "{}", BUILTIN_IDS[i]);
        }
    }

    #[test]
    fn aws_secret_needs_mixed_case_and_a_digit() {
        let key = b"AKIAQWERTYUIOPASDFGH";
        let good = b"k=AKIAQWERTYUIOPASDFGH s=Zx9Qp2Lm7Vb4Nc8Rt1Yw6Ks3Hd5Gf0Ja2Ue7IoPq";
        assert!(aws_secret_near(good, 2..2 + key.len()).is_some());
        let hex = b"k=AKIAQWERTYUIOPASDFGH s=0123456789abcdef0123456789abcdef01234567";
        assert!(aws_secret_near(hex, 2..2 + key.len()).is_none());
    }
}
