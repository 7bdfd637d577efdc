//! What minted credentials (gcp, OAuth2 client credentials, GitHub App installation
//! tokens) share: a way to call their token endpoint through latchkey's own upstream
//! client, a cache of the token with one refresh in flight, the RS256 JWT two of them
//! sign, the `Authorization` header they write, and the error a failed refresh is.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue};

use crate::secrets::Secret;

message_error! {
    /// Why no token could be had (the credential's requests then get 502). Names the
    /// endpoint and the cause, never a secret.
    pub MintError
}

/// One POST to a token endpoint.
pub struct TokenRequest<'a> {
    pub url: &'a str,
    pub content_type: &'static str,
    /// Extra headers (client authentication, `Accept`); values are marked sensitive.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Vec<u8>,
}

impl<'a> TokenRequest<'a> {
    /// An `application/x-www-form-urlencoded` POST.
    pub fn form(url: &'a str, body: String) -> Self {
        TokenRequest {
            url,
            content_type: "application/x-www-form-urlencoded",
            headers: Vec::new(),
            body: body.into_bytes(),
        }
    }
}

/// A token endpoint's answer: (status, body).
pub type TokenReply<'a> = Pin<Box<dyn Future<Output = Result<(u16, Vec<u8>), MintError>> + Send + 'a>>;

/// POSTs to token endpoints. The proxy implements it with its own upstream client (same
/// trust roots, SSRF rules and `[upstream.resolve]` as any request), so a minted
/// credential never needs a network stack of its own.
pub trait TokenHttp: Send + Sync {
    fn post<'a>(&'a self, req: TokenRequest<'a>) -> TokenReply<'a>;
}

/// Refresh this long before expiry, so no request carries a token about to lapse.
pub const MARGIN: Duration = Duration::from_secs(300);

/// How long before its expiry a token of `lifetime` is refreshed: `MARGIN`, or half its
/// life for a token that lives no longer than that (it would otherwise never be fresh,
/// and every request would fetch one).
pub fn margin(lifetime: Duration) -> Duration {
    if lifetime > MARGIN { MARGIN } else { lifetime / 2 }
}

/// A cached token: the value, when to refresh it, when it lapses.
struct Cached {
    token: Secret,
    refresh_at: Instant,
    until: Instant,
}

/// A minted token and until when it may be used, with one refresh in flight.
#[derive(Default)]
pub struct TokenCache {
    cache: Mutex<Option<Cached>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCache")
    }
}

impl TokenCache {
    /// A token that is still valid now (never one past its expiry).
    pub fn current(&self) -> Option<Secret> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.as_ref().filter(|c| c.until > Instant::now()).map(|c| c.token.clone())
    }

    fn fresh(&self) -> bool {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.as_ref().is_some_and(|c| c.refresh_at > Instant::now())
    }

    /// Make sure a token with life left is cached, fetching one with `fetch` when not.
    /// `stale`: the token an upstream just refused (401); it is replaced even if it has
    /// not expired. One refresh at a time; the others wait for it and use its result.
    pub async fn ensure<F, Fut>(&self, stale: Option<&Secret>, fetch: F) -> Result<(), MintError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(Secret, Duration), MintError>>,
    {
        let needed = |s: &Self| match stale {
            Some(old) => s.current().as_ref() == Some(old) || !s.fresh(),
            None => !s.fresh(),
        };
        if !needed(self) {
            return Ok(());
        }
        let _one = self.refreshing.lock().await;
        if !needed(self) {
            return Ok(());
        }
        let (token, lifetime) = fetch().await?;
        let now = Instant::now();
        let cached = Cached { token, refresh_at: now + lifetime - margin(lifetime), until: now + lifetime };
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = Some(cached);
        Ok(())
    }

    /// The `renew` hook of a minted credential: the token in use was refused (401), so
    /// get another (once, shared by every request that saw the refusal). True when the
    /// request may go again.
    pub async fn renew<F, Fut>(&self, fetch: F) -> bool
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(Secret, Duration), MintError>>,
    {
        let used = self.current();
        self.ensure(used.as_ref(), fetch).await.is_ok()
    }
}

/// Write `Authorization: <value>` as the only copy (invariant 3), marked sensitive.
pub fn write_authorization(parts: &mut http::request::Parts, value: &str) -> Result<(), super::InjectError> {
    let mut value = HeaderValue::from_str(value)
        .map_err(|_| super::InjectError::Unavailable("the token is not a valid header value".into()))?;
    value.set_sensitive(true);
    while parts.headers.remove(http::header::AUTHORIZATION).is_some() {}
    parts.headers.insert(http::header::AUTHORIZATION, value);
    Ok(())
}

/// An RFC 6749 section 5.1 token response: the access token and its lifetime
/// (`expires_in`, one hour when absent). Errors name `url` and the OAuth error code
/// (RFC 6749 5.2), never a secret.
pub fn access_token(url: &str, status: u16, body: &[u8]) -> Result<(Secret, Duration), MintError> {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    if status != 200 {
        let code = json.as_ref().and_then(|j| j["error"].as_str()).filter(|c| is_error_code(c));
        let code = code.map(|c| format!(" ({c})")).unwrap_or_default();
        return Err(format!("the token endpoint {url} answered {status}{code}").into());
    }
    let json = json.ok_or_else(|| format!("the token endpoint {url} sent no JSON"))?;
    let token = json["access_token"].as_str().ok_or_else(|| format!("no access_token from {url}"))?;
    if let Some(kind) = json["token_type"].as_str().filter(|t| !t.eq_ignore_ascii_case("bearer")) {
        return Err(format!("{url} issued a {kind:?} token; latchkey writes bearer tokens only").into());
    }
    let lifetime = Duration::from_secs(json["expires_in"].as_u64().unwrap_or(3600));
    Ok((Secret::new(token.to_string()), lifetime))
}

/// An OAuth error code is a short token of printable ASCII (RFC 6749 5.2); anything
/// else is not repeated (it could be anything the endpoint chose to echo).
fn is_error_code(c: &str) -> bool {
    c.len() <= 64 && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// An RS256-signed JWT (RFC 7519) of `claims` (a service account's assertion, a GitHub
/// App's token), signed with aws-lc-rs like the rest of latchkey's cryptography.
pub fn rs256_jwt(
    claims: &serde_json::Value,
    key: &aws_lc_rs::signature::RsaKeyPair,
) -> Result<String, MintError> {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
    let header = B64URL.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let signing_input = format!("{header}.{}", B64URL.encode(claims.to_string()));
    let mut sig = vec![0u8; key.public_modulus_len()];
    let rng = aws_lc_rs::rand::SystemRandom::new();
    key.sign(&aws_lc_rs::signature::RSA_PKCS1_SHA256, &rng, signing_input.as_bytes(), &mut sig)
        .map_err(|_| "signing the JWT failed".to_string())?;
    Ok(format!("{signing_input}.{}", B64URL.encode(sig)))
}

/// An RSA private key from PEM: PKCS#8 (`BEGIN PRIVATE KEY`) or PKCS#1 (`BEGIN RSA
/// PRIVATE KEY`, what GitHub hands out for apps).
pub fn rsa_key(pem: &str) -> Result<aws_lc_rs::signature::RsaKeyPair, MintError> {
    use aws_lc_rs::signature::RsaKeyPair;
    let der = pem_body(pem).ok_or("the private key is not PEM")?;
    let key = if pem.contains("BEGIN RSA PRIVATE KEY") {
        RsaKeyPair::from_der(&der)
    } else {
        RsaKeyPair::from_pkcs8(&der)
    };
    key.map_err(|e| format!("the private key: {e}").into())
}

/// The DER inside one PEM block.
pub fn pem_body(pem: &str) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    use base64::Engine;
    let b64: zeroize::Zeroizing<String> = zeroize::Zeroizing::new(
        pem.lines().map(str::trim).filter(|l| !l.starts_with("-----") && !l.is_empty()).collect(),
    );
    base64::engine::general_purpose::STANDARD.decode(b64.as_bytes()).ok().map(zeroize::Zeroizing::new)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> Result<u64, MintError> {
    use std::time::{SystemTime, UNIX_EPOCH};
    Ok(SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_lived_tokens_refresh_at_half_life() {
        assert_eq!(margin(Duration::from_secs(3600)), MARGIN);
        assert_eq!(margin(Duration::from_secs(301)), MARGIN);
        assert_eq!(margin(Duration::from_secs(300)), Duration::from_secs(150));
        assert_eq!(margin(Duration::from_secs(2)), Duration::from_secs(1));
    }

    #[test]
    fn token_errors_name_the_endpoint_and_a_code_never_an_echo() {
        let url = "https://auth.example.com/token";
        let e = access_token(url, 401, br#"{"error":"invalid_client"}"#).unwrap_err().0;
        assert_eq!(e, "the token endpoint https://auth.example.com/token answered 401 (invalid_client)");
        let e = access_token(url, 400, br#"{"error":"bad secret=cs-123 echoed"}"#).unwrap_err().0;
        assert!(!e.contains("cs-123"), "{e}");
        let e = access_token(url, 200, br#"{"access_token":"t","token_type":"mac"}"#).unwrap_err().0;
        assert!(e.contains("bearer tokens only"), "{e}");
        let (t, life) =
            access_token(url, 200, br#"{"access_token":"t","token_type":"bearer","expires_in":60}"#).unwrap();
        assert_eq!((t.expose(), life), ("t", Duration::from_secs(60)));
    }
}
