//! The HTTP client minted credentials reach their token endpoints with: the proxy's own
//! upstream client, so the same trust roots, SSRF rule and `[upstream.resolve]` apply
//! as to any request latchkey forwards.

use std::time::Duration;

use http::{Request, header};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;

use super::upstream::Connector;
use super::{Body, respond};
use crate::inject::TokenHttp;
use crate::inject::mint::{MintError, TokenReply, TokenRequest};

/// Largest token-endpoint answer read.
const MAX_REPLY: usize = 64 * 1024;

pub struct ClientHttp<'a> {
    pub client: &'a Client<Connector, Body>,
    pub timeout: Duration,
}

impl TokenHttp for ClientHttp<'_> {
    fn post<'a>(&'a self, req: TokenRequest<'a>) -> TokenReply<'a> {
        Box::pin(async move {
            let url = req.url;
            let mut builder = Request::post(url).header(header::CONTENT_TYPE, req.content_type);
            for (name, mut value) in req.headers {
                value.set_sensitive(true);
                builder = builder.header(name, value);
            }
            let request = builder.body(respond::full(req.body)).map_err(|e| MintError(e.to_string()))?;
            let send = async {
                let resp = self.client.request(request).await.map_err(|e| format!("{url}: {e}"))?;
                let status = resp.status().as_u16();
                let limited = http_body_util::Limited::new(resp.into_body(), MAX_REPLY);
                let body = limited.collect().await.map_err(|e| format!("{url}: {e}"))?.to_bytes();
                Ok::<_, MintError>((status, body.to_vec()))
            };
            tokio::time::timeout(self.timeout, send).await.map_err(|_| format!("{url}: timed out"))?
        })
    }
}
