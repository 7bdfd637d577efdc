//! Token endpoints latchkey talks to on its own behalf (OAuth2 minting), and the
//! dummy tokens it hands to client libraries (token vending).

use std::time::Duration;

use http::{Request, Response, header};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;

use super::upstream::Connector;
use super::{Body, respond};
use crate::config::Config;
use crate::inject::gcp::{TokenHttp, TokenReply, VENDED_TOKEN};
use crate::policy::{CredState, Destination, Host};

/// The proxy's default upstream client as a token-endpoint client: same trust roots,
/// SSRF rules and `[upstream.resolve]` as any request.
pub struct ClientHttp<'a> {
    pub client: &'a Client<Connector, Body>,
    pub timeout: Duration,
}

impl TokenHttp for ClientHttp<'_> {
    fn post_form<'a>(&'a self, url: &'a str, body: String) -> TokenReply<'a> {
        Box::pin(async move {
            let req = Request::post(url)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(respond::full(body))
                .map_err(|e| e.to_string())?;
            let send = async {
                let resp = self.client.request(req).await.map_err(|e| format!("{url}: {e}"))?;
                let status = resp.status().as_u16();
                let limited = http_body_util::Limited::new(resp.into_body(), 64 * 1024);
                let body = limited.collect().await.map_err(|e| format!("{url}: {e}"))?.to_bytes();
                Ok::<_, String>((status, body.to_vec()))
            };
            tokio::time::timeout(self.timeout, send).await.map_err(|_| format!("{url}: timed out"))?
        })
    }
}

/// Google client libraries given latchkey's stub ADC file POST to this endpoint to
/// "refresh"; latchkey answers them itself with a dummy token, never forwarding.
pub fn vend(
    config: &Config,
    dest: &Destination,
    method: &http::Method,
    path: &str,
) -> Option<Response<Body>> {
    let gcp_active = config
        .policy
        .credentials
        .iter()
        .zip(&config.credentials)
        .any(|(r, c)| r.state == CredState::Active && c.auth_type == "gcp");
    let is_token_endpoint = dest.host == Host::Domain("oauth2.googleapis.com".into()) && dest.port == 443;
    if !(gcp_active && is_token_endpoint && method == http::Method::POST && path == "/token") {
        return None;
    }
    let body = serde_json::json!({
        "access_token": VENDED_TOKEN,
        "expires_in": 3599,
        "token_type": "Bearer",
    });
    let mut resp = Response::new(respond::full(body.to_string()));
    resp.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().expect("static"));
    Some(resp)
}
