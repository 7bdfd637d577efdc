//! The own HTTP/1.1 server's codec, free of I/O: a request head in, a response head and
//! its body's framing out (issue 20).
//!
//! It takes only what it can serve the way hyper's server would, byte for byte where a
//! client can tell: an HTTP/1.1 request with no body or a `Content-Length` one, no
//! protocol switch, no `Expect`, no `TE`. Anything else — chunked uploads, CONNECT and
//! `Upgrade`, `100-continue`, trailers, HTTP/1.0, a head this parser reads differently
//! from the framing guard — is [`Parsed::Hyper`]: the connection goes to hyper from that
//! head on. So the smuggling rules stay the guard's (`framing.rs`), which every byte has
//! passed before it gets here.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};

/// hyper's default, and the guard's when `max_headers` is not set.
const STACK_HEADERS: usize = 100;

/// What one look at the buffered bytes found.
// Not boxed: made once per request and taken apart at once; a box is an allocation more.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// Not for this codec: hyper serves the connection from this head on.
    Hyper,
    /// A request this codec serves; `len` bytes of the buffer were its head.
    Simple(Head),
}

/// A request head this codec serves.
#[derive(Debug)]
pub struct Head {
    pub len: usize,
    pub request: Request<()>,
    /// Its body's `Content-Length` (0: no body).
    pub body: u64,
    /// The client asked to close after this request (`Connection: close`).
    pub close: bool,
}

/// Look for one request head at the start of `buf`; the request's parts are sliced
/// from a copy of the head. (The server parses shared bytes; tests and the fuzz target
/// also read heads from a borrowed buffer.)
#[cfg(any(test, feature = "fuzzing"))]
pub fn parse(buf: &[u8], max_headers: usize) -> Parsed {
    parse_in(buf, None, max_headers)
}

/// [`parse`] over bytes read into a buffer of their own (the server's): the request's
/// parts are slices of `buf`, no copy. They keep `buf` (one read, at most 16 KiB) alive
/// until the request is done.
pub fn parse_shared(buf: &Bytes, max_headers: usize) -> Parsed {
    parse_in(buf, Some(buf), max_headers)
}

fn parse_in(buf: &[u8], shared: Option<&Bytes>, max_headers: usize) -> Parsed {
    if max_headers <= STACK_HEADERS {
        let mut headers = [const { std::mem::MaybeUninit::uninit() }; STACK_HEADERS];
        parse_with(buf, shared, &mut headers[..max_headers])
    } else {
        let mut headers = vec![std::mem::MaybeUninit::uninit(); max_headers];
        parse_with(buf, shared, &mut headers)
    }
}

fn parse_with<'b>(
    buf: &'b [u8],
    shared: Option<&Bytes>,
    headers: &mut [std::mem::MaybeUninit<httparse::Header<'b>>],
) -> Parsed {
    let mut req = httparse::Request::new(&mut []);
    let len =
        match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, headers) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Parsed::Partial,
            Err(_) => return Parsed::Hyper,
        };
    match build(&req, &buf[..len], shared) {
        Some((request, body, close)) => Parsed::Simple(Head { len, request, body, close }),
        None => Parsed::Hyper,
    }
}

/// The request, or `None` when it is not this codec's to serve. Values are slices of
/// `shared` (which holds `head` at its start), or of one copy of the head.
fn build(
    req: &httparse::Request<'_, '_>,
    head: &[u8],
    shared: Option<&Bytes>,
) -> Option<(Request<()>, u64, bool)> {
    if req.version != Some(1) {
        return None;
    }
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    if method == Method::CONNECT {
        return None;
    }
    let copied;
    let copy = match shared {
        Some(shared) => shared,
        None => {
            copied = Bytes::copy_from_slice(head);
            &copied
        }
    };
    let uri = Uri::from_maybe_shared(same_part(copy, head, req.path?.as_bytes())).ok()?;
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let mut length: Option<u64> = None;
    let mut close = false;
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        match name {
            header::TRANSFER_ENCODING | header::UPGRADE | header::EXPECT | header::TE => return None,
            header::CONTENT_LENGTH => {
                let n = content_length(h.value)?;
                match length {
                    Some(l) if l != n => return None,
                    // A repeat that agrees: one line goes on, as hyper keeps it (an
                    // upstream may refuse two, even equal).
                    Some(_) => continue,
                    None => length = Some(n),
                }
            }
            header::CONNECTION => close |= has_token(h.value, b"close"),
            _ => {}
        }
        let value = HeaderValue::from_maybe_shared(same_part(copy, head, h.value)).ok()?;
        headers.append(name, value);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Some((request, length.unwrap_or(0), close))
}

/// The bytes of `copy` (which starts with the bytes of `head`) where `part` (a slice of
/// `head`) lies.
fn same_part(copy: &Bytes, head: &[u8], part: &[u8]) -> Bytes {
    let start = part.as_ptr() as usize - head.as_ptr() as usize;
    copy.slice(start..start + part.len())
}

/// A `Content-Length` value: digits only, as hyper and the guard read it.
fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// Whether a comma-separated header value lists `token` (case-insensitive). The own
/// client reads the origin's `Connection` with it too.
pub(crate) fn has_token(value: &[u8], token: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body bytes at all (HEAD, 204, 304, or an empty body).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
}

/// What the response's head says and how the connection goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub framing: Framing,
    /// Close the connection after this response.
    pub close: bool,
}

/// Encode a response head the way hyper's HTTP/1.1 server does for a request this codec
/// took: `exact` is the body's exact size when known, `head_request` whether it answers
/// a HEAD, `close` whether the client asked to close, `date` the current HTTP date.
///
/// Two differences, on purpose: a `Transfer-Encoding` the response carries is not
/// written (latchkey's responses never carry one: it is hop-by-hop), and a
/// `Content-Length` is written as the body's own size when the body knows it and a body
/// follows. The body
/// is framed here from its size, so the head can never announce other framing than the
/// bytes that follow.
pub fn encode_head(
    parts: &http::response::Parts,
    exact: Option<u64>,
    head_request: bool,
    close: bool,
    date: &[u8],
    dst: &mut Vec<u8>,
) -> Written {
    let status = parts.status;
    status_line(status, parts.extensions.get::<hyper::ext::ReasonPhrase>(), dst);
    let no_body = head_request || status.is_informational() || no_content(status);
    // Without a body (HEAD, 304) a length describes what a GET would get: the header's.
    let exact = if no_body { None } else { exact };
    let mut length = None;
    let mut said_close = false;
    let mut wrote_date = false;
    for (name, value) in &parts.headers {
        match *name {
            header::CONTENT_LENGTH => {
                // One is written: the body's own size when it knows it (hyper writes the
                // header's value and trusts it to match), else the first that parses.
                if length.is_some() {
                    continue;
                }
                let Some(n) = exact.or_else(|| content_length(value.as_bytes())) else { continue };
                length = Some(n);
                dst.extend_from_slice(b"content-length: ");
                dst.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                dst.extend_from_slice(b"\r\n");
                continue;
            }
            header::TRANSFER_ENCODING => continue,
            header::CONNECTION => said_close |= has_token(value.as_bytes(), b"close"),
            header::DATE => wrote_date = true,
            _ => {}
        }
        header_line(name.as_str().as_bytes(), value.as_bytes(), dst);
    }
    let framing = match length {
        Some(n) => Framing::Length(n),
        None => implicit(exact, head_request, status, dst),
    };
    if close && !said_close {
        dst.extend_from_slice(b"connection: close\r\n");
    }
    if !wrote_date {
        header_line(b"date", date, dst);
    }
    dst.extend_from_slice(b"\r\n");
    let framing = if no_body || framing == Framing::Length(0) { Framing::Empty } else { framing };
    Written { framing, close: close || said_close }
}

/// No length header: hyper writes one from the body's size, or chunks a body of
/// unknown size.
fn implicit(exact: Option<u64>, head_request: bool, status: StatusCode, dst: &mut Vec<u8>) -> Framing {
    if status.is_informational() || no_content(status) {
        return Framing::Empty;
    }
    match exact {
        None if head_request => Framing::Empty,
        None => {
            dst.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        }
        Some(0) if head_request => Framing::Empty,
        Some(n) => {
            dst.extend_from_slice(b"content-length: ");
            dst.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            dst.extend_from_slice(b"\r\n");
            Framing::Length(n)
        }
    }
}

fn no_content(status: StatusCode) -> bool {
    matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
}

fn status_line(status: StatusCode, reason: Option<&hyper::ext::ReasonPhrase>, dst: &mut Vec<u8>) {
    if status == StatusCode::OK && reason.is_none() {
        dst.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    dst.extend_from_slice(b"HTTP/1.1 ");
    dst.extend_from_slice(status.as_str().as_bytes());
    dst.push(b' ');
    match reason {
        Some(r) => dst.extend_from_slice(r.as_bytes()),
        // A reason must be written: many parsers expect one.
        None => dst.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
    }
    dst.extend_from_slice(b"\r\n");
}

fn header_line(name: &[u8], value: &[u8], dst: &mut Vec<u8>) {
    dst.extend_from_slice(name);
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value);
    dst.extend_from_slice(b"\r\n");
}

/// The size line of one chunk of a chunked body.
pub fn chunk_head(len: usize, dst: &mut Vec<u8>) {
    let mut hex = [0u8; 16];
    let mut i = hex.len();
    let mut n = len;
    loop {
        i -= 1;
        hex[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    dst.extend_from_slice(&hex[i..]);
    dst.extend_from_slice(b"\r\n");
}

/// The last chunk of a chunked body, with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn simple(text: &str) -> Head {
        match parse(text.as_bytes(), 100) {
            Parsed::Simple(head) => head,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    fn is_hyper(text: &str) -> bool {
        matches!(parse(text.as_bytes(), 100), Parsed::Hyper)
    }

    #[test]
    fn a_plain_request_is_taken_whole_and_owns_its_bytes() {
        let text =
            "GET /v1/models?x=1 HTTP/1.1\r\nHost: api.example.com\r\nX-A: 1\r\nx-a: 2\r\n\r\nGET /next";
        let head = simple(text);
        assert_eq!(head.len, text.find("GET /next").unwrap());
        assert_eq!((head.body, head.close), (0, false));
        let r = &head.request;
        assert_eq!((r.method(), r.uri().to_string().as_str()), (&Method::GET, "/v1/models?x=1"));
        let values: Vec<_> = r.headers().get_all("x-a").iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(values, ["1", "2"], "repeated headers kept in order");
        let input = text.as_bytes().as_ptr_range();
        for v in r.headers().values() {
            assert!(!input.contains(&v.as_bytes().as_ptr()), "a value borrows the read buffer");
        }
    }

    #[test]
    fn a_length_body_and_a_close_are_read_from_the_head() {
        let head = simple("POST / HTTP/1.1\r\nContent-Length: 12\r\nConnection: keep-alive, Close\r\n\r\n");
        assert_eq!((head.body, head.close), (12, true));
        let same = simple("POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 005\r\n\r\n");
        assert_eq!(same.body, 5);
        let lengths: Vec<_> = same.request.headers().get_all("content-length").iter().collect();
        assert_eq!(lengths, ["5"], "one length goes on, as hyper sends it");
    }

    #[test]
    fn what_this_codec_does_not_serve_goes_to_hyper() {
        for text in [
            "GET / HTTP/1.0\r\n\r\n",
            "CONNECT a.example.com:443 HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nlatchkey-cl-te: 3\r\n\r\n",
            "GET / HTTP/1.1\r\nTE: trailers\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "G\x01T / HTTP/1.1\r\n\r\n",
        ] {
            assert!(is_hyper(text), "{text:?}");
        }
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHost: a", 100), Parsed::Partial));
        let many: String = (0..5).map(|i| format!("x-{i}: v\r\n")).collect();
        assert!(matches!(parse(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes(), 4), Parsed::Hyper));
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> http::response::Parts {
        let mut b = http::Response::builder().status(status);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn encode(
        parts: &http::response::Parts,
        exact: Option<u64>,
        head: bool,
        close: bool,
    ) -> (String, Written) {
        let mut out = Vec::new();
        let w = encode_head(parts, exact, head, close, b"Wed, 02 Dec 2026 22:00:00 GMT", &mut out);
        (String::from_utf8(out).unwrap(), w)
    }

    #[test]
    fn response_heads_are_framed_as_hyper_frames_them() {
        let (text, w) = encode(&response(200, &[("x-a", "1")]), Some(20), false, false);
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 20\r\ndate: Wed, 02 Dec 2026 22:00:00 GMT\r\n\r\n"
        );
        assert_eq!(w, Written { framing: Framing::Length(20), close: false });
        let (text, w) = encode(&response(201, &[("date", "x")]), None, false, true);
        assert_eq!(
            text,
            "HTTP/1.1 201 Created\r\ndate: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(w, Written { framing: Framing::Chunked, close: true });
        // HEAD: the length the GET would have, no body.
        let (text, w) = encode(&response(200, &[("content-length", "99")]), None, true, false);
        assert!(text.contains("content-length: 99\r\n"));
        assert_eq!(w.framing, Framing::Empty);
        let (text, w) = encode(&response(204, &[]), Some(0), false, false);
        assert!(!text.contains("content-length") && !text.contains("transfer-encoding"));
        assert_eq!(w.framing, Framing::Empty);
        let (text, w) = encode(&response(200, &[]), Some(0), false, false);
        assert!(text.contains("content-length: 0\r\n"));
        assert_eq!(w.framing, Framing::Empty);
        // The body's own size wins over a header that disagrees; a coding is never passed on.
        let (text, w) = encode(
            &response(200, &[("content-length", "5"), ("transfer-encoding", "gzip")]),
            Some(7),
            false,
            false,
        );
        assert!(text.contains("content-length: 7\r\n") && !text.contains("gzip"));
        assert_eq!(w.framing, Framing::Length(7));
        let (_, w) = encode(&response(200, &[("connection", "close")]), Some(1), false, false);
        assert!(w.close);
        let (text, _) = encode(&response(599, &[]), Some(0), false, false);
        assert!(text.starts_with("HTTP/1.1 599 <none>\r\n"));
    }

    #[test]
    fn chunk_sizes_are_lowercase_hex() {
        for (n, hex) in [(0, "0"), (9, "9"), (10, "a"), (255, "ff"), (16384, "4000")] {
            let mut out = Vec::new();
            chunk_head(n, &mut out);
            assert_eq!(out, format!("{hex}\r\n").into_bytes());
        }
    }

    proptest! {
        /// Whatever the response says, its encoded head reads back as one complete head
        /// with the same status, every header written once, and exactly the framing the
        /// codec will use: a client can never be told a length the bytes do not have.
        #[test]
        fn an_encoded_head_reads_back_with_its_framing(
            status in prop::sample::select(vec![200u16, 201, 204, 206, 301, 304, 400, 404, 500, 599]),
            headers in prop::collection::vec((
                "(content-length|transfer-encoding|connection|date|x-[a-z]{1,4}|set-cookie)",
                "(0|7|12|abc|chunked|gzip, chunked|close|keep-alive|[ -~]{0,10})"), 0..6),
            exact in prop::option::of(0u64..20),
            head_request in any::<bool>(),
            close in any::<bool>(),
        ) {
            let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let parts = response(status, &pairs);
            let (text, w) = encode(&parts, exact, head_request, close);
            let mut slots = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut slots);
            prop_assert_eq!(parsed.parse(text.as_bytes()).unwrap(), httparse::Status::Complete(text.len()));
            prop_assert_eq!(parsed.code, Some(status));
            let get = |name: &str| -> Vec<String> {
                parsed.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned()).collect()
            };
            let lengths = get("content-length");
            let codings = get("transfer-encoding");
            prop_assert!(lengths.len() <= 1 && codings.len() <= 1);
            match w.framing {
                Framing::Chunked => prop_assert!(codings == ["chunked"] && lengths.is_empty()),
                Framing::Length(n) => prop_assert!(lengths == [n.to_string()] && codings.is_empty()),
                Framing::Empty => prop_assert!(codings.is_empty()),
            }
            let no_body = head_request || status == 204 || status == 304;
            prop_assert!(!no_body || w.framing == Framing::Empty);
            if let (Some(n), false) = (exact, no_body) {
                let want = if n == 0 { Framing::Empty } else { Framing::Length(n) };
                prop_assert_eq!(w.framing, want);
            }
            let dates = pairs.iter().filter(|(k, _)| *k == "date").count();
            prop_assert_eq!(get("date").len(), dates.max(1), "a date, and only the response's own if it has one");
            let says_close = get("connection").iter().any(|v| has_token(v.as_bytes(), b"close"));
            prop_assert_eq!(w.close, says_close);
            prop_assert!(!close || says_close);
        }
    }
}
