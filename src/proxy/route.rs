//! Where the requests of one connection go (fixed before the first request is read),
//! and the check every request meets against it: invariant 1, a request inside a tunnel
//! names the tunnel's host or nothing.

use std::net::SocketAddr;
use std::sync::Arc;

use http::request::Parts;
use http::uri::{Authority, Scheme};
use http::{Method, header};

use crate::config::Config;
use crate::policy::{Destination, Refusal, RefusalKind, Verdict};

/// Where requests on this connection go. Fixed before the first request is read.
#[derive(Debug)]
pub struct Route {
    pub dest: Destination,
    /// The upstream leg is TLS.
    pub tls: bool,
    /// Inside a CONNECT tunnel (rather than absolute-form on the proxy port).
    pub tunnel: bool,
    /// Set when the TLS ClientHello named another host: every request gets 421.
    pub misdirected: Option<String>,
    pub peer: SocketAddr,
    /// The authenticated agent (index into `config.agents`), when agents are configured.
    pub agent: Option<usize>,
    /// `host:port` of `dest`, computed once per connection rather than per request.
    pub authority: String,
    /// The host as logged, shared by every request's record.
    pub host_text: Arc<str>,
    /// Scheme and authority of the upstream URI, the port left out when it is the
    /// scheme's default (HTTP/2 sends it as `:authority`, as clients write it).
    pub scheme: Scheme,
    pub origin: Option<Authority>,
    /// What a person answered about this destination when the connection was held
    /// (`on_unlisted = "ask"`, scope `once`: for the connection's life).
    pub person: Verdict,
    /// The credentials whose domains name `dest` in the config this route was made
    /// under (`Policy::naming_host`): whose secrets its responses are masked for. Found
    /// once per connection and config instead of twice per request (a scan of every
    /// credential: the 20 built-in providers cost 4% of a request). A connection makes
    /// its route again when the config changes (`tunnel::Conn::route`).
    pub naming: Box<[usize]>,
}

impl Route {
    pub fn new(
        config: &Config,
        dest: Destination,
        tls: bool,
        tunnel: bool,
        misdirected: Option<String>,
        peer: SocketAddr,
        agent: Option<usize>,
    ) -> Route {
        let authority = dest.authority();
        let (scheme, default_port) = if tls { (Scheme::HTTPS, 443) } else { (Scheme::HTTP, 80) };
        let host_text: Arc<str> = dest.host.to_string().into();
        let origin = if dest.port == default_port { host_text.parse() } else { authority.parse() };
        let origin = origin.ok();
        let person = Verdict::Unasked;
        let naming = config.policy.naming_host(&dest).collect();
        Route {
            dest,
            tls,
            tunnel,
            misdirected,
            peer,
            agent,
            authority,
            host_text,
            scheme,
            origin,
            person,
            naming,
        }
    }

    /// This connection's route under another config: its destination, TLS, SNI verdict
    /// and a person's answer stay; the agent (admitted again) and the credentials naming
    /// the host are the new config's.
    pub fn under(&self, config: &Config, agent: Option<usize>) -> Route {
        let (dest, misdirected) = (self.dest.clone(), self.misdirected.clone());
        Route::new(config, dest, self.tls, self.tunnel, misdirected, self.peer, agent).answered(self.person)
    }

    /// The route of a connection a person answered about.
    pub fn answered(mut self, person: Verdict) -> Route {
        self.person = person;
        self
    }

    /// Whether a Host value names this destination exactly as latchkey writes it: the
    /// common case, answered without parsing. Anything else is parsed and compared.
    pub fn is_exactly(&self, host: &[u8], default_port: u16) -> bool {
        host == self.authority.as_bytes()
            || (self.dest.port == default_port
                && self.authority.len() > host.len()
                && self.authority.as_bytes().starts_with(host)
                && self.authority.as_bytes()[host.len()] == b':')
    }
}

/// Invariant 1: a request inside a tunnel names the tunnel's host or nothing.
pub fn check(route: &Route, parts: &Parts, h2_websocket: bool) -> Result<(), Refusal> {
    if let Some(why) = &route.misdirected {
        return Err(Refusal::misdirected(why.clone()));
    }
    if parts.headers.contains_key(&super::framing::SMUGGLED_NAME) {
        return Err(Refusal::new(
            RefusalKind::Smuggling,
            "Content-Length together with Transfer-Encoding is refused (request smuggling)",
        ));
    }
    if parts.method == Method::CONNECT && !h2_websocket {
        return Err(Refusal::bad_request("CONNECT inside a tunnel is refused"));
    }
    // Inside a tunnel a Host without a port means the tunnel's port (SPEC 3.1): plain
    // HTTP written into `CONNECT host:443` is that host's, and meets invariant 6.
    let default_port = match (route.tunnel, route.tls) {
        (true, _) => route.dest.port,
        (false, true) => 443,
        (false, false) => 80,
    };
    if route.tunnel
        && let Some(authority) = parts.uri.authority()
    {
        let scheme_port = match parts.uri.scheme_str() {
            Some("https") => 443,
            Some("http") => 80,
            _ => return Err(Refusal::bad_request("unsupported scheme in request target")),
        };
        if !route.is_exactly(authority.as_str().as_bytes(), scheme_port) {
            let named = Destination::parse_authority(authority.as_str(), Some(scheme_port))
                .map_err(|e| Refusal::bad_request(format!("bad request target: {e}")))?;
            if named != route.dest {
                return Err(Refusal::misdirected(format!(
                    "request names {named} but this tunnel goes to {}",
                    route.dest
                )));
            }
        }
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::bad_request("more than one Host header"));
    }
    if let Some(value) = host.filter(|v| !route.is_exactly(v.as_bytes(), default_port)) {
        let text = value.to_str().map_err(|_| Refusal::bad_request("Host header is not text"))?;
        let named = Destination::parse_authority(text, Some(default_port))
            .map_err(|e| Refusal::bad_request(format!("bad Host header {text:?}: {e}")))?;
        if named != route.dest {
            return Err(Refusal::misdirected(format!(
                "Host {named} differs from the destination {}",
                route.dest
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_canonical_host_skips_parsing() {
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let config = Config::defaults().unwrap();
        let route = |a: &str| {
            let dest = Destination::parse_authority(a, Some(443)).unwrap();
            Route::new(&config, dest, true, true, None, peer, None)
        };
        let r = route("api.example.com:443");
        assert!(r.is_exactly(b"api.example.com", 443));
        assert!(r.is_exactly(b"api.example.com:443", 443));
        for other in
            ["api.example.co", "api.example.com.", "API.example.com", "api.example.com:4430", "", ":443"]
        {
            assert!(!r.is_exactly(other.as_bytes(), 443), "{other}");
        }
        let r = route("127.0.0.1:8443");
        assert!(r.is_exactly(b"127.0.0.1:8443", 443));
        assert!(!r.is_exactly(b"127.0.0.1", 443), "the default port is not this one");
    }
}
