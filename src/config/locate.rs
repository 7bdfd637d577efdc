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
}
