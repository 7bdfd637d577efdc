//! The live view (`[admin] ui = true`): one page, its script and its style, compiled
//! into the binary (no CDN, works offline). Plain JavaScript with no build step: the
//! whole view is a few hundred lines that anyone can read and change, and there is no
//! toolchain to keep alive for it. The page itself holds no data: everything it shows
//! comes from the token-protected API after the login.

use http::{Method, StatusCode};

use super::{Reply, reply};

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");

/// The asset at `path`, if it is one.
pub fn asset(method: &Method, path: &str) -> Option<Reply> {
    if method != Method::GET && method != Method::HEAD {
        return None;
    }
    let (kind, body) = match path {
        "/" | "/index.html" => ("text/html; charset=utf-8", INDEX),
        "/app.js" => ("text/javascript; charset=utf-8", SCRIPT),
        "/app.css" => ("text/css; charset=utf-8", STYLE),
        _ => return None,
    };
    Some(reply(StatusCode::OK, kind, body))
}
