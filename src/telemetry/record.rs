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
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    let fields = [
        (year, 4, b'-'),
        (month, 2, b'-'),
        (day, 2, b'T'),
        (rest / 3600, 2, b':'),
        (rest / 60 % 60, 2, b':'),
        (rest % 60, 2, b'.'),
        (u64::from(since.subsec_millis()), 3, b'Z'),
    ];
    let mut out = String::with_capacity(24);
    for (value, width, after) in fields {
        for place in (0..width).rev() {
            out.push(char::from(b'0' + (value / 10u64.pow(place) % 10) as u8));
        }
        out.push(char::from(after));
    }
    out
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
        let mut r = Record::new(
            "127.0.0.1".parse().unwrap(),
            method(&http::Method::GET),
            "https",
            "a.example".into(),
            443,
        );
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
