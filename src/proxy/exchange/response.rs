//! Phase "filter response": what the client gets of the upstream's response — every
//! live secret of the credentials naming the host masked in the head and, as it
//! streams, the body (invariant 5); hop-by-hop headers removed (a 101 keeps its
//! `Connection`/`Upgrade`); `Set-Cookie` dropped from credentialed responses unless the
//! credential passes cookies.

use http::Response;
use http::header;
use http_body_util::BodyExt;

use super::super::Body;
use super::super::body::{self, Redacted};
use super::super::route::Route;
use super::upstream_request::{add_via, strip_hop_by_hop};
use crate::config::{Config, Credential};
use crate::policy::{Refusal, RefusalKind};

pub fn filter(
    mut resp: Response<Body>,
    config: &Config,
    route: &Route,
    credential: Option<&Credential>,
    redact: bool,
) -> Result<Response<Body>, Refusal> {
    // Framed both ways, the body was read by its transfer coding; a length passed on
    // beside it would frame the client's copy by the other (RFC 9112 §6.3: an
    // intermediary removes it).
    if resp.headers().contains_key(header::TRANSFER_ENCODING) {
        resp.headers_mut().remove(header::CONTENT_LENGTH);
    }
    // Looked up now, after any token refresh; and before hop-by-hop headers go, since a
    // Transfer-Encoding coding counts too.
    let mut resp = match redact.then(|| crate::redact::for_credentials(config, &route.naming)).flatten() {
        Some(set) => redact_response(set, resp, route)?,
        None => resp,
    };
    // A switch keeps the two hop-by-hop headers that say what it switches to.
    let switching = (resp.status() == http::StatusCode::SWITCHING_PROTOCOLS).then(|| {
        (resp.headers().get(header::CONNECTION).cloned(), resp.headers().get(header::UPGRADE).cloned())
    });
    strip_hop_by_hop(resp.headers_mut());
    if let Some((Some(c), Some(u))) = switching {
        resp.headers_mut().insert(header::CONNECTION, c);
        resp.headers_mut().insert(header::UPGRADE, u);
    }
    if credential.is_some_and(|c| !c.pass_cookies) {
        resp.headers_mut().remove(header::SET_COOKIE);
    }
    if config.proxy.via {
        add_via(resp.headers_mut());
    }
    Ok(resp)
}

/// Mask the secrets of every credential naming this host in the response head and, as
/// it streams, the body. A coding latchkey could not scan through is refused.
fn redact_response(
    set: crate::redact::Set,
    mut resp: Response<Body>,
    route: &Route,
) -> Result<Response<Body>, Refusal> {
    if let Some(coding) = body::unscannable_coding(resp.headers()) {
        return Err(Refusal::new(
            RefusalKind::UpstreamEncoding,
            format!(
                "{} sent a compressed response ({coding}) although latchkey asked for identity; it cannot be scanned for credentials, so it is not passed on",
                route.dest
            ),
        ));
    }
    body::redact_head(&mut resp, &set);
    let (parts, body) = resp.into_parts();
    let body = Redacted::new(body, set, &parts.headers).boxed();
    Ok(Response::from_parts(parts, body))
}
