//! Who is asking: `[agents]` proxy authentication — which agent a client is, by a token
//! in `Proxy-Authorization` or a client certificate on a TLS proxy port
//! (`proxy::hop`). What an agent may reach and use is the policy's (`policy::agents`).

use std::sync::Arc;

use base64::Engine;
use http::HeaderMap;
use http::header::PROXY_AUTHORIZATION;
use rustls::pki_types::CertificateDer;

use crate::config::{Agent, Config};
use crate::policy::{Refusal, RefusalKind};

/// The agent behind a request: its client certificate (on a `[proxy] tls` port) or its
/// `Proxy-Authorization`. `Ok(None)` when no agents are configured (anyone allowed in may
/// use the proxy); 407 when they are and the request names none, names one wrongly, or
/// its certificate and header name two different agents.
pub fn authenticate(
    config: &Config,
    headers: &HeaderMap,
    cert: Option<&ClientCert>,
) -> Result<Option<usize>, Refusal> {
    if config.agents.is_empty() {
        return Ok(None);
    }
    let refuse = |why: &str| {
        Refusal::new(
            RefusalKind::ProxyAuth,
            format!(
                "{why}; send Proxy-Authorization (see `latchkey env --agent NAME`) or the agent's client certificate"
            ),
        )
    };
    let by_cert = cert.and_then(|c| config.agents.iter().position(|a| c.identifies(a)));
    let by_header = headers.get(PROXY_AUTHORIZATION).map(|v| token_agent(config, v));
    match (by_cert, by_header) {
        (Some(i), None) => Ok(Some(i)),
        (Some(i), Some(Some(j))) if i == j => Ok(Some(i)),
        (Some(_), Some(_)) => {
            Err(refuse("the client certificate and Proxy-Authorization name different agents"))
        }
        (None, Some(Some(j))) => Ok(Some(j)),
        (None, Some(None)) => Err(refuse("unknown agent or wrong token")),
        (None, None) if cert.is_some() => Err(refuse("the client certificate identifies no agent")),
        (None, None) => Err(refuse("proxy authentication required")),
    }
}

/// The agent a `Proxy-Authorization` value names with its token, if any.
fn token_agent(config: &Config, value: &http::HeaderValue) -> Option<usize> {
    let value = value.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()
            .and_then(|d| String::from_utf8(d).ok())
            .unwrap_or_default();
        let (name, token) = decoded.split_once(':').unwrap_or(("", ""));
        config.agents.iter().position(|a| a.name == name && token_matches(a, token))
    } else if scheme.eq_ignore_ascii_case("bearer") {
        config.agents.iter().position(|a| token_matches(a, rest))
    } else {
        None
    }
}

/// The certificate a client presented on a TLS proxy port (its signature over the
/// handshake already checked by rustls, so the client holds its key).
#[derive(Clone, Debug)]
pub struct ClientCert {
    sha256: [u8; 32],
    chain: Arc<Vec<CertificateDer<'static>>>,
}

impl ClientCert {
    pub fn from_chain(chain: &[CertificateDer<'_>]) -> Option<ClientCert> {
        let leaf = chain.first()?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref());
        let sha256 = digest.as_ref().try_into().ok()?;
        let chain = Arc::new(chain.iter().map(|c| c.clone().into_owned()).collect());
        Some(ClientCert { sha256, chain })
    }

    fn identifies(&self, agent: &Agent) -> bool {
        agent.client_certs.contains(&self.sha256)
            || agent.client_ca.as_ref().is_some_and(|ca| ca.issued(&self.chain))
    }
}

/// `[agents.NAME] client_ca`: the CA whose client certificates identify an agent.
#[derive(Clone)]
pub struct ClientCa {
    path: std::path::PathBuf,
    roots: Vec<CertificateDer<'static>>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl std::fmt::Debug for ClientCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCa").field("path", &self.path).finish_non_exhaustive()
    }
}

impl ClientCa {
    /// Read a PEM file of CA certificates (a trust anchor: nobody else may write it).
    pub fn load(path: &std::path::Path) -> Result<ClientCa, String> {
        use rustls::pki_types::pem::PemObject;
        let shown = path.display();
        let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
        crate::secrets::owner_only_writable(&meta).map_err(|w| format!("{shown} {w}"))?;
        let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| format!("{shown}: {e}"))?;
        let mut store = rustls::RootCertStore::empty();
        for root in &roots {
            store.add(root.clone()).map_err(|e| format!("{shown}: {e}"))?;
        }
        if store.is_empty() {
            return Err(format!("{shown} holds no certificate"));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
            .build()
            .map_err(|e| format!("{shown}: {e}"))?;
        Ok(ClientCa { path: path.to_path_buf(), roots, verifier })
    }

    /// Did this CA issue `chain` (valid now, for client authentication)?
    fn issued(&self, chain: &[CertificateDer<'static>]) -> bool {
        let Some((leaf, intermediates)) = chain.split_first() else { return false };
        self.verifier.verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now()).is_ok()
    }

    pub fn same_roots(&self, other: &ClientCa) -> bool {
        self.roots.iter().any(|r| other.roots.contains(r))
    }
}

/// A SHA-256 fingerprint as people copy it: 64 hex digits, optionally in colon-separated
/// pairs (`openssl x509 -fingerprint -sha256`), any case.
pub fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    let hex: String = text.trim().chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Constant-time comparison, so response timing says nothing about the token.
fn token_matches(agent: &Agent, presented: &str) -> bool {
    agent.token.as_ref().is_some_and(|t| {
        aws_lc_rs::constant_time::verify_slices_are_equal(t.expose().as_bytes(), presented.as_bytes()).is_ok()
    })
}
