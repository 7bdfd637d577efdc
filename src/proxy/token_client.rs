//! The HTTP client minted credentials reach their token endpoints with: the proxy's own
//! upstream client, so the same trust roots, SSRF rule and `[upstream.resolve]` apply
//! as to any request latchkey forwards.

use std::time::Duration;

use http::{Request, header};
use http_body_util::BodyExt;

use super::pool::Pool;
use super::respond;
use crate::inject::TokenHttp;
use crate::inject::mint::{MintError, TokenReply, TokenRequest};

/// Largest token-endpoint answer read.
const MAX_REPLY: usize = 64 * 1024;

pub struct ClientHttp<'a> {
    pub client: &'a Pool,
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
                let body = read_limited(resp.into_body()).await.map_err(|e| format!("{url}: {e}"))?;
                Ok::<_, MintError>((status, body))
            };
            tokio::time::timeout(self.timeout, send).await.map_err(|_| format!("{url}: timed out"))?
        })
    }
}

/// The reply body, up to `MAX_REPLY` bytes.
async fn read_limited(mut body: super::Body) -> Result<Vec<u8>, super::BoxError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            if out.len() + data.len() > MAX_REPLY {
                return Err("length limit exceeded".into());
            }
            out.extend_from_slice(data);
        }
    }
    Ok(out)
}
