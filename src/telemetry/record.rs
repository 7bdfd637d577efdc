//! The one record of an exchange (SPEC 7): what the request log writes, what metrics
//! count, what a span carries and what budgets are spent from. Names and paths, never
//! values or query strings.
//!
//! It is made for every request, logged or not, so it holds what it was built from —
//! the start time, the client address, the request target, shared names — and renders
//! text only when a line is written: no string is formatted for a log that is off.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Serialize, Serializer};

use super::usage::Usage;

#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// When the exchange began (RFC 3339 UTC, milliseconds, in the log).
    #[serde(serialize_with = "rfc3339")]
    pub ts: SystemTime,
    pub client: IpAddr,
    #[serde(serialize_with = "opt_str")]
    pub agent: Option<Arc<str>>,
    pub method: Cow<'static, str>,
    pub scheme: &'static str,
    #[serde(serialize_with = "str")]
    pub host: Arc<str>,
    pub port: u16,
    /// The path, without query string.
    pub path: Option<Path>,
    pub status: Option<u16>,
    pub decision: &'static str,
    pub reason: Option<Cow<'static, str>>,
    #[serde(serialize_with = "opt_str")]
    pub credential: Option<Arc<str>>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
    /// LLM token usage the response reported (`null` otherwise).
    pub usage: Option<Usage>,
    /// What outbound scanning (`[proxy.dlp]`) found: rule ids and counts, never text.
    pub dlp: Option<Dlp>,
}

/// `"dlp": {"action": "redact", "rules": {"aws-access-key": 1}}`.
#[derive(Debug, Clone, Serialize)]
pub struct Dlp {
    /// `block`, `redact`, `warn`, or `allowed` (every match `allow`ed for the host).
    pub action: &'static str,
    #[serde(serialize_with = "counts")]
    pub rules: Vec<(Arc<str>, u32)>,
}

fn counts<S: Serializer>(v: &[(Arc<str>, u32)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(v.len()))?;
    for (id, n) in v {
        m.serialize_entry(&**id, n)?;
    }
    m.end()
}

impl Dlp {
    /// `aws-access-key:1,github-pat:2`, for a span attribute.
    pub fn rules_text(&self) -> String {
        let parts: Vec<String> = self.rules.iter().map(|(id, n)| format!("{id}:{n}")).collect();
        parts.join(",")
    }
}

impl Record {
    /// A record of a request from `client` to `host:port`, begun now, `blocked` until
    /// something else is known.
    pub fn new(
        client: IpAddr,
        method: Cow<'static, str>,
        scheme: &'static str,
        host: Arc<str>,
        port: u16,
    ) -> Self {
        Record {
            ts: SystemTime::now(),
            client,
            agent: None,
            method,
            scheme,
            host,
            port,
            path: None,
            status: None,
            decision: "blocked",
            reason: None,
            credential: None,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
            usage: None,
            dlp: None,
        }
    }
}

impl Record {
    /// The record as JSON, appended to `out`: byte for byte what its `Serialize` gives
    /// (tested), written directly. The live view writes one per request while watched,
    /// and serde's general path (a call per field, a byte-by-byte escape of every
    /// string, IP addresses through `Display`) cost most of what a watcher adds.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"ts\":\"");
        push_ts(out, self.ts);
        out.extend_from_slice(b"\",\"client\":");
        match self.client {
            IpAddr::V4(ip) => {
                out.push(b'"');
                for (i, octet) in ip.octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    push_u64(out, u64::from(octet));
                }
                out.push(b'"');
            }
            IpAddr::V6(ip) => push_json_str(out, &ip.to_string()),
        }
        out.extend_from_slice(b",\"agent\":");
        push_opt_str(out, self.agent.as_deref());
        out.extend_from_slice(b",\"method\":");
        push_json_str(out, &self.method);
        out.extend_from_slice(b",\"scheme\":");
        push_json_str(out, self.scheme);
        out.extend_from_slice(b",\"host\":");
        push_json_str(out, &self.host);
        out.extend_from_slice(b",\"port\":");
        push_u64(out, u64::from(self.port));
        out.extend_from_slice(b",\"path\":");
        push_opt_str(out, self.path.as_ref().map(Path::as_str));
        out.extend_from_slice(b",\"status\":");
        match self.status {
            Some(status) => push_u64(out, u64::from(status)),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"decision\":");
        push_json_str(out, self.decision);
        out.extend_from_slice(b",\"reason\":");
        push_opt_str(out, self.reason.as_deref());
        out.extend_from_slice(b",\"credential\":");
        push_opt_str(out, self.credential.as_deref());
        for (key, n) in [
            (&b",\"bytes_up\":"[..], self.bytes_up),
            (b",\"bytes_down\":", self.bytes_down),
            (b",\"duration_ms\":", self.duration_ms),
        ] {
            out.extend_from_slice(key);
            push_u64(out, n);
        }
        // Rare (LLM responses, DLP findings) and nested: serde writes these two.
        out.extend_from_slice(b",\"usage\":");
        serde_json::to_writer(&mut *out, &self.usage).expect("a Vec takes any write");
        out.extend_from_slice(b",\"dlp\":");
        serde_json::to_writer(&mut *out, &self.dlp).expect("a Vec takes any write");
        out.push(b'}');
    }
}

fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn push_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string, escaped as serde_json escapes: `"`, `\\` and control characters
/// (the common ones by name, others as lower-case `\u00XX`); everything else as is.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    out.push(b'"');
    // No early exit, so it vectorises: almost every string needs no escape at all.
    if !b.iter().fold(false, |any, &c| any | (c < 0x20) | (c == b'"') | (c == b'\\')) {
        out.extend_from_slice(b);
    } else {
        for &c in b {
            match c {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0c => out.extend_from_slice(b"\\f"),
                c if c < 0x20 => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(c >> 4)]);
                    out.push(HEX[usize::from(c & 0xf)]);
                }
                c => out.push(c),
            }
        }
    }
    out.push(b'"');
}

/// A request's path as it is logged: the path of its target (the query string is cut
/// when the line is written), or text latchkey already cut (a refused head's, escaped).
#[derive(Debug, Clone)]
pub enum Path {
    Target(http::uri::PathAndQuery),
    Text(String),
}

impl Path {
    /// The path without query string or fragment.
    pub fn as_str(&self) -> &str {
        match self {
            Path::Target(pq) => pq.path(),
            Path::Text(t) => path_only(t),
        }
    }
}

impl Serialize for Path {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A method as logged: the standard ones without a copy.
pub fn method(m: &http::Method) -> Cow<'static, str> {
    method_text(m.as_str())
}

/// A method written as text (a refused head's), as logged.
pub fn method_text(m: &str) -> Cow<'static, str> {
    const KNOWN: [&str; 9] = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE"];
    match KNOWN.iter().find(|k| **k == m) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(m.to_string()),
    }
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_ts(*t))
}

fn str<S: Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

fn opt_str<S: Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_some(&**v),
        None => s.serialize_none(),
    }
}

/// RFC 3339 UTC with milliseconds, `2026-12-02T14:05:09.123Z`. Written out by hand:
/// every log record and live-view event carries one, and the `time` crate's general
/// formatter cost ~1,300 instructions a call (bench/cpu.py --features).
pub fn format_ts(t: SystemTime) -> String {
    let mut out = Vec::with_capacity(24);
    push_ts(&mut out, t);
    String::from_utf8(out).expect("digits and separators")
}

/// `t` as `format_ts` writes it, appended to `out` (no allocation of its own: the live
/// view writes one per request).
fn push_ts(out: &mut Vec<u8>, t: SystemTime) {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    let millis = u64::from(since.subsec_millis());
    let mut ts = *b"0000-00-00T00:00:00.000Z";
    let fields = [
        (year, 0..4),
        (month, 5..7),
        (day, 8..10),
        (rest / 3600, 11..13),
        (rest / 60 % 60, 14..16),
        (rest % 60, 17..19),
        (millis, 20..23),
    ];
    for (mut value, places) in fields {
        for place in ts[places].iter_mut().rev() {
            *place = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    out.extend_from_slice(&ts);
}

/// Year, month, day of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for dates from 1970 on).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The path of a request target without its query string.
pub fn path_only(target: &str) -> &str {
    target.split(['?', '#']).next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GET from 127.0.0.1 to https://a.example:443, nothing else filled in.
    fn get_a_example() -> Record {
        Record::new(
            "127.0.0.1".parse().unwrap(),
            method(&http::Method::GET),
            "https",
            "a.example".into(),
            443,
        )
    }

    #[test]
    fn write_json_is_what_serde_writes() {
        let odd = "a\"b\\c\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}é✓/";
        let mut r = get_a_example();
        let mut records = vec![r.clone()];
        r.client = "2001:db8::1".parse().unwrap();
        r.agent = Some(odd.into());
        r.method = method_text("BREW");
        r.host = odd.into();
        r.path = Some(Path::Text(format!("/{odd}?q=1")));
        r.status = Some(403);
        r.decision = "blocked";
        r.reason = Some(odd.to_string().into());
        r.credential = Some("anthropic".into());
        r.bytes_up = u64::MAX;
        r.bytes_down = 0;
        r.duration_ms = 1234;
        r.usage = Some(Usage { model: Some(odd.into()), input_tokens: Some(7), output_tokens: None });
        r.dlp = Some(Dlp { action: "redact", rules: vec![("aws-access-key".into(), 2), (odd.into(), 1)] });
        records.push(r.clone());
        r.client = "10.200.0.255".parse().unwrap();
        r.path = Some(Path::Target("/v1/messages?key=secret".parse().unwrap()));
        r.usage = None;
        records.push(r);
        for r in records {
            let mut ours = Vec::new();
            r.write_json(&mut ours);
            assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(&r).unwrap());
        }
    }

    #[test]
    fn timestamps_match_the_time_crates_rfc_3339() {
        let fmt = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        // Every day from 1970 to 2200 at a spread of times of day, leap days included.
        for day in 0..84_000u64 {
            for offset_ms in [0u64, 1, 59_999, 43_200_123, 86_399_999] {
                let t =
                    SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(day * 86_400_000 + offset_ms);
                let expected = time::OffsetDateTime::from(t).format(&fmt).unwrap();
                assert_eq!(format_ts(t), expected);
            }
        }
    }

    #[test]
    fn ts_and_path() {
        let ts = format_ts(SystemTime::now());
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.ends_with('Z'));
        assert_eq!(path_only("/v1/x?key=secret"), "/v1/x");
        let target: http::uri::PathAndQuery = "/v1/x?key=secret".parse().unwrap();
        assert_eq!(Path::Target(target).as_str(), "/v1/x");
    }

    #[test]
    fn a_line_has_every_key_in_order_and_no_query() {
        let mut r = get_a_example();
        r.path = Some(Path::Target("/p?secret=1".parse().unwrap()));
        r.credential = Some("anthropic".into());
        let line = serde_json::to_string(&r).unwrap();
        let keys = [
            "ts",
            "client",
            "agent",
            "method",
            "scheme",
            "host",
            "port",
            "path",
            "status",
            "decision",
            "reason",
            "credential",
            "bytes_up",
            "bytes_down",
            "duration_ms",
            "usage",
            "dlp",
        ];
        let at: Vec<usize> = keys.iter().map(|k| line.find(&format!("\"{k}\":")).expect(k)).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{line}");
        assert!(line.contains("\"path\":\"/p\"") && !line.contains("secret"), "{line}");
        assert!(
            line.contains("\"client\":\"127.0.0.1\"") && line.contains("\"credential\":\"anthropic\""),
            "{line}"
        );
    }
}
