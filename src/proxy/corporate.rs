//! `[upstream] proxy = "http://[USER:PASS@]HOST:PORT"`: latchkey's own upstream
//! connections (requests, blind tunnels, upgrades, token endpoints) leave through a
//! corporate proxy. HTTPS and every tunnel go by `CONNECT`, with TLS still end to end
//! and verified by latchkey (a proxy that intercepts TLS with its own CA fails the
//! handshake like any untrusted upstream); plain-HTTP requests go to the proxy in
//! absolute form. The password is a secret: it lives in a `Secret`, is written only
//! into `Proxy-Authorization` to the proxy, and never into a message or log.

use http::HeaderValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::upstream::UpstreamError;
use crate::policy::{Destination, Pattern};
use crate::secrets::Secret;

/// Largest response head to a CONNECT latchkey reads.
const MAX_HEAD: usize = 16 * 1024;

pub struct CorporateProxy {
    host: String,
    port: u16,
    /// `Basic base64(user:password)`, when the URL has userinfo.
    authorization: Option<Secret>,
    no_proxy: Vec<Pattern>,
    /// `http://host:port`: how messages name it (never the userinfo).
    pub shown: String,
}

impl std::fmt::Debug for CorporateProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CorporateProxy").field("proxy", &self.shown).finish_non_exhaustive()
    }
}

impl CorporateProxy {
    /// Parse the URL and the `no_proxy` patterns. Errors never repeat the URL (it may
    /// hold a password).
    pub fn parse(url: &str, no_proxy: &[String]) -> Result<CorporateProxy, String> {
        let rest =
            url.strip_prefix("http://").ok_or("must be an http:// URL: http://[USER:PASS@]HOST:PORT")?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('?') || rest.contains('#') {
            return Err("must be http://[USER:PASS@]HOST:PORT, without a path".into());
        }
        let (userinfo, authority) = match rest.rsplit_once('@') {
            Some((u, a)) => (Some(u), a),
            None => (None, rest),
        };
        let dest = Destination::parse_authority(authority, None)
            .map_err(|e| format!("the proxy's HOST:PORT: {e} (the port is required)"))?;
        let authorization = userinfo.map(basic).transpose()?;
        let no_proxy = no_proxy
            .iter()
            .map(|p| Pattern::parse(p).map_err(|e| format!("no_proxy {p:?}: {e}")))
            .collect::<Result<_, _>>()?;
        let host = match &dest.host {
            crate::policy::Host::Ip(ip) => ip.to_string(),
            crate::policy::Host::Domain(d) => d.clone(),
        };
        Ok(CorporateProxy { host, port: dest.port, authorization, no_proxy, shown: format!("http://{dest}") })
    }

    /// Does a connection to `dest` go through the proxy (not listed in `no_proxy`)?
    pub fn applies(&self, dest: &Destination) -> bool {
        !self
            .no_proxy
            .iter()
            .any(|p| p.matches_host(&dest.host).is_some() && p.port.is_none_or(|q| q == dest.port))
    }

    /// `Proxy-Authorization` for a plain-HTTP request sent to the proxy in absolute form.
    pub fn authorization(&self) -> Option<HeaderValue> {
        let mut v = HeaderValue::from_str(self.authorization.as_ref()?.expose()).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    /// TCP to the proxy itself.
    pub async fn connect(&self, host: &str) -> Result<TcpStream, UpstreamError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| self.error(host, format!("cannot connect to it: {e}")))?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    /// A tunnel to `target` (`host:port` as the proxy should reach it) by CONNECT: the
    /// stream after the proxy's 2xx, nothing read past its response head.
    pub async fn tunnel(&self, target: &str, host: &str) -> Result<TcpStream, UpstreamError> {
        let mut tcp = self.connect(host).await?;
        let mut request = zeroize::Zeroizing::new(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"));
        if let Some(auth) = &self.authorization {
            request.push_str(&format!("Proxy-Authorization: {}\r\n", auth.expose()));
        }
        request.push_str("\r\n");
        tcp.write_all(request.as_bytes())
            .await
            .map_err(|e| self.error(host, format!("write failed: {e}")))?;
        let head = read_head(&mut tcp).await.map_err(|why| self.error(host, why))?;
        let line = head.lines().next().unwrap_or("");
        let mut words = line.splitn(3, ' ');
        let (version, code) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let reason: String =
            words.next().unwrap_or("").chars().filter(|c| !c.is_control()).take(80).collect();
        match code.parse::<u16>() {
            Ok(200..=299) if version.starts_with("HTTP/1.") => Ok(tcp),
            Ok(407) => Err(self.error(
                host,
                "it answered 407 Proxy Authentication Required: check the user and password in [upstream] proxy"
                    .into(),
            )),
            Ok(code) => Err(self.error(host, format!("it answered {code} {reason}"))),
            Err(_) => Err(self.error(host, "it did not answer HTTP".into())),
        }
    }

    fn error(&self, host: &str, why: String) -> UpstreamError {
        UpstreamError::Proxy { proxy: self.shown.clone(), host: host.to_string(), why }
    }
}

/// `user:password` (percent-encoded as in any URL) → `Basic base64(user:password)`.
fn basic(userinfo: &str) -> Result<Secret, String> {
    use base64::Engine;
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let decode = |s: &str| -> Result<zeroize::Zeroizing<String>, String> {
        let bytes = percent_decode(s).ok_or("the userinfo has a bad percent-escape")?;
        String::from_utf8(bytes)
            .map(zeroize::Zeroizing::new)
            .map_err(|_| "the userinfo is not UTF-8".to_string())
    };
    let pair = zeroize::Zeroizing::new(format!("{}:{}", &*decode(user)?, &*decode(password)?));
    Ok(Secret::new(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair.as_bytes()))))
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The proxy's response head, read byte by byte so that nothing of the tunnel is
/// consumed (a server may speak first).
async fn read_head(tcp: &mut TcpStream) -> Result<String, String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err("its answer to CONNECT is too long".into());
        }
        match tcp.read(&mut byte).await {
            Ok(0) => return Err("it closed the connection".into()),
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(format!("read failed: {e}")),
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_becomes_basic_and_is_never_shown() {
        let p = CorporateProxy::parse("http://alice:p%40ss@proxy.corp:3128", &[".internal".into()]).unwrap();
        assert_eq!(p.shown, "http://proxy.corp:3128");
        assert_eq!(p.authorization().unwrap(), "Basic YWxpY2U6cEBzcw==");
        assert!(!format!("{p:?}").contains("p@ss") && !format!("{p:?}").contains("YWxpY2U6cEBzcw"));
        let dest = |a: &str| Destination::parse_authority(a, None).unwrap();
        assert!(!p.applies(&dest("git.internal:443")) && p.applies(&dest("api.github.com:443")));
        let e = CorporateProxy::parse("https://alice:secret@proxy:1", &[]).unwrap_err();
        assert!(!e.contains("secret"));
        assert!(CorporateProxy::parse("http://proxy.corp", &[]).is_err());
    }
}
