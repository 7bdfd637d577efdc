//! What minted credentials (gcp today; OAuth2 client credentials and GitHub App
//! installation tokens are built the same way) share: a way to call their token
//! endpoint through latchkey's own upstream client, a cache of the token with one
//! refresh in flight, and the error a failed refresh is.

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

/// A minted token and until when it may be used, with one refresh in flight.
#[derive(Default)]
pub struct TokenCache {
    cache: Mutex<Option<(Secret, Instant)>>,
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
        cache.as_ref().filter(|(_, until)| *until > Instant::now()).map(|(t, _)| t.clone())
    }

    fn fresh(&self) -> bool {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.as_ref().is_some_and(|(_, until)| *until > Instant::now() + MARGIN)
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
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = Some((token, Instant::now() + lifetime));
        Ok(())
    }
}
