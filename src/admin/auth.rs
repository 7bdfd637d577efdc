//! Who may use the admin listener (SPEC 10): the admin token, presented as
//! `Authorization: Bearer` (the CLI, scripts, Prometheus' `bearer_token_file`) or as
//! the session cookie the view's login sets (`HttpOnly; SameSite=Strict`). Never in a
//! query string. A request whose `Origin` is not the listener's own is refused whatever
//! it carries, and a state-changing request made with the cookie also needs the CSRF
//! token (a page elsewhere cannot read it).

use std::io::Write;
use std::path::{Path, PathBuf};

use http::HeaderMap;
use http::header::{AUTHORIZATION, COOKIE, HOST, ORIGIN};

/// The session cookie's name.
pub const COOKIE_NAME: &str = "latchkey_session";
/// The header the view sends its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The admin token and what is derived from it. Derived values are HMACs under the
/// token, so the cookie and the CSRF token are useless as a Bearer token, and a new
/// token (a new file) ends every session.
pub struct Token {
    value: zeroize::Zeroizing<String>,
    session: String,
    csrf: String,
}

/// How a request proved it holds the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    Bearer,
    Cookie,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("[admin] token_file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("[admin] token_file {path}: {why}")]
    Untrusted { path: String, why: String },
    #[error("[admin] token_file {path} is empty")]
    Empty { path: String },
}

impl Token {
    /// Read `path`, or create it (0600, 32 random bytes as hex) when it is absent.
    pub fn load_or_create(path: &Path) -> Result<Token, TokenError> {
        let io = |source| TokenError::Io { path: path.display().to_string(), source };
        match std::fs::metadata(path) {
            Ok(meta) => {
                crate::secrets::owner_only_writable(&meta).map_err(|e| TokenError::Untrusted {
                    path: path.display().to_string(),
                    why: e.to_string(),
                })?;
                let text = std::fs::read_to_string(path).map_err(io)?;
                let value = text.trim();
                if value.is_empty() {
                    return Err(TokenError::Empty { path: path.display().to_string() });
                }
                Ok(Token::new(value.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let value = create(path).map_err(io)?;
                tracing::info!("admin token created in {} (0600)", path.display());
                Ok(Token::new(value))
            }
            Err(e) => Err(io(e)),
        }
    }

    pub fn new(value: String) -> Token {
        let session = derive(&value, b"latchkey admin session");
        let csrf = derive(&value, b"latchkey admin csrf");
        Token { value: value.into(), session, csrf }
    }

    /// The key the webhook's signature is made with.
    pub fn key(&self) -> std::sync::Arc<[u8]> {
        self.value.as_bytes().into()
    }

    pub fn csrf(&self) -> &str {
        &self.csrf
    }

    /// Whether `offered` is the token itself (the view's login form).
    pub fn is(&self, offered: &str) -> bool {
        equal(offered.trim(), &self.value)
    }

    /// The `Set-Cookie` value the login answers with.
    pub fn set_cookie(&self) -> String {
        format!("{COOKIE_NAME}={}; HttpOnly; SameSite=Strict; Path=/", self.session)
    }

    /// How the request proves it holds the token, if it does: Bearer first, then the
    /// session cookie. A query string is never looked at.
    pub fn proof(&self, headers: &HeaderMap) -> Option<Proof> {
        let bearer = headers
            .get_all(AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .any(|t| equal(t.trim(), &self.value));
        if bearer {
            return Some(Proof::Bearer);
        }
        let cookie = headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .any(|(k, v)| k == COOKIE_NAME && equal(v, &self.session));
        cookie.then_some(Proof::Cookie)
    }

    /// The CSRF token the request carries is this one.
    pub fn csrf_ok(&self, headers: &HeaderMap) -> bool {
        headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()).is_some_and(|v| equal(v, &self.csrf))
    }
}

/// An `Origin`, when there is one, must be the listener's own: the scheme and the
/// `Host` the request was sent to. A page elsewhere (or `Origin: null`) is refused.
pub fn foreign_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(ORIGIN) else { return false };
    let (Ok(origin), Some(host)) = (origin.to_str(), headers.get(HOST).and_then(|h| h.to_str().ok())) else {
        return true;
    };
    origin != format!("http://{host}") && origin != format!("https://{host}")
}

/// Compared in constant time (the length is not secret: it is fixed).
fn equal(a: &str, b: &str) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}

fn derive(token: &str, what: &[u8]) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, token.as_bytes());
    hex::encode(aws_lc_rs::hmac::sign(&key, what).as_ref())
}

/// Create the token file, 0600, without replacing one that appeared meanwhile.
fn create(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| std::io::Error::other("no randomness"))?;
    let value = hex::encode(bytes);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(format!("{value}\n").as_bytes())?;
    Ok(value)
}

/// Where the CLI finds the token: the file the config names (or its default).
pub fn read_for_cli(path: &PathBuf) -> Result<String, TokenError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| TokenError::Io { path: path.display().to_string(), source })?;
    let t = text.trim().to_string();
    if t.is_empty() {
        return Err(TokenError::Empty { path: path.display().to_string() });
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_the_token_or_its_session_proves_anything() {
        let t = Token::new("s3cret-token".into());
        assert_eq!(t.proof(&headers(&[("authorization", "Bearer s3cret-token")])), Some(Proof::Bearer));
        assert_eq!(t.proof(&headers(&[("authorization", "Bearer wrong")])), None);
        let cookie = format!("a=b; {COOKIE_NAME}={}", t.session);
        assert_eq!(t.proof(&headers(&[("cookie", &cookie)])), Some(Proof::Cookie));
        // The cookie is not the token, nor the token a cookie.
        assert_eq!(t.proof(&headers(&[("authorization", &format!("Bearer {}", t.session))])), None);
        assert_eq!(t.proof(&headers(&[("cookie", &format!("{COOKIE_NAME}=s3cret-token"))])), None);
        assert!(t.csrf_ok(&headers(&[(CSRF_HEADER, t.csrf())])));
        assert!(!t.csrf_ok(&headers(&[(CSRF_HEADER, &t.session)])));
    }

    #[test]
    fn an_origin_must_be_the_listeners_own() {
        assert!(!foreign_origin(&headers(&[("host", "127.0.0.1:3129")])));
        assert!(!foreign_origin(&headers(&[
            ("host", "127.0.0.1:3129"),
            ("origin", "http://127.0.0.1:3129")
        ])));
        assert!(foreign_origin(&headers(&[("host", "127.0.0.1:3129"), ("origin", "http://evil.example")])));
        assert!(foreign_origin(&headers(&[("host", "127.0.0.1:3129"), ("origin", "null")])));
        assert!(foreign_origin(&headers(&[("origin", "http://127.0.0.1:3129")])));
    }
}
