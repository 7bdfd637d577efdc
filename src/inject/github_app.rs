//! `auth_type = "github_app"`: latchkey holds the app's private key, signs the app JWT
//! (RS256), mints installation tokens (`POST /app/installations/{id}/access_tokens`,
//! narrowed to `repositories` and `permissions` when given), caches each until 5
//! minutes before it expires, and writes it: bearer on the API host, basic
//! `x-access-token:<token>` for git on any other host the credential names
//! (github.com). One credential, one cached token, both hosts. The agent never sees the
//! key, the JWT nor an installation token.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http::header::{ACCEPT, AUTHORIZATION, HeaderName, HeaderValue, USER_AGENT};
use http::request::Parts;

use super::build::{BuildError, Built, Sources};
use super::mint::{self, MintError, TokenCache, TokenHttp, TokenRequest};
use super::{Hook, InjectError, Injector, Slot};
use crate::config::raw::RawCredential;
use crate::policy::{Destination, Host, RequestHead};
use crate::secrets::{Secret, SecretValue};

/// Where installation tokens are minted, and where they are written as bearer tokens.
pub const API_HOST: &str = "api.github.com";

pub struct AppTokens {
    app_id: u64,
    installation_id: u64,
    private_key: SecretValue,
    /// The JSON body of each mint: `repositories` and `permissions` when given.
    narrowing: serde_json::Value,
    url: String,
    cache: TokenCache,
}

impl std::fmt::Debug for AppTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppTokens")
            .field("app_id", &self.app_id)
            .field("installation_id", &self.installation_id)
            .finish_non_exhaustive()
    }
}

impl AppTokens {
    /// The app JWT: issued a minute ago (clock drift), valid for nine more (GitHub
    /// allows ten), issuer the app id.
    fn app_jwt(&self) -> Result<String, MintError> {
        let pem = self.private_key.get(&[]).ok_or("the app's private key cannot be read")?;
        let key = mint::rsa_key(pem.expose())?;
        let now = mint::unix_now()?;
        let claims = serde_json::json!({ "iat": now - 60, "exp": now + 540, "iss": self.app_id.to_string() });
        mint::rs256_jwt(&claims, &key)
    }

    async fn fetch(&self, http: &dyn TokenHttp) -> Result<(Secret, Duration), MintError> {
        self.private_key.ensure().await;
        let jwt = Secret::new(self.app_jwt()?);
        let bearer = HeaderValue::from_str(&format!("Bearer {}", jwt.expose()))
            .map_err(|_| MintError("the app JWT is not a valid header value".into()))?;
        let req = TokenRequest {
            url: &self.url,
            content_type: "application/json",
            headers: vec![
                (AUTHORIZATION, bearer),
                (ACCEPT, HeaderValue::from_static("application/vnd.github+json")),
                (HeaderName::from_static("x-github-api-version"), HeaderValue::from_static("2022-11-28")),
                (USER_AGENT, HeaderValue::from_static("latchkey")),
            ],
            body: self.narrowing.to_string().into_bytes(),
        };
        let (status, body) = http.post(req).await?;
        installation_token(&self.url, status, &body)
    }
}

/// GitHub's answer: 201 with `token` and `expires_at` (RFC 3339).
fn installation_token(url: &str, status: u16, body: &[u8]) -> Result<(Secret, Duration), MintError> {
    if status != 201 && status != 200 {
        return Err(format!("{url} answered {status}").into());
    }
    let json: serde_json::Value = serde_json::from_slice(body).map_err(|_| format!("{url} sent no JSON"))?;
    let token = json["token"].as_str().ok_or_else(|| format!("no token from {url}"))?;
    let expires = json["expires_at"].as_str().ok_or_else(|| format!("no expires_at from {url}"))?;
    let at = time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)
        .map_err(|_| format!("{url}: expires_at is not a date"))?;
    let left = (at - time::OffsetDateTime::now_utc()).whole_seconds();
    if left <= 0 {
        return Err(format!("{url} issued a token that has already expired").into());
    }
    Ok((Secret::new(token.to_string()), Duration::from_secs(left as u64)))
}

#[derive(Debug)]
pub struct GitHubAppInjector {
    pub source: Arc<AppTokens>,
}

fn is_api(host: Option<&str>) -> bool {
    host.is_some_and(|h| h.eq_ignore_ascii_case(API_HOST))
}

impl Injector for GitHubAppInjector {
    fn inject(&self, parts: &mut Parts, _: &[(String, String)], _: Option<&[u8]>) -> Result<(), InjectError> {
        let token = self
            .source
            .cache
            .current()
            .ok_or_else(|| InjectError::Unavailable("no valid installation token".into()))?;
        if is_api(parts.uri.host()) {
            return mint::write_authorization(parts, &format!("Bearer {}", token.expose()));
        }
        let pair = zeroize::Zeroizing::new(format!("x-access-token:{}", token.expose()));
        let basic = zeroize::Zeroizing::new(format!("Basic {}", B64.encode(pair.as_bytes())));
        mint::write_authorization(parts, &basic)
    }

    fn refresh<'a>(&'a self, http: &'a dyn TokenHttp) -> Hook<'a, Result<(), InjectError>> {
        Box::pin(async move { Ok(self.source.cache.ensure(None, || self.source.fetch(http)).await?) })
    }

    fn replays_after_401(&self) -> bool {
        true
    }

    fn renew<'a>(&'a self, http: &'a dyn TokenHttp) -> Hook<'a, bool> {
        Box::pin(self.source.cache.renew(|| self.source.fetch(http)))
    }

    fn carries_placeholder(&self, dest: &Destination, head: &RequestHead<'_>, placeholder: &str) -> bool {
        self.presented(dest, head).as_deref() == Some(placeholder)
    }

    /// On the API: the bearer (or `token`) value; for git: the basic password.
    fn presented<'h>(&self, dest: &Destination, head: &RequestHead<'h>) -> Option<Cow<'h, str>> {
        let auth = head.headers.get(AUTHORIZATION)?.to_str().ok()?;
        let api = matches!(&dest.host, Host::Domain(d) if is_api(Some(d)));
        if api {
            let t = auth.strip_prefix("Bearer ").or_else(|| auth.strip_prefix("token "))?;
            return Some(Cow::Borrowed(t));
        }
        let decoded = B64.decode(auth.strip_prefix("Basic ")?).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        text.split_once(':').map(|(_, p)| Cow::Owned(p.to_string()))
    }

    fn slots(&self) -> Vec<Slot> {
        vec![Slot::Header { header: "authorization".into() }]
    }

    fn secrets(&self, out: &mut Vec<Secret>) {
        self.source.private_key.add_to(out);
        out.extend(self.source.cache.current());
    }
}

/// `app_id`, `installation_id`, `private_key` (PEM, any secret source), optional
/// `repositories` and `permissions`.
pub fn build(c: &RawCredential, sources: &mut Sources<'_>) -> Result<Built, BuildError> {
    if c.value.is_some() || c.header.is_some() {
        return Err(BuildError::new(
            "value",
            "github_app mints its own tokens: set private_key, app_id and installation_id",
        ));
    }
    let app_id = c.app_id.ok_or_else(|| BuildError::new("app_id", "required (an integer)"))?;
    let installation_id =
        c.installation_id.ok_or_else(|| BuildError::new("installation_id", "required (an integer)"))?;
    let primary = sources.source("private_key", c.private_key.as_ref())?;
    let private_key = sources.resolve_or_unset(&primary);
    if let Some(pem) = private_key.get(&[]).filter(|_| sources.state == crate::policy::CredState::Active)
        && let Err(e) = mint::rsa_key(pem.expose())
    {
        sources.failed(format!("private_key: {e}"));
    }
    let mut narrowing = serde_json::Map::new();
    if let Some(repos) = &c.repositories {
        narrowing.insert("repositories".into(), serde_json::json!(repos));
    }
    if let Some(perms) = &c.permissions {
        narrowing.insert("permissions".into(), serde_json::json!(perms));
    }
    let source = AppTokens {
        app_id,
        installation_id,
        private_key,
        narrowing: serde_json::Value::Object(narrowing),
        url: format!("https://{API_HOST}/app/installations/{installation_id}/access_tokens"),
        cache: TokenCache::default(),
    };
    Ok(Built::new(Box::new(GitHubAppInjector { source: Arc::new(source) }), primary))
}
