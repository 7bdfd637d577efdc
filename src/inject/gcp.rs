//! `auth_type = "gcp"`: latchkey mints Google OAuth2 access tokens itself — from a
//! service-account key (an RS256-signed JWT) or an `authorized_user` refresh token —
//! caches them, refreshes them before they expire with one refresh in flight, and
//! writes `Authorization: Bearer`. Client libraries are handed a stub ADC file and get
//! a dummy token from latchkey (token vending), so the agent never holds a real one.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use http::header::{AUTHORIZATION, HeaderValue};
use http::request::Parts;

use super::{InjectError, Injector, Slot};
use crate::secrets::Secret;

/// Refresh this long before expiry, so no request carries a token about to lapse.
const MARGIN: Duration = Duration::from_secs(300);
pub const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
pub const DEFAULT_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Google endpoints that exchange a token for new credentials.
const MINTING_HOSTS: &[&str] =
    &["oauth2.googleapis.com", "sts.googleapis.com", "iamcredentials.googleapis.com"];

/// What latchkey hands a client library that asks for a token (never a real one).
pub const VENDED_TOKEN: &str = "latchkey-vended-gcp-token";

/// A token endpoint's answer: (status, body), or why there was none.
pub type TokenReply<'a> = Pin<Box<dyn Future<Output = Result<(u16, Vec<u8>), String>> + Send + 'a>>;

/// POSTs a form to a token endpoint: (status, body). Implemented by the proxy with its
/// own upstream client (same trust roots, SSRF rules and `[upstream.resolve]`).
pub trait TokenHttp: Send + Sync {
    fn post_form<'a>(&'a self, url: &'a str, body: String) -> TokenReply<'a>;
}

enum Grant {
    ServiceAccount { client_email: String, key: aws_lc_rs::signature::RsaKeyPair },
    AuthorizedUser { client_id: String, client_secret: Secret, refresh_token: Secret },
}

pub struct TokenSource {
    grant: Grant,
    token_uri: String,
    scope: String,
    cache: Mutex<Option<(Secret, Instant)>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource").field("token_uri", &self.token_uri).finish_non_exhaustive()
    }
}

impl TokenSource {
    /// Read a service-account or authorized_user JSON file.
    pub fn from_file(path: &Path, scopes: &[String]) -> Result<TokenSource, String> {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
        );
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
        let field = |k: &str| {
            json[k].as_str().map(str::to_string).ok_or_else(|| format!("{}: no {k}", path.display()))
        };
        let grant = match json["type"].as_str() {
            Some("service_account") => {
                let pem = zeroize::Zeroizing::new(field("private_key")?);
                let der =
                    pem_body(&pem).ok_or_else(|| format!("{}: private_key is not PEM", path.display()))?;
                let key = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(&der)
                    .map_err(|e| format!("{}: private_key: {e}", path.display()))?;
                Grant::ServiceAccount { client_email: field("client_email")?, key }
            }
            Some("authorized_user") => Grant::AuthorizedUser {
                client_id: field("client_id")?,
                client_secret: Secret::new(field("client_secret")?),
                refresh_token: Secret::new(field("refresh_token")?),
            },
            other => return Err(format!("{}: unsupported credential type {other:?}", path.display())),
        };
        let token_uri = json["token_uri"].as_str().unwrap_or(DEFAULT_TOKEN_URI).to_string();
        let scope = if scopes.is_empty() { DEFAULT_SCOPE.to_string() } else { scopes.join(" ") };
        Ok(TokenSource {
            grant,
            token_uri,
            scope,
            cache: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    /// A token that is still valid now (never one past its expiry).
    pub fn current(&self) -> Option<Secret> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.as_ref().filter(|(_, until)| *until > Instant::now()).map(|(t, _)| t.clone())
    }

    fn fresh(&self) -> bool {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.as_ref().is_some_and(|(_, until)| *until > Instant::now() + MARGIN)
    }

    /// Make sure a token with life left is cached. `stale`: the token an upstream just
    /// refused (401); it is replaced even if it has not expired. One refresh at a time;
    /// the others wait for it and use its result.
    pub async fn ensure(&self, http: &dyn TokenHttp, stale: Option<&Secret>) -> Result<(), String> {
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
        let (token, lifetime) = self.fetch(http).await?;
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = Some((token, Instant::now() + lifetime));
        Ok(())
    }

    async fn fetch(&self, http: &dyn TokenHttp) -> Result<(Secret, Duration), String> {
        let form = match &self.grant {
            Grant::ServiceAccount { client_email, key } => {
                let assertion = self.jwt(client_email, key)?;
                format!(
                    "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
                )
            }
            Grant::AuthorizedUser { client_id, client_secret, refresh_token } => format!(
                "grant_type=refresh_token&client_id={}&client_secret={}&refresh_token={}",
                super::encode_component(client_id),
                super::encode_component(client_secret.expose()),
                super::encode_component(refresh_token.expose())
            ),
        };
        let (status, body) = http.post_form(&self.token_uri, form).await?;
        if status != 200 {
            return Err(format!("the token endpoint answered {status}"));
        }
        let json: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| "the token endpoint sent no JSON".to_string())?;
        let token = json["access_token"].as_str().ok_or("no access_token in the token response")?;
        let lifetime = Duration::from_secs(json["expires_in"].as_u64().unwrap_or(3600));
        Ok((Secret::new(token.to_string()), lifetime))
    }

    fn jwt(&self, client_email: &str, key: &aws_lc_rs::signature::RsaKeyPair) -> Result<String, String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs();
        let header = B64URL.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iss": client_email, "scope": self.scope, "aud": self.token_uri, "iat": now, "exp": now + 3600,
        });
        let signing_input = format!("{header}.{}", B64URL.encode(claims.to_string()));
        let mut sig = vec![0u8; key.public_modulus_len()];
        let rng = aws_lc_rs::rand::SystemRandom::new();
        key.sign(&aws_lc_rs::signature::RSA_PKCS1_SHA256, &rng, signing_input.as_bytes(), &mut sig)
            .map_err(|_| "signing the JWT failed".to_string())?;
        Ok(format!("{signing_input}.{}", B64URL.encode(sig)))
    }
}

fn pem_body(pem: &str) -> Option<Vec<u8>> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()
}

/// Where Application Default Credentials live when `credentials_file` is not set.
pub fn discover_adc(env: &dyn Fn(&str) -> Option<String>) -> Option<std::path::PathBuf> {
    if let Some(p) = env("GOOGLE_APPLICATION_CREDENTIALS") {
        return Some(p.into());
    }
    let config = env("CLOUDSDK_CONFIG")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::config::home_dir().join(".config/gcloud"));
    Some(config.join("application_default_credentials.json"))
}

#[derive(Debug)]
pub struct GcpInjector {
    pub source: Arc<TokenSource>,
}

impl Injector for GcpInjector {
    fn inject(&self, parts: &mut Parts, _: &[(String, String)], _: Option<&[u8]>) -> Result<(), InjectError> {
        // Endpoints that turn a token into new credentials: use would become read.
        if let Some(host) = parts.uri.host()
            && MINTING_HOSTS.contains(&host)
        {
            return Err(InjectError::Refused {
                status: 403,
                message: format!("{host} mints credentials; latchkey does not send its token there"),
            });
        }
        let token =
            self.source.current().ok_or_else(|| InjectError::Unavailable("no valid access token".into()))?;
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .map_err(|_| InjectError::Unavailable("the token is not a valid header value".into()))?;
        value.set_sensitive(true);
        while parts.headers.remove(AUTHORIZATION).is_some() {}
        parts.headers.insert(AUTHORIZATION, value);
        Ok(())
    }

    fn carries_placeholder(&self, parts: &Parts, placeholder: &str) -> bool {
        let auth = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
        auth == format!("Bearer {placeholder}") || auth == format!("Bearer {VENDED_TOKEN}")
    }

    fn slots(&self) -> Vec<Slot> {
        vec![Slot::Header { header: "authorization".into() }]
    }

    fn secrets(&self) -> Vec<Secret> {
        self.source.current().into_iter().collect()
    }

    fn token_source(&self) -> Option<&Arc<TokenSource>> {
        Some(&self.source)
    }
}
