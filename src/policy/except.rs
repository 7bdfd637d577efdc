//! `except_paths` (SPEC 5): path patterns where a credential is never injected, even
//! though its `paths` match. Built-in providers list their credential-minting endpoints
//! here. A deny list errs towards matching: the request path is read in every way a
//! server may read it (escapes, encoded separators, `;parameters`, merged slashes, case)
//! and the credential stays off when any reading is covered.

use super::{canonical_path, percent_decode};

/// One `except_paths` entry: whole segments; `*` is one segment, `**` any number
/// (zero or more). Literal segments compare ASCII case-insensitively.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathPattern {
    pub source: String,
    segments: Vec<Seg>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Lit(String),
    One,
    Any,
}

impl PathPattern {
    pub fn parse(raw: &str) -> Result<PathPattern, super::RuleError> {
        let rest = raw.strip_prefix('/').ok_or_else(|| format!("{raw:?} must start with /"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let mut segments = Vec::new();
        for s in rest.split('/').filter(|_| !rest.is_empty()) {
            segments.push(match s {
                "" => return Err(format!("{raw:?} has an empty segment").into()),
                "." | ".." => return Err(format!("{raw:?}: dot segments are not allowed").into()),
                "*" => Seg::One,
                "**" => Seg::Any,
                s if s.contains('*') => {
                    return Err(format!("{raw:?}: `*` and `**` stand for whole segments").into());
                }
                s if s.contains(['%', ';', '\\', '?', '#']) => {
                    return Err(format!("{raw:?}: write segments plain (no %, ;, \\, ?, #)").into());
                }
                s => Seg::Lit(s.to_ascii_lowercase()),
            });
        }
        Ok(PathPattern { source: raw.to_string(), segments })
    }

    /// Does the pattern cover these (already read) segments? Linear in
    /// pattern × path, whatever the number of `**`.
    fn covers(&self, path: &[String]) -> bool {
        // reach[j]: the pattern read so far can end exactly before path[j].
        let mut reach = vec![false; path.len() + 1];
        reach[0] = true;
        for seg in &self.segments {
            let mut next = vec![false; path.len() + 1];
            for j in 0..=path.len() {
                match seg {
                    Seg::Any => next[j] = reach[j] || (j > 0 && next[j - 1]),
                    Seg::One => next[j] = j > 0 && reach[j - 1],
                    Seg::Lit(l) => next[j] = j > 0 && reach[j - 1] && path[j - 1] == *l,
                }
            }
            reach = next;
        }
        reach[path.len()]
    }
}

/// The ways a server may read a request path, as lists of segments: escapes decoded
/// once with encoded separators kept inside their segment (Rails, GitHub), or decoded
/// as separators, or decoded twice; `\\` as a separator or not; in every reading
/// `;parameters` are dropped (Tomcat, Spring), dot segments resolved after decoding,
/// empty segments dropped (nginx merges slashes) and letters lowercased.
pub fn readings(path: &str) -> Vec<Vec<String>> {
    let once = |b: &[u8]| percent_decode(b);
    let twice = |b: &[u8]| percent_decode(&percent_decode(b));
    let mut out = vec![
        // Split first, then decode each segment: `a%2Fb` stays one segment.
        segments(path.split('/').map(|s| once(s.as_bytes())).collect()),
        segments(split_all(&once(path.as_bytes()))),
        segments(split_all(&twice(path.as_bytes()))),
    ];
    out.dedup();
    out
}

fn split_all(decoded: &[u8]) -> Vec<Vec<u8>> {
    decoded.split(|b| *b == b'/' || *b == b'\\').map(<[u8]>::to_vec).collect()
}

/// Raw segments → the segments a server routes on.
fn segments(raw: Vec<Vec<u8>>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for seg in raw {
        let plain = seg.split(|b| *b == b';').next().unwrap_or_default();
        match String::from_utf8_lossy(plain).to_ascii_lowercase().as_str() {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s.to_string()),
        }
    }
    out
}

/// The pattern that keeps a credential off `path`, if any: the first that covers any
/// reading of the path's canonical form (or of the path itself, when `canonical_path`
/// finds it ambiguous).
pub fn excluded_by<'a>(patterns: &'a [PathPattern], path: &str) -> Option<&'a str> {
    if patterns.is_empty() {
        return None;
    }
    let base = canonical_path(path).unwrap_or(std::borrow::Cow::Borrowed(path));
    readings(&base)
        .iter()
        .find_map(|segments| patterns.iter().find(|p| p.covers(segments)))
        .map(|p| p.source.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pats(list: &[&str]) -> Vec<PathPattern> {
        list.iter().map(|p| PathPattern::parse(p).unwrap()).collect()
    }

    fn excluded(list: &[&str], path: &str) -> bool {
        excluded_by(&pats(list), path).is_some()
    }

    #[test]
    fn parse_rules() {
        assert!(PathPattern::parse("user/keys").is_err());
        assert!(PathPattern::parse("/user//keys").is_err());
        assert!(PathPattern::parse("/user/../keys").is_err());
        assert!(PathPattern::parse("/user/ke*").is_err());
        assert!(PathPattern::parse("/user/%6beys").is_err());
        assert!(PathPattern::parse("/").is_ok());
        assert!(PathPattern::parse("/repos/*/*/keys/").is_ok());
    }

    #[test]
    fn whole_segments_one_and_any() {
        let github = ["/user/keys", "/repos/*/*/keys", "/app/installations/*/access_tokens"];
        assert!(excluded(&github, "/user/keys"));
        assert!(excluded(&github, "/user/keys/"));
        assert!(!excluded(&github, "/user/keys/123"), "whole path, not a prefix");
        assert!(!excluded(&github, "/user/keysx"));
        assert!(!excluded(&github, "/user"));
        assert!(excluded(&github, "/repos/octo/hello/keys"));
        assert!(!excluded(&github, "/repos/octo/keys"), "* is exactly one segment");
        assert!(!excluded(&github, "/repos/octo/hello/world/keys"));
        assert!(excluded(&github, "/app/installations/42/access_tokens"));
        assert!(excluded(&["/admin/**"], "/admin"), "** may be empty");
        assert!(excluded(&["/admin/**"], "/admin/a/b/c"));
        assert!(excluded(&["/**/token"], "/a/b/token"));
        assert!(excluded(&["/**/token"], "/token"));
        assert!(!excluded(&["/**/token"], "/a/b/tokens"));
        assert!(excluded(&["/"], "/"));
        assert!(!excluded(&["/"], "/x"));
        assert!(!excluded(&[], "/anything"), "no patterns, nothing excluded");
    }

    #[test]
    fn read_as_a_lenient_server_would() {
        let p = ["/user/keys"];
        for path in [
            "/user//keys",
            "//user/keys/",
            "/USER/Keys",
            "/user/%6beys",
            "/user/keys;jsessionid=1",
            "/user;x/keys",
            "/x/../user/keys",
            "/./user/./keys",
        ] {
            assert!(excluded(&p, path), "{path}");
        }
        // Ambiguous paths: excluded when any reading a server may make is.
        for path in [
            "/user/x/%2e%2e/keys",
            "/user/x/%252e%252e/keys",
            "/user/x/..;/keys",
            "/user%2fkeys",
            "/user\\keys",
            "/user/x/..%5ckeys",
        ] {
            assert!(excluded(&p, path), "{path}");
        }
        // An encoded slash inside a segment (a branch name) is no excluded path.
        let branches = ["/repos/*/*/keys"];
        assert!(!excluded(&branches, "/repos/o/r/branches/feature%2Fkeys"));
        assert!(excluded(&branches, "/repos/o/r%2Fkeys"), "read as /repos/o/r/keys by some servers");
    }

    /// Through `Policy::decide`: the winner's except_paths make the request pass without
    /// any credential (a less specific one does not step in), or 403 with
    /// require_placeholder; `paths` and except_paths combine.
    #[test]
    fn decide_passes_or_refuses_on_excepted_paths() {
        use crate::policy::{CredentialRule, Decision, Destination, InSlot, Policy, Question, RequestHead};
        let rule = |name: &str, host: &str, except: &[&str]| CredentialRule {
            except_paths: pats(except),
            ..crate::policy::tests::rule(name, &[host])
        };
        let mut gh = rule("github", "api.github.com", &["/user/keys"]);
        gh.paths = vec!["/user".into()];
        let broad = rule("broad", ".github.com", &[]);
        let mut policy = Policy { credentials: vec![broad, gh], ..Default::default() };
        let headers = http::HeaderMap::new();
        let dest = Destination::parse_authority("api.github.com:443", None).unwrap();
        let decide = |p: &Policy, path: &str| {
            let head = RequestHead { method: "POST", target: path, path, headers: &headers, tls: true };
            p.decide(&Question::now(None, &dest, Some(&head)), |_| InSlot::Other)
        };
        assert!(matches!(decide(&policy, "/user/emails"), Decision::Inject { credential: 1, .. }));
        match decide(&policy, "/user//Keys/") {
            Decision::Pass { reason: why, .. } => {
                assert!(why.contains("github") && why.contains("except_paths"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(decide(&policy, "/repos/x"), Decision::Inject { credential: 0, .. }));
        policy.credentials[1].require_placeholder = true;
        assert!(
            matches!(decide(&policy, "/user/keys"), Decision::Block(r) if r.status() == 403 && r.token() == "except-path")
        );
    }

    #[test]
    fn many_stars_stay_linear() {
        let p = pats(&["/**/**/**/**/**/**/**/**/x"]);
        let long = format!("/{}", ["a"; 5000].join("/"));
        assert!(excluded_by(&p, &long).is_none());
    }

    fn segment() -> impl Strategy<Value = String> {
        "[a-z0-9_-]{1,8}"
    }

    /// Ways servers read a path differently from its bytes; each keeps its meaning.
    fn disguise(seg: &str, how: u8) -> String {
        match how % 8 {
            0 => seg.to_string(),
            1 => seg.to_ascii_uppercase(),
            2 => format!("{seg};p=1"),
            3 => seg.bytes().map(|b| format!("%{b:02X}")).collect(),
            4 => format!("{seg}/"),
            5 => format!("./{seg}"),
            6 => format!("%2e/{seg}"),
            _ => seg.bytes().map(|b| format!("%25{b:02X}")).collect(),
        }
    }

    const DETOURS: &[&str] = &["..", "..;x", "%2e%2e", "%252e%252e", ".%2E"];

    proptest! {
        /// A pattern made from a path (some segments as `*`, a run as `**`) covers it.
        #[test]
        fn patterns_cover_their_paths(segs in proptest::collection::vec(segment(), 1..8),
                                      stars in proptest::collection::vec(any::<bool>(), 8),
                                      run in 0usize..8, len in 0usize..4) {
            let mut pattern: Vec<String> = segs.iter().zip(&stars)
                .map(|(s, star)| if *star { "*".to_string() } else { s.clone() }).collect();
            let start = run.min(pattern.len());
            let end = (start + len).min(pattern.len());
            pattern.splice(start..end, ["**".to_string()]);
            let p = format!("/{}", pattern.join("/"));
            prop_assert!(excluded(&[p.as_str()], &format!("/{}", segs.join("/"))), "{p}");
        }

        /// No disguise of an excluded path (case, `;params`, escapes, extra slashes,
        /// dot segments, a detour through `..`) ever gets the credential.
        #[test]
        fn disguised_excluded_paths_stay_excluded(segs in proptest::collection::vec(segment(), 1..6),
                                                  hows in proptest::collection::vec(any::<u8>(), 6),
                                                  detour in proptest::option::of((0usize..6, segment(), 0usize..5))) {
            let pattern = format!("/{}", segs.join("/"));
            let mut parts: Vec<String> = segs.iter().zip(&hows).map(|(s, h)| disguise(s, *h)).collect();
            if let Some((at, name, how)) = detour {
                parts.insert(at.min(parts.len()), format!("{name}/{}", DETOURS[how]));
            }
            let path = format!("/{}", parts.join("/"));
            prop_assert!(excluded(&[pattern.as_str()], &path), "{path} escaped {pattern}");
        }
    }
}
