//! `[admin] webhook`: every new pending approval is POSTed there as JSON
//! (`{"id","host","port","agent","credential","method","path"}`), signed
//! `X-Latchkey-Signature: sha256=<hex HMAC-SHA256 of the body under the admin token>`.
//! A 200 answer `{"decision":"allow|deny","scope":"once|run|always"}` decides; anything
//! else (another status, a body that does not parse, no answer in 10 s) leaves it to a
//! person. The webhook is the operator's own service: it is called directly, not
//! through the proxy's SSRF rule (a Slack bot on the same host is normal).

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;

use super::{Approvals, Choice, Pending, Scope};

/// How long the webhook has to answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The most of its answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// Where to send, and the key to sign with.
#[derive(Clone)]
pub struct Hook {
    pub url: String,
    pub key: Arc<[u8]>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

#[derive(Deserialize)]
struct Answer {
    decision: Choice,
    #[serde(default = "once")]
    scope: Scope,
}

fn once() -> Scope {
    Scope::Once
}

/// `sha256=<hex>` of `body` under `key`.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    format!("sha256={}", hex::encode(aws_lc_rs::hmac::sign(&key, body).as_ref()))
}

impl Hook {
    /// Send in the background; apply its answer if it gives one.
    pub fn send(self, approvals: Arc<Approvals>, p: Pending) {
        tokio::spawn(async move {
            let body = json!({
                "id": p.id, "host": p.host, "port": p.port, "agent": p.agent,
                "credential": p.credential, "method": p.method, "path": p.path,
            })
            .to_string();
            let answer = match tokio::time::timeout(TIMEOUT, self.post(body)).await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => return tracing::warn!("approvals webhook {}: {e}", self.url),
                Err(_) => return tracing::warn!("approvals webhook {}: no answer in 10 s", self.url),
            };
            let Some(a) = answer else { return };
            match approvals.decide(&p.id, a.decision, a.scope).await {
                Ok(_) => {
                    tracing::info!(host = %p.host, id = %p.id, decision = ?a.decision, scope = ?a.scope, "approval answered by the webhook")
                }
                Err(e) => tracing::info!("approvals webhook answer for {}: {e}", p.id),
            }
        });
    }

    async fn post(&self, body: String) -> Result<Option<Answer>, Box<dyn std::error::Error + Send + Sync>> {
        let uri: http::Uri = self.url.parse()?;
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().ok_or("no host")?.trim_matches(['[', ']']).to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        let req = http::Request::post(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header(http::header::HOST, uri.authority().map(|a| a.as_str()).unwrap_or(&host))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, concat!("latchkey/", env!("CARGO_PKG_VERSION")))
            .header("x-latchkey-signature", signature(&self.key, body.as_bytes()))
            .body(Full::new(bytes::Bytes::from(body)))?;
        let resp = if https {
            let tls = self.tls.clone().ok_or("no TLS configuration")?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())?;
            let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
            exchange(TokioIo::new(stream), req).await?
        } else {
            exchange(TokioIo::new(tcp), req).await?
        };
        if resp.status() != http::StatusCode::OK {
            return Ok(None);
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER).collect().await?.to_bytes();
        Ok(serde_json::from_slice(&body).ok())
    }
}

async fn exchange<I>(
    io: I,
    req: http::Request<Full<bytes::Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    send.send_request(req).await
}
