//! `auth_type = "oauth2_client_credentials"` (RFC 6749 section 4.4): latchkey holds the
//! client secret, fetches access tokens from `token_url` through its own upstream
//! client (so `[upstream]` trust, `resolve` and the corporate proxy apply to the token
//! endpoint too), caches each until shortly before it expires, and writes it as a
//! bearer token. The client secret goes to `token_url` and nowhere else: it is never
//! written into a request the agent makes.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::header::{AUTHORIZATION, HeaderValue};
use http::request::Parts;

use super::build::{BuildError, Built, Sources};
use super::mint::{self, MintError, TokenCache, TokenHttp, TokenRequest};
use super::{Hook, InjectError, Injector, Slot, encode_component};
use crate::config::raw::RawCredential;
use crate::policy::{Destination, RequestHead};
use crate::secrets::{Secret, SecretValue};

/// How the client authenticates to the token endpoint (RFC 6749 2.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientAuth {
    /// `Authorization: Basic` of the form-encoded id and secret (the default).
    Basic,
    /// `client_id` and `client_secret` in the form body.
    Post,
}

pub struct ClientCredentials {
    token_url: String,
    client_id: String,
    client_secret: SecretValue,
    scope: Option<String>,
    audience: Option<String>,
    auth: ClientAuth,
    cache: TokenCache,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials").field("token_url", &self.token_url).finish_non_exhaustive()
    }
}

impl ClientCredentials {
    /// One token request: the grant, the scopes and audience asked for, the client's
    /// authentication. The only place the client secret is written.
    async fn fetch(&self, http: &dyn TokenHttp) -> Result<(Secret, Duration), MintError> {
        self.client_secret.ensure().await;
        let secret = self
            .client_secret
            .get(&[])
            .ok_or_else(|| MintError(format!("the client secret for {} cannot be read", self.token_url)))?;
        let mut form = zeroize::Zeroizing::new(String::from("grant_type=client_credentials"));
        if let Some(scope) = &self.scope {
            form.push_str(&format!("&scope={}", encode_component(scope)));
        }
        if let Some(audience) = &self.audience {
            form.push_str(&format!("&audience={}", encode_component(audience)));
        }
        let mut req = TokenRequest::form(&self.token_url, String::new());
        match self.auth {
            ClientAuth::Basic => {
                let pair = zeroize::Zeroizing::new(format!(
                    "{}:{}",
                    encode_component(&self.client_id),
                    encode_component(secret.expose())
                ));
                let b64 = zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*pair));
                let value = HeaderValue::from_str(&format!("Basic {}", &*b64))
                    .map_err(|_| MintError("the client credentials are not a valid header value".into()))?;
                req.headers.push((AUTHORIZATION, value));
            }
            ClientAuth::Post => form.push_str(&format!(
                "&client_id={}&client_secret={}",
                encode_component(&self.client_id),
                encode_component(secret.expose())
            )),
        }
        req.headers.push((http::header::ACCEPT, HeaderValue::from_static("application/json")));
        req.body = form.as_bytes().to_vec();
        let (status, body) = http.post(req).await?;
        mint::access_token(&self.token_url, status, &body)
    }
}

#[derive(Debug)]
pub struct OAuth2Injector {
    pub source: Arc<ClientCredentials>,
}

impl Injector for OAuth2Injector {
    fn inject(&self, parts: &mut Parts, _: &[(String, String)], _: Option<&[u8]>) -> Result<(), InjectError> {
        let token = self
            .source
            .cache
            .current()
            .ok_or_else(|| InjectError::Unavailable("no valid access token".into()))?;
        mint::write_authorization(parts, &format!("Bearer {}", token.expose()))
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

    fn carries_placeholder(&self, _: &Destination, head: &RequestHead<'_>, placeholder: &str) -> bool {
        let auth = head.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
        auth.strip_prefix("Bearer ") == Some(placeholder)
    }

    fn presented<'h>(&self, _: &Destination, head: &RequestHead<'h>) -> Option<std::borrow::Cow<'h, str>> {
        let auth = head.headers.get(AUTHORIZATION)?.to_str().ok()?;
        auth.strip_prefix("Bearer ").map(std::borrow::Cow::Borrowed)
    }

    fn slots(&self) -> Vec<Slot> {
        vec![Slot::Header { header: "authorization".into() }]
    }

    fn secrets(&self, out: &mut Vec<Secret>) {
        self.source.client_secret.add_to(out);
        out.extend(self.source.cache.current());
    }
}

/// `token_url` (https), `client_id`, `client_secret` (any secret source), `scopes`,
/// `audience`, `token_endpoint_auth_method`.
pub fn build(c: &RawCredential, sources: &mut Sources<'_>) -> Result<Built, BuildError> {
    if c.value.is_some() || c.header.is_some() {
        return Err(BuildError::new(
            "value",
            "oauth2_client_credentials mints its own tokens: set client_secret (and token_url, client_id)",
        ));
    }
    let token_url = c.token_url.clone().ok_or_else(|| BuildError::new("token_url", "required"))?;
    https_url("token_url", &token_url)?;
    let client_id = c.client_id.clone().ok_or_else(|| BuildError::new("client_id", "required"))?;
    let auth = match c.token_endpoint_auth_method.as_deref() {
        None | Some("client_secret_basic") => ClientAuth::Basic,
        Some("client_secret_post") => ClientAuth::Post,
        Some(other) => {
            return Err(BuildError::new(
                "token_endpoint_auth_method",
                format!("{other:?}: expected client_secret_basic or client_secret_post"),
            ));
        }
    };
    let primary = sources.source("client_secret", c.client_secret.as_ref())?;
    let client_secret = sources.resolve_or_unset(&primary);
    let scope = (!c.scopes.is_empty()).then(|| c.scopes.join(" "));
    let source = ClientCredentials {
        token_url,
        client_id,
        client_secret,
        scope,
        audience: c.audience.clone(),
        auth,
        cache: TokenCache::default(),
    };
    Ok(Built::new(Box::new(OAuth2Injector { source: Arc::new(source) }), primary))
}

/// A token endpoint gets a secret: only over TLS, to a host named in the URL.
pub fn https_url(key: &'static str, url: &str) -> Result<(), BuildError> {
    let uri: http::Uri = url.parse().map_err(|e| BuildError::new(key, format!("{url:?}: {e}")))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() {
        return Err(BuildError::new(key, format!("{url:?}: must be an https:// URL (it is sent a secret)")));
    }
    Ok(())
}
