//! A generation: everything derived from one loaded config (the config itself, the
//! upstream dialers and their connection pools). Built whole and swapped whole.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;

use super::fanout;
use super::pool::Pool;
use super::upstream::{self, Dialer};
use crate::config::Config;

/// Everything derived from one loaded config. Swapped whole, never edited: a
/// connection keeps the generation it started with.
pub struct Generation {
    pub config: Arc<Config>,
    /// For requests without a credential, and credentials without TLS material.
    pub dialer: Arc<Dialer>,
    /// Offers h2 and HTTP/1.1 by ALPN: for HTTP/2 clients, and latchkey's own calls.
    pub client: Pool,
    client_h1: Pool,
    /// Credentials with a client certificate or their own roots get their own dialer
    /// and pools: such a connection serves only requests that selected that credential.
    by_credential: std::collections::HashMap<usize, (Arc<Dialer>, Pools)>,
}

/// The two pools of one dialer. The upstream leg speaks what the client spoke: an
/// HTTP/1.1 client's parallel connections stay parallel connections upstream (one h2
/// connection would funnel them all through one task: 1 MiB downloads ran at 0.36x of
/// direct that way, 0.55x on HTTP/1.1), and an h2 client (gRPC) gets h2.
struct Pools {
    h2: Pool,
    h1: Pool,
}

impl Pools {
    fn new(dialer: &Arc<Dialer>) -> Pools {
        Pools { h2: Pool::new(dialer.clone(), false), h1: Pool::new(dialer.clone(), true) }
    }

    fn for_version(&self, version: http::Version) -> &Pool {
        if version == http::Version::HTTP_2 { &self.h2 } else { &self.h1 }
    }
}

impl Generation {
    pub fn new(
        config: Arc<Config>,
        provider: Arc<CryptoProvider>,
        own_sockets: Vec<SocketAddr>,
        budget: Arc<fanout::Budget>,
    ) -> Result<Self, super::ProxyError> {
        let ca_file = config.upstream.ca_file.as_deref();
        let dialer = |tls: rustls::ClientConfig| {
            Arc::new(Dialer {
                resolve: config.upstream.resolve.clone(),
                allow_private: config.proxy.allow_private.clone(),
                own_sockets: own_sockets.clone(),
                connect_timeout: config.proxy.connect_timeout,
                timeout: config.proxy.timeout,
                budget: budget.clone(),
                tls_h1: tokio_rustls::TlsConnector::from(Arc::new(h1_only(&tls))),
                tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
                alpn: Default::default(),
                proxy: config.upstream.proxy.clone(),
            })
        };
        let default = dialer(upstream::client_tls(provider.clone(), ca_file, None)?);
        let mut by_credential = std::collections::HashMap::new();
        for (i, cred) in config.credentials.iter().enumerate() {
            if let Some(material) = &cred.tls {
                let tls = upstream::client_tls(provider.clone(), ca_file, Some(material))
                    .map_err(|source| super::ProxyError::CredentialTls { name: cred.name.clone(), source })?;
                let d = dialer(tls);
                let pools = Pools::new(&d);
                by_credential.insert(i, (d, pools));
            }
        }
        let Pools { h2, h1 } = Pools::new(&default);
        Ok(Generation { client: h2, client_h1: h1, dialer: default, by_credential, config })
    }

    /// The dialer and pool for a request of `version` that selected `credential` (or none).
    pub fn upstream(&self, credential: Option<usize>, version: http::Version) -> (&Arc<Dialer>, &Pool) {
        match credential.and_then(|i| self.by_credential.get(&i)) {
            Some((d, pools)) => (d, pools.for_version(version)),
            None if version == http::Version::HTTP_2 => (&self.dialer, &self.client),
            None => (&self.dialer, &self.client_h1),
        }
    }
}

fn h1_only(tls: &rustls::ClientConfig) -> rustls::ClientConfig {
    let mut cfg = tls.clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg
}
