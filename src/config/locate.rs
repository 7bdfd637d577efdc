//! Turning byte offsets and key paths into `file:line:column` for error messages.

/// 1-based line and column of a byte offset.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, col)
}

/// The `[table]` header in force at `offset`, e.g. "proxy.filters".
pub fn table_at(src: &str, offset: usize) -> String {
    let before = &src[..offset.min(src.len())];
    before
        .lines()
        .rev()
        .find_map(|l| {
            let t = l.trim();
            t.strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .map(|h| h.trim_matches(|c| c == '[' || c == ' ').to_string())
        })
        .unwrap_or_default()
}

/// The key whose `key = value` statement holds `offset` (as written, dotted or quoted),
/// read with TOML's lexical rules: strings, comments, and arrays or inline tables that
/// span lines. `None` at a `[table]` header or outside any statement. Tolerant of the
/// broken input it is used on: a string left open ends at its line's end.
pub fn key_at(src: &str, offset: usize) -> Option<String> {
    let bytes = src.as_bytes();
    let line_end = |i: usize| src[i..].find('\n').map_or(bytes.len(), |n| i + n);
    let mut i = 0;
    let mut key: Option<String> = None;
    let mut depth = 0usize;
    let mut line_start = true;
    while i < bytes.len() && i <= offset {
        let b = bytes[i];
        if line_start && depth == 0 && !b.is_ascii_whitespace() {
            line_start = false;
            if b == b'[' {
                key = None;
                i = line_end(i);
                continue;
            }
            if b != b'#' {
                let end = src[i..].find(['=', '\n']).map_or(bytes.len(), |n| i + n);
                key = Some(src[i..end].trim().to_string());
                i = end + usize::from(bytes.get(end) == Some(&b'='));
                continue;
            }
        }
        match b {
            b'\n' => line_start = true,
            b'#' => {
                i = line_end(i);
                continue;
            }
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'"' | b'\'' => i = string_end(src, i),
            _ => {}
        }
        i += 1;
    }
    key.filter(|k| !k.is_empty())
}

/// Offset of the last byte of the string that opens at `start`: its closing quote, or
/// for a one-line string left open, the last byte before its line's end.
fn string_end(src: &str, start: usize) -> usize {
    let bytes = src.as_bytes();
    let quote = bytes[start];
    let triple = if quote == b'"' { "\"\"\"" } else { "'''" };
    if src[start..].starts_with(triple) {
        let body = start + 3;
        return src[body..].find(triple).map_or(bytes.len(), |n| body + n + 2);
    }
    let mut i = start + 1;
    while i < bytes.len() && bytes[i] != b'\n' {
        if bytes[i] == b'\\' && quote == b'"' {
            i += 2;
            continue;
        }
        if bytes[i] == quote {
            return i;
        }
        i += 1;
    }
    i - 1
}

/// Offset of `key = ...` inside the byte range of a table, if written there.
pub fn key_offset(src: &str, range: std::ops::Range<usize>, key: &str) -> Option<usize> {
    let body = src.get(range.clone())?;
    let mut offset = range.start;
    for line in body.split_inclusive('\n') {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix(key)
            && rest.trim_start().starts_with('=')
        {
            return Some(offset + (line.len() - t.len()));
        }
        offset += line.len();
    }
    None
}

/// Offset of a `[a.b]` header, or of the `key = ` line in its parent table.
pub fn table_offset(src: &str, path: &[&str]) -> Option<usize> {
    let want = path.join(".");
    let mut offset = 0;
    for line in src.split_inclusive('\n') {
        let t = line.trim();
        if t.starts_with('[') && t.trim_matches(|c| c == '[' || c == ']').trim() == want {
            return Some(offset);
        }
        offset += line.len();
    }
    None
}

/// Offset of the first `[header]` line after the line holding `start`, or the end.
pub fn next_table(src: &str, start: usize) -> usize {
    let from = src[start..].find('\n').map(|i| start + i + 1).unwrap_or(src.len());
    let mut offset = from;
    for line in src[from..].split_inclusive('\n') {
        if line.trim_start().starts_with('[') {
            return offset;
        }
        offset += line.len();
    }
    src.len()
}

/// The known key closest to `unknown`, for "did you mean".
pub fn suggest<'a>(unknown: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(unknown, k), *k))
        .filter(|(d, k)| *d <= 3.max(k.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        let src = "[proxy]\nport = 1\n[proxy.filters]\nalowlist_only = true\n";
        let off = src.find("alow").unwrap();
        assert_eq!(line_col(src, off), (4, 1));
        assert_eq!(table_at(src, off), "proxy.filters");
        assert_eq!(key_offset(src, 0..src.len(), "port"), Some(8));
        assert_eq!(suggest("alowlist_only", &["allowlist_only", "allowed_domains"]), Some("allowlist_only"));
        assert_eq!(suggest("zzz", &["allowlist_only"]), None);
    }

    #[test]
    fn key_of_the_statement_at_an_offset() {
        let at = |src: &str, needle: &str| key_at(src, src.find(needle).unwrap());
        let src = "[credentials.anthropic]\nheader = \"x-api-key\"\nvalue = \"${ANTHROPIC_API_KEY\ndomains = [\"a\"]\n";
        assert_eq!(key_at(src, src.find("\ndomains").unwrap()).as_deref(), Some("value"), "open string");
        assert_eq!(at(src, "header").as_deref(), Some("header"));
        assert_eq!(at(src, "domains").as_deref(), Some("domains"));
        assert_eq!(at(src, "credentials"), None, "a header has no key");
        let src = "[x]\ndomains = [\"a.com\",\n  \"b # not a comment\",\n  # a comment = no key\npaths = 3\n";
        assert_eq!(at(src, "paths").as_deref(), Some("domains"), "still inside the open array");
        let src = "[u]\n\"api.x:443\" = \"1.2.3.4\"\nport = \"x\" # note = 1\n";
        assert_eq!(at(src, "1.2.3.4").as_deref(), Some("\"api.x:443\""));
        assert_eq!(at(src, "\"x\"").as_deref(), Some("port"));
        let src = "s = '''\na = [\n'''\nnext = 1\n";
        assert_eq!(at(src, "next").as_deref(), Some("next"), "multi-line literal strings end");
    }
}
