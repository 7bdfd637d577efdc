//! `auth_type = "gcp"`: latchkey mints Google OAuth2 access tokens itself — from a
//! service-account key (an RS256-signed JWT) or an `authorized_user` refresh token —
//! caches them, refreshes them before they expire with one refresh in flight, and
//! writes `Authorization: Bearer`. Client libraries are handed a stub ADC file and get
//! a dummy token from latchkey (token vending), so the agent never holds a real one.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::request::Parts;

use super::build::{BuildError, Built, Sources};
use super::mint::{self, MintError, TokenCache, TokenHttp, TokenRequest};
use super::{Hook, InjectError, Injector, Slot, Vended};
use crate::config::raw::RawCredential;
use crate::policy::{Destination, Endpoint, Host, RequestHead};
use crate::secrets::{Secret, Source};

pub const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
pub const DEFAULT_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Google endpoints that exchange a token for new credentials.
const MINTING_HOSTS: &[&str] =
    &["oauth2.googleapis.com", "sts.googleapis.com", "iamcredentials.googleapis.com"];

/// What latchkey hands a client library that asks for a token (never a real one).
pub const VENDED_TOKEN: &str = "latchkey-vended-gcp-token";

enum Grant {
    ServiceAccount { client_email: String, key: aws_lc_rs::signature::RsaKeyPair },
    AuthorizedUser { client_id: String, client_secret: Secret, refresh_token: Secret },
}

pub struct TokenSource {
    grant: Grant,
    token_uri: String,
    scope: String,
    cache: TokenCache,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource").field("token_uri", &self.token_uri).finish_non_exhaustive()
    }
}

impl TokenSource {
    /// Read a service-account or authorized_user JSON file.
    pub fn from_file(path: &Path, scopes: &[String]) -> Result<TokenSource, MintError> {
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
                let key = mint::rsa_key(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
                Grant::ServiceAccount { client_email: field("client_email")?, key }
            }
            Some("authorized_user") => Grant::AuthorizedUser {
                client_id: field("client_id")?,
                client_secret: Secret::new(field("client_secret")?),
                refresh_token: Secret::new(field("refresh_token")?),
            },
            other => return Err(format!("{}: unsupported credential type {other:?}", path.display()).into()),
        };
        let token_uri = json["token_uri"].as_str().unwrap_or(DEFAULT_TOKEN_URI).to_string();
        let scope = if scopes.is_empty() { DEFAULT_SCOPE.to_string() } else { scopes.join(" ") };
        Ok(TokenSource { grant, token_uri, scope, cache: TokenCache::default() })
    }

    /// A token that is still valid now (never one past its expiry).
    pub fn current(&self) -> Option<Secret> {
        self.cache.current()
    }

    /// Make sure a token with life left is cached. `stale`: the token an upstream just
    /// refused (401); it is replaced even if it has not expired.
    pub async fn ensure(&self, http: &dyn TokenHttp, stale: Option<&Secret>) -> Result<(), MintError> {
        self.cache.ensure(stale, || self.fetch(http)).await
    }

    async fn fetch(&self, http: &dyn TokenHttp) -> Result<(Secret, Duration), MintError> {
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
        let (status, body) = http.post(TokenRequest::form(&self.token_uri, form)).await?;
        mint::access_token(&self.token_uri, status, &body)
    }

    fn jwt(&self, client_email: &str, key: &aws_lc_rs::signature::RsaKeyPair) -> Result<String, MintError> {
        let now = mint::unix_now()?;
        let claims = serde_json::json!({
            "iss": client_email, "scope": self.scope, "aud": self.token_uri, "iat": now, "exp": now + 3600,
        });
        mint::rs256_jwt(&claims, key)
    }
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
        let token =
            self.source.current().ok_or_else(|| InjectError::Unavailable("no valid access token".into()))?;
        mint::write_authorization(parts, &format!("Bearer {}", token.expose()))
    }

    fn refresh<'a>(&'a self, http: &'a dyn TokenHttp) -> Hook<'a, Result<(), InjectError>> {
        Box::pin(async move { Ok(self.source.ensure(http, None).await?) })
    }

    fn replays_after_401(&self) -> bool {
        true
    }

    fn renew<'a>(&'a self, http: &'a dyn TokenHttp) -> Hook<'a, bool> {
        Box::pin(self.source.cache.renew(|| self.source.fetch(http)))
    }

    fn vend(&self) -> Option<Vended> {
        let body = serde_json::json!({
            "access_token": VENDED_TOKEN,
            "expires_in": 3599,
            "token_type": "Bearer",
        });
        Some(Vended { content_type: "application/json", body: body.to_string() })
    }

    fn carries_placeholder(&self, _: &Destination, head: &RequestHead<'_>, placeholder: &str) -> bool {
        let auth = head.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
        let bearer = |t: &str| auth.strip_prefix("Bearer ") == Some(t);
        bearer(placeholder) || bearer(VENDED_TOKEN)
    }

    fn slots(&self) -> Vec<Slot> {
        vec![Slot::Header { header: "authorization".into() }]
    }

    fn secrets(&self, out: &mut Vec<Secret>) {
        out.extend(self.source.current());
    }
}

/// `credentials_file` (a service-account or `authorized_user` JSON; default:
/// Application Default Credentials) and `scopes`. The credential is never written to
/// Google's minting endpoints, and latchkey answers client libraries' token refreshes
/// itself.
pub fn build(c: &RawCredential, sources: &mut Sources<'_>) -> Result<Built, BuildError> {
    if c.value.is_some() || c.header.is_some() {
        return Err(BuildError::new(
            "value",
            "gcp mints its own tokens: set credentials_file (or nothing, for ADC)",
        ));
    }
    let path = match &c.credentials_file {
        Some(p) => Some(sources.path(p)),
        None => discover_adc(&|k| sources.env(k)),
    };
    let file = Source::File(path.clone().unwrap_or_default());
    let source = match path {
        Some(p) if p.exists() => match load(&p, &c.scopes) {
            Ok(ts) => Some(Arc::new(ts)),
            Err(why) => {
                sources.failed(why.to_string());
                None
            }
        },
        Some(p) => {
            sources.missing(format!("{} does not exist", p.display()));
            None
        }
        None => {
            sources.missing("no Google credentials found".into());
            None
        }
    };
    let injector: Box<dyn Injector> = match source {
        Some(source) => Box::new(GcpInjector { source }),
        None => Box::new(super::mtls::NoInjection),
    };
    let mut built = Built::new(injector, file);
    built.never_to = MINTING_HOSTS.iter().map(|h| Host::Domain((*h).to_string())).collect();
    built.vends = Some(Endpoint { dest: token_endpoint(), method: "POST", path: "/token" });
    Ok(built)
}

/// A key file latchkey trusts (nobody else can write it), read.
fn load(path: &Path, scopes: &[String]) -> Result<TokenSource, MintError> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    crate::secrets::owner_only_writable(&meta).map_err(|w| format!("{} {w}", path.display()))?;
    TokenSource::from_file(path, scopes)
}

/// Where client libraries given latchkey's stub credentials file ask for tokens.
fn token_endpoint() -> Destination {
    Destination { host: Host::Domain("oauth2.googleapis.com".into()), port: 443 }
}
