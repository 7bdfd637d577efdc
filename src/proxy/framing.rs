//! A request-framing guard in front of hyper's HTTP/1 parser.
//!
//! hyper resolves `Content-Length` together with `Transfer-Encoding` the RFC 9112 way
//! (chunked wins, the length is dropped, the connection closes afterwards), so nothing
//! can desync — but the request still goes out, and the spec refuses smuggling attempts
//! with 400. By the time a handler runs the dropped `Content-Length` is invisible, so
//! this guard reads the byte stream first: it follows each request's framing with the
//! same parser hyper uses (httparse, with hyper's settings), holds a request head back
//! until it is complete, and renames the `Content-Length` of a CL+TE head to
//! [`SMUGGLED`] (same length, so nothing shifts). The service answers any request
//! carrying that header with 400.
//!
//! A head hyper would reject with its own bare 400/414/431 (an unparsable request line
//! or target, bad header syntax, a head over the limits, invalid framing headers) never
//! reaches hyper: the guard puts a [`marker head`](REFUSED) in its place, which hyper
//! accepts and latchkey answers in its own words (SPEC 6) with a `blocked` log line.
//! Everything the client sends after a refused head is dropped.
//!
//! A request that may switch protocols (CONNECT, or `Upgrade` on HTTP/1.1) makes the
//! guard hold every later byte until the service has answered it ([`Gate`]): only a
//! switch that happened (101, or 2xx to CONNECT) makes the guard step aside, and only
//! for the switched bytes; any other answer and it keeps following requests.
//!
//! When hyper closes a connection while the client may still be sending (an early 413
//! or 431, say), the guard closes lingering: it sends FIN after the response and keeps
//! reading and discarding, bounded in time and bytes, so the client reads the refusal
//! rather than a reset.

use crate::policy::RefusalKind;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Header name a CL+TE request's `Content-Length` is renamed to (14 bytes, as is
/// `content-length`).
pub const SMUGGLED: &str = "latchkey-cl-te";

/// Header of the marker head written in place of a refused one: its value is a
/// [`Malformed`] code.
pub const REFUSED: &str = "latchkey-refused";

/// Header of the marker head carrying the refused head's first line, escaped.
pub const REFUSED_LINE: &str = "latchkey-refused-line";

// The marker headers as names, for the lookups every request makes: a lookup by `&str`
// parses the name first.
pub static SMUGGLED_NAME: http::HeaderName = http::HeaderName::from_static(SMUGGLED);
static REFUSED_NAME: http::HeaderName = http::HeaderName::from_static(REFUSED);
static REFUSED_LINE_NAME: http::HeaderName = http::HeaderName::from_static(REFUSED_LINE);

/// Longest chunk-size or trailer line followed before stepping aside.
const MAX_LINE: usize = 8 * 1024;

/// Longest first line copied into a marker head (the log shows this much).
const MAX_LINE_SHOWN: usize = 200;

/// hyper refuses longer request targets with 414.
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;

/// A lingering close lasts at most this long, and gives up after this long without a
/// byte from the client or this many bytes discarded.
const LINGER_TIME: Duration = Duration::from_secs(10);
const LINGER_IDLE: Duration = Duration::from_secs(2);
const LINGER_BYTES: u64 = 64 * 1024 * 1024;

/// Why a head was refused before hyper saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Method, request target or version do not parse.
    RequestLine,
    /// A header line does not parse.
    Header,
    /// The request target is longer than hyper accepts.
    UriTooLong,
    /// The head is longer than `max_header_bytes`.
    TooLarge,
    /// More headers than `max_headers`.
    TooManyHeaders,
    /// An invalid or conflicting `Content-Length`.
    ContentLength,
    /// A `Transfer-Encoding` that does not end in chunked, or on HTTP/1.0.
    TransferEncoding,
}

impl Malformed {
    const ALL: [Malformed; 7] = [
        Malformed::RequestLine,
        Malformed::Header,
        Malformed::UriTooLong,
        Malformed::TooLarge,
        Malformed::TooManyHeaders,
        Malformed::ContentLength,
        Malformed::TransferEncoding,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Malformed::RequestLine => "request-line",
            Malformed::Header => "header",
            Malformed::UriTooLong => "uri-too-long",
            Malformed::TooLarge => "too-large",
            Malformed::TooManyHeaders => "too-many-headers",
            Malformed::ContentLength => "content-length",
            Malformed::TransferEncoding => "transfer-encoding",
        }
    }

    pub fn from_code(code: &[u8]) -> Option<Malformed> {
        Malformed::ALL.into_iter().find(|m| m.code().as_bytes() == code)
    }

    /// The refusal this is (its status and `X-Latchkey-Error` token).
    pub fn kind(self) -> RefusalKind {
        match self {
            Malformed::UriTooLong => RefusalKind::UriTooLong,
            Malformed::TooLarge | Malformed::TooManyHeaders => RefusalKind::HeadTooLarge,
            _ => RefusalKind::BadRequest,
        }
    }

    /// What the client is told (after `latchkey: `).
    pub fn message(self) -> &'static str {
        match self {
            Malformed::RequestLine => "malformed request line (method, target or HTTP version)",
            Malformed::Header => "malformed header line",
            Malformed::UriTooLong => "request target longer than 65534 bytes",
            Malformed::TooLarge => "request head larger than [proxy.limits] max_header_bytes",
            Malformed::TooManyHeaders => "more headers than [proxy.limits] max_headers",
            Malformed::ContentLength => "invalid or conflicting Content-Length",
            Malformed::TransferEncoding => "Transfer-Encoding must end in chunked (and needs HTTP/1.1)",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Expecting (or inside) a request head; the head is held until complete.
    Head,
    /// A `Content-Length` body with this many bytes left.
    Fixed(u64),
    /// A chunk-size line (collected in `line`).
    ChunkSize,
    /// Chunk data with this many bytes left.
    ChunkData(u64),
    /// The line end after chunk data (`true` once its CR is seen).
    ChunkEnd(bool),
    /// A trailer line (collected in `line`), or the empty line ending the message.
    Trailer,
    /// A request that may switch protocols was released: hold everything after it
    /// until the service's answer says whether it switched.
    AwaitAnswer,
    /// The framing is not followed any more (bad chunking): bytes pass as they come and
    /// hyper, which fails the body, decides. The connection ends after this request.
    Passthrough,
    /// A head was refused: nothing more is released.
    Discard,
    /// The connection switched protocols (tunnel, WebSocket): bytes pass as they come.
    Blind,
}

/// The framing state machine, free of I/O so it can be tested on any split of input.
pub struct Scanner {
    state: State,
    /// Bytes at the front of the unreleased buffer already looked at.
    seen: usize,
    /// The chunk-size or trailer line being read.
    line: Vec<u8>,
    max_head: usize,
    max_headers: usize,
    /// Complete request heads seen so far.
    heads: u64,
    /// The current request may switch protocols; `answer` is what the service said.
    switching: bool,
    answer: Option<bool>,
    /// Bytes released so far, and where in them a marker head begins (for the fuzzer).
    released_total: u64,
    marker_at: Option<u64>,
}

impl Scanner {
    pub fn new(max_head: usize, max_headers: usize) -> Self {
        Scanner {
            state: State::Head,
            seen: 0,
            line: Vec::new(),
            max_head,
            max_headers,
            heads: 0,
            switching: false,
            answer: None,
            released_total: 0,
            marker_at: None,
        }
    }

    /// Whether the guard stopped releasing bytes (a refused head, or CL+TE).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn refused(&self) -> bool {
        self.state == State::Discard
    }

    /// Where in the released bytes the marker head of a refused head begins.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn marker_at(&self) -> Option<u64> {
        self.marker_at
    }

    /// Bytes pass unexamined: after a switch, or once the framing is not followed.
    fn passes(&self) -> bool {
        matches!(self.state, State::Blind | State::Passthrough)
    }

    /// Whether closing now could cut off a client still sending: anything but a clean
    /// boundary between requests (or a switched connection, whose bytes are not ours).
    fn mid_message(&self, held: usize) -> bool {
        match self.state {
            State::Blind => false,
            State::Head => held > 0,
            _ => true,
        }
    }

    /// The service answered the request that may switch protocols: `switched` when it
    /// did (101, or 2xx to CONNECT).
    pub fn answer(&mut self, switched: bool) {
        if !self.switching {
            return;
        }
        if self.state == State::AwaitAnswer {
            self.switching = false;
            self.state = if switched { State::Blind } else { State::Head };
            self.seen = 0;
        } else {
            // Answered while its body still streams: applied where the message ends.
            self.answer = Some(switched);
        }
    }

    /// The state after a complete message.
    fn message_end(&mut self) -> State {
        if !self.switching {
            return State::Head;
        }
        match self.answer.take() {
            None => State::AwaitAnswer,
            Some(switched) => {
                self.switching = false;
                if switched { State::Blind } else { State::Head }
            }
        }
    }

    /// Bytes of body that may be read straight into the caller's buffer.
    fn body_left(&self) -> u64 {
        match self.state {
            State::Fixed(n) | State::ChunkData(n) => n,
            _ => 0,
        }
    }

    /// Account for `n` body bytes that went straight through.
    fn skip_body(&mut self, n: u64) {
        self.state = match self.state {
            State::Fixed(left) if left == n => self.message_end(),
            State::Fixed(left) => State::Fixed(left - n),
            State::ChunkData(left) if left == n => State::ChunkEnd(false),
            State::ChunkData(left) => State::ChunkData(left - n),
            other => other,
        };
    }

    /// Look at the bytes of `buf` not seen yet and return how many bytes from its front
    /// may be handed to hyper. A smuggling head is rewritten in place; a refused head is
    /// replaced by a marker head, and everything after it dropped. Everything before the
    /// cursor is released except an incomplete head, which is held, and whatever follows
    /// a request awaiting its answer.
    pub fn scan(&mut self, buf: &mut Vec<u8>) -> usize {
        let n = self.scan_inner(buf);
        self.released_total += n as u64;
        n
    }

    fn scan_inner(&mut self, buf: &mut Vec<u8>) -> usize {
        let mut i = self.seen;
        let mut released = 0;
        while i < buf.len() {
            match self.state {
                State::Blind | State::Passthrough => i = buf.len(),
                State::Discard => {
                    buf.truncate(released);
                    break;
                }
                State::AwaitAnswer => {
                    self.seen = 0;
                    return released;
                }
                // Empty lines before a request line are allowed (RFC 9112 §2.2).
                State::Head if i == released && matches!(buf[i], b'\r' | b'\n') => i += 1,
                State::Head => match head_end(&buf[released..], i - released) {
                    Some(end) if end > self.max_head => {
                        return self.refuse(buf, released, Malformed::TooLarge);
                    }
                    Some(end) => {
                        i = released + end;
                        match self.on_head(&mut buf[released..i]) {
                            Ok(state) => self.state = state,
                            Err(why) => return self.refuse(buf, released, why),
                        }
                        self.heads += 1;
                    }
                    None if buf.len() - released > self.max_head => {
                        return self.refuse(buf, released, Malformed::TooLarge);
                    }
                    None => {
                        self.seen = buf.len() - released;
                        return released;
                    }
                },
                State::Fixed(_) | State::ChunkData(_) => {
                    let take = self.body_left().min((buf.len() - i) as u64);
                    i += take as usize;
                    self.skip_body(take);
                }
                State::ChunkSize | State::Trailer => {
                    let (line, done) = match memchr::memchr(b'\n', &buf[i..]) {
                        Some(p) => (&buf[i..i + p + 1], true),
                        None => (&buf[i..], false),
                    };
                    i += line.len();
                    if self.line.len() + line.len() > MAX_LINE {
                        self.state = State::Passthrough;
                    } else {
                        self.line.extend_from_slice(line);
                        if done {
                            self.state = self.on_line();
                            self.line.clear();
                        }
                    }
                }
                State::ChunkEnd(cr) => {
                    self.state = match (cr, buf[i]) {
                        (_, b'\n') => State::ChunkSize,
                        (false, b'\r') => State::ChunkEnd(true),
                        _ => State::Passthrough,
                    };
                    i += 1;
                }
            }
            released = i;
        }
        self.seen = 0;
        released
    }

    /// Replace the head starting at `start` (and everything after it) with a marker
    /// head naming `why`; return the length now released.
    fn refuse(&mut self, buf: &mut Vec<u8>, start: usize, why: Malformed) -> usize {
        let marker = marker_head(why, first_line(&buf[start..]));
        self.marker_at = Some(self.released_total + start as u64);
        buf.truncate(start);
        buf.extend_from_slice(&marker);
        self.state = State::Discard;
        self.seen = 0;
        buf.len()
    }

    /// The input ended: whatever is held goes to hyper, which decides (an incomplete
    /// head fails there), except bytes held for an unanswered switch, which are dropped.
    fn end_of_input(&mut self, buf: &mut Vec<u8>) -> usize {
        match self.state {
            State::AwaitAnswer | State::Discard => buf.clear(),
            State::Blind => {}
            _ => self.state = State::Passthrough,
        }
        buf.len()
    }

    /// A complete chunk-size or trailer line.
    fn on_line(&mut self) -> State {
        match self.state {
            State::ChunkSize => match chunk_size(&self.line) {
                Some(0) => State::Trailer,
                Some(n) => State::ChunkData(n),
                None => State::Passthrough, // hyper fails the body; latchkey answers 400
            },
            _ if matches!(self.line.as_slice(), b"\n" | b"\r\n") => self.message_end(),
            _ => State::Trailer,
        }
    }

    /// Feed `input` arriving in pieces cut at `cuts` (taken modulo its length); return
    /// what was released, in order, the end of the stream releasing what was held.
    /// For tests and the fuzz target.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn scan_split(&mut self, input: &[u8], cuts: &[usize], switched: bool) -> Vec<u8> {
        let (mut buf, mut out, mut last) = (Vec::new(), Vec::new(), 0);
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        points.push(input.len());
        points.sort_unstable();
        for p in points {
            buf.extend_from_slice(&input[last..p]);
            last = p;
            loop {
                let n = self.scan(&mut buf);
                out.extend(buf.drain(..n));
                if self.state != State::AwaitAnswer {
                    break;
                }
                // As the service would: answer at once, `switched` or not.
                self.answer(switched);
            }
        }
        let n = self.end_of_input(&mut buf);
        out.extend(buf.drain(..n));
        out
    }

    /// Check a complete head as hyper would, and decide how the body after it is framed.
    /// The headers' slots are on the stack, uninitialised, up to hyper's default count
    /// (a vector of them was allocated and filled for every head).
    fn on_head(&mut self, head: &mut [u8]) -> Result<State, Malformed> {
        const STACK_HEADERS: usize = 100;
        let (state, smuggled) = if self.max_headers <= STACK_HEADERS {
            let mut headers = [const { std::mem::MaybeUninit::uninit() }; STACK_HEADERS];
            self.judge_head(head, &mut headers[..self.max_headers])
        } else {
            let mut headers = vec![std::mem::MaybeUninit::uninit(); self.max_headers];
            self.judge_head(head, &mut headers)
        }?;
        // CL with TE: each Content-Length name overwritten, so hyper cannot frame by it.
        for at in smuggled {
            head[at..at + SMUGGLED.len()].copy_from_slice(SMUGGLED.as_bytes());
        }
        Ok(state)
    }

    /// [`Self::on_head`]'s reading of the head: the state after it, and where the
    /// Content-Length names of a head that also has Transfer-Encoding begin (empty, and
    /// not allocated, for every other head).
    fn judge_head<'b>(
        &mut self,
        head: &'b [u8],
        headers: &mut [std::mem::MaybeUninit<httparse::Header<'b>>],
    ) -> Result<(State, Vec<usize>), Malformed> {
        let mut req = httparse::Request::new(&mut []);
        match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, head, headers) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err(Malformed::RequestLine),
            Err(httparse::Error::TooManyHeaders) => return Err(Malformed::TooManyHeaders),
            Err(httparse::Error::HeaderName | httparse::Error::HeaderValue | httparse::Error::NewLine)
                if req.version.is_some() =>
            {
                return Err(Malformed::Header);
            }
            Err(_) => return Err(Malformed::RequestLine),
        }
        let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
            return Err(Malformed::RequestLine);
        };
        if target.len() > MAX_URI_LEN {
            return Err(Malformed::UriTooLong);
        }
        if http::Method::from_bytes(method.as_bytes()).is_err() || !is_uri(target) {
            return Err(Malformed::RequestLine);
        }
        // hyper: CONNECT, or any Upgrade header on HTTP/1.1, may switch protocols.
        self.switching = method == "CONNECT";
        self.answer = None;
        let base = head.as_ptr() as usize;
        let mut lengths = Vec::new();
        let mut chunked = None;
        for h in req.headers.iter() {
            if h.name.len() >= 1 << 16 {
                return Err(Malformed::TooLarge);
            }
            if h.name.eq_ignore_ascii_case("upgrade") {
                self.switching |= version == 1;
            } else if h.name.eq_ignore_ascii_case("content-length") {
                lengths.push((h.name.as_ptr() as usize - base, h.value));
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                if version == 0 {
                    return Err(Malformed::TransferEncoding);
                }
                chunked = Some(last_coding_is_chunked(h.value));
            }
        }
        let lengths: Vec<(usize, Option<u64>)> =
            lengths.into_iter().map(|(at, v)| (at, content_length(v))).collect();
        let state = match (chunked, lengths.as_slice()) {
            (Some(_), [_, ..]) => {
                // Answered 400, then the connection closes.
                return Ok((State::Discard, lengths.iter().map(|(at, _)| *at).collect()));
            }
            (Some(true), []) => State::ChunkSize,
            (Some(false), []) => return Err(Malformed::TransferEncoding),
            (None, []) | (None, [(_, Some(0))]) => self.message_end(),
            (None, [(_, Some(n)), rest @ ..]) if rest.iter().all(|(_, m)| *m == Some(*n)) => match *n {
                0 => self.message_end(),
                n if n >= u64::MAX - 1 => return Err(Malformed::TooLarge), // hyper: too large
                n => State::Fixed(n),
            },
            (None, _) => return Err(Malformed::ContentLength),
        };
        Ok((state, Vec::new()))
    }
}

/// Does `target` (at most `MAX_URI_LEN` bytes) parse as a URI, as hyper reads it? An
/// origin-form target of only characters a path and a query may both hold — most
/// requests' — is answered without `http`'s parser, which copies the target to a heap
/// buffer first; any other goes to the parser.
fn is_uri(target: &str) -> bool {
    (target.starts_with('/') && target.bytes().all(|b| PLAIN[usize::from(b)]))
        || http::Uri::try_from(target).is_ok()
}

/// Unreserved and sub-delimiter characters, `/`, `:`, `@`, `%` and `?`: valid anywhere
/// in a path or a query (RFC 3986 §3.3, §3.4), and so in `http`'s parser.
const PLAIN: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = matches!(b as u8, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~'
            | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
            | b'/' | b':' | b'@' | b'%' | b'?');
        b += 1;
    }
    table
};

/// The first line of a head (without its line end), at most `MAX_LINE_SHOWN` bytes.
fn first_line(head: &[u8]) -> &[u8] {
    let end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len()).min(MAX_LINE_SHOWN);
    let line = &head[..end];
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The head hyper is given in place of a refused one.
fn marker_head(why: Malformed, line: &[u8]) -> Vec<u8> {
    let mut out = format!("GET / HTTP/1.1\r\n{REFUSED}: {}\r\n{REFUSED_LINE}: ", why.code()).into_bytes();
    out.extend_from_slice(escape(line).as_bytes());
    out.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
    out
}

/// Printable ASCII as is (backslash doubled), everything else as `\xNN`.
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}

/// A request the guard refused, as the service sees its marker head: why, and the
/// refused head's first line (escaped).
pub fn refused(headers: &http::HeaderMap) -> Option<(Malformed, String)> {
    let code = headers.get(&REFUSED_NAME)?;
    // A client writing the marker header itself is refused all the same.
    let why = Malformed::from_code(code.as_bytes()).unwrap_or(Malformed::Header);
    let line = headers
        .get(&REFUSED_LINE_NAME)
        .map(|v| v.to_str().map(str::to_string).unwrap_or_else(|_| escape(v.as_bytes())))
        .unwrap_or_default();
    Some((why, line))
}

/// Whether the service must answer `req` on the [`Gate`]: a request that may switch
/// protocols, by hyper's rule (CONNECT, or an `Upgrade` header on HTTP/1.1).
pub fn may_switch<B>(req: &http::Request<B>) -> bool {
    req.method() == http::Method::CONNECT
        || (req.version() == http::Version::HTTP_11 && req.headers().contains_key(http::header::UPGRADE))
}

/// Whether the answer to a request that may switch protocols did switch them.
pub fn switched<B>(method: &http::Method, resp: &http::Response<B>) -> bool {
    resp.status() == http::StatusCode::SWITCHING_PROTOCOLS
        || (method == http::Method::CONNECT && resp.status().is_success())
}

/// Where a head ends in `buf`: after the first empty line, searching from `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(2);
    let mut i = start;
    while let Some(p) = memchr::memchr(b'\n', &buf[i..]) {
        let nl = i + p;
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            Some(_) => i = nl + 1,
            None => return None,
        }
    }
    None
}

/// A chunk-size line: hex digits, optional extensions, line end.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    let rest = &line[digits..];
    if !matches!(rest.first(), Some(b';' | b'\r' | b'\n' | b' ' | b'\t')) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()
}

fn content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn last_coding_is_chunked(v: &[u8]) -> bool {
    let v = String::from_utf8_lossy(v);
    v.rsplit(',').next().is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
}

/// Where the service tells the guard whether a request that may switch protocols did.
#[derive(Default)]
pub struct Gate(Mutex<GateState>);

#[derive(Default)]
struct GateState {
    answer: Option<bool>,
    waker: Option<Waker>,
}

impl Gate {
    /// Called by the service for every request [`may_switch`] is true of.
    pub fn answer(&self, switched: bool) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.answer = Some(switched);
        if let Some(w) = g.waker.take() {
            w.wake();
        }
    }

    /// The answer given since the last call, or `None` (and a wake-up when it comes).
    fn take(&self, cx: &Context<'_>) -> Option<bool> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let answer = g.answer.take();
        if answer.is_none() {
            g.waker = Some(cx.waker().clone());
        }
        answer
    }
}

/// The read-and-discard phase of a lingering close.
struct Linger {
    until: Pin<Box<tokio::time::Sleep>>,
    idle: Pin<Box<tokio::time::Sleep>>,
    discarded: u64,
}

/// An HTTP/1 client stream seen through a [`Scanner`].
///
/// It also keeps the two clocks hyper's single header-read timer conflates: a request
/// head must arrive within `header_read_timeout` once it has begun (and on a new
/// connection, from the start), while a keep-alive connection may sit idle between
/// requests for `idle_timeout` (hyper's timer, set to that).
pub struct Guarded<S> {
    io: S,
    scanner: Scanner,
    /// Bytes read from `io` and not yet handed out; the first `released` are approved.
    buf: Vec<u8>,
    released: usize,
    head_timeout: std::time::Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    gate: Arc<Gate>,
    /// Write side shut down (FIN sent); then `linger` runs if the client may be sending.
    shut: bool,
    linger: Option<Linger>,
    /// Whether hyper holds anything worth keeping, for parking (`park`).
    rest: Arc<super::park::Rest>,
}

impl<S> Guarded<S> {
    pub fn new(io: S, limits: &crate::config::Limits) -> Self {
        Guarded {
            io,
            scanner: Scanner::new(limits.max_header_bytes, limits.max_headers),
            buf: Vec::new(),
            released: 0,
            head_timeout: limits.header_read_timeout,
            deadline: None,
            gate: Arc::default(),
            shut: false,
            linger: None,
            rest: Arc::default(),
        }
    }

    /// What the serving task reads to decide whether the connection may be parked.
    pub fn rest(&self) -> Arc<super::park::Rest> {
        self.rest.clone()
    }

    /// Waiting for a request head with nothing buffered (after at least one request):
    /// between two requests of a keep-alive connection.
    fn at_boundary(&self) -> bool {
        self.buf.is_empty() && self.scanner.state == State::Head && self.scanner.heads > 0
    }

    /// Put back what hyper had read and not used when the connection was parked; it was
    /// scanned already.
    pub fn unread(&mut self, bytes: &[u8]) {
        self.buf.splice(0..0, bytes.iter().copied());
        self.released += bytes.len();
    }

    /// Where the service answers requests that may switch protocols.
    pub fn gate(&self) -> Arc<Gate> {
        self.gate.clone()
    }

    /// A head is awaited under the header-read limit: the first one of a connection,
    /// and any later one from its first byte until it is complete.
    fn head_pending(&self) -> bool {
        self.scanner.state == State::Head && (self.scanner.heads == 0 || !self.buf.is_empty())
    }

    /// `Err` once the head being awaited is late (slowloris).
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.head_pending() {
            self.deadline = None;
            return Ok(());
        }
        let timeout = self.head_timeout;
        let deadline = self.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Err(io::Error::new(io::ErrorKind::TimedOut, "request head not received in time"))
            }
            Poll::Pending => Ok(()),
        }
    }

    /// Apply the service's answer, if one came, and release what it frees.
    fn poll_gate(&mut self, cx: &Context<'_>) {
        if !self.scanner.switching {
            return;
        }
        if let Some(switched) = self.gate.take(cx) {
            self.scanner.answer(switched);
            if self.released == 0 && !self.buf.is_empty() {
                self.scan();
            }
        }
    }

    /// Scan what is buffered. A head completed ends its deadline: the next head's starts
    /// when it is first awaited (`check_deadline`), not at the connection's first head.
    /// (hyper reads every head through `check_deadline`, which clears it between heads;
    /// latchkey's own server waits for heads in `arrival`, which does not.)
    fn scan(&mut self) {
        let heads = self.scanner.heads;
        self.released = self.scanner.scan(&mut self.buf);
        if self.scanner.heads != heads {
            self.deadline = None;
        }
    }
}

impl<S: AsyncRead + Unpin> Guarded<S> {
    /// Read and drop what the client still sends, until it stops, closes, or a bound.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let linger = self.linger.get_or_insert_with(|| Linger {
            until: Box::pin(tokio::time::sleep(LINGER_TIME)),
            idle: Box::pin(tokio::time::sleep(LINGER_IDLE)),
            discarded: 0,
        });
        let mut scratch = [0u8; 8192];
        loop {
            if linger.until.as_mut().poll(cx).is_ready() || linger.idle.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(()),
                Poll::Ready(Ok(())) => {
                    linger.discarded += rb.filled().len() as u64;
                    if linger.discarded > LINGER_BYTES {
                        return Poll::Ready(());
                    }
                    let next = tokio::time::Instant::now() + LINGER_IDLE;
                    linger.idle.as_mut().reset(next);
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> Guarded<S> {
    /// A parked connection's wait: `true` once the client sent its next bytes (scanned,
    /// and kept for the next hyper connection), `false` at end of input.
    pub async fn arrival(&mut self) -> io::Result<bool> {
        std::future::poll_fn(|cx| self.poll_arrival(cx)).await
    }

    fn poll_arrival(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if !self.buf.is_empty() {
            return Poll::Ready(Ok(true));
        }
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
        let mut rb = ReadBuf::uninit(&mut chunk);
        std::task::ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        if rb.filled().is_empty() {
            return Poll::Ready(Ok(false));
        }
        self.buf.extend_from_slice(rb.filled());
        self.scan();
        Poll::Ready(Ok(true))
    }

    fn poll_guarded(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self;
        loop {
            this.poll_gate(cx);
            if this.released > 0 {
                let n = this.released.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.drain(..n);
                this.released -= n;
                return Poll::Ready(Ok(()));
            }
            if this.buf.is_empty() {
                if this.scanner.passes() {
                    return Pin::new(&mut this.io).poll_read(cx, out);
                }
                // Body bytes go straight to the caller, bounded so no head slips by.
                let left = this.scanner.body_left();
                if left > 0 {
                    let room = out.remaining().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let mut limited = ReadBuf::new(out.initialize_unfilled_to(room));
                    std::task::ready!(Pin::new(&mut this.io).poll_read(cx, &mut limited))?;
                    let n = limited.filled().len();
                    out.advance(n);
                    this.scanner.skip_body(n as u64);
                    return Poll::Ready(Ok(()));
                }
            }
            if this.scanner.state == State::AwaitAnswer && this.buf.len() >= this.scanner.max_head {
                return Poll::Pending; // held in full; the gate wakes us
            }
            this.check_deadline(cx)?;
            // Uninitialised: zeroing 8 KiB on every poll (idle waits included) cost more
            // instructions than the rest of a request's head handling (issue 20).
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
            let mut rb = ReadBuf::uninit(&mut chunk);
            if Pin::new(&mut this.io).poll_read(cx, &mut rb)?.is_pending() {
                if this.at_boundary() {
                    this.rest.waiting();
                }
                return Poll::Pending;
            }
            if rb.filled().is_empty() {
                this.released = this.scanner.end_of_input(&mut this.buf);
                if this.released == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.buf.extend_from_slice(rb.filled());
            this.scan();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let polled = self.poll_guarded(cx, out);
        if polled.is_ready() {
            self.rest.read();
        }
        polled
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.rest.wrote();
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.rest.wrote();
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.io).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) {
            self.rest.flushed();
        }
        flushed
    }
    /// FIN after the response; then, if the client may still be sending, a lingering
    /// close, so that what it sends does not make the kernel reset the connection
    /// before the client has read the response.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.shut {
            std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            this.shut = true;
        }
        if this.scanner.mid_message(this.buf.len()) {
            std::task::ready!(this.poll_linger(cx));
        }
        Poll::Ready(Ok(()))
    }
}
#[cfg(test)]
mod tests {
    /// The shortcut in `is_uri` takes only targets `http`'s parser takes: every plain
    /// character in a path, after a `?`, after a second `?`, and first after the slash.
    #[test]
    fn a_plain_target_is_one_http_parses() {
        for b in (0..=255u8).filter(|&b| super::PLAIN[usize::from(b)]) {
            let c = char::from(b);
            for target in [
                format!("/{c}"),
                format!("/a{c}b"),
                format!("/p?{c}"),
                format!("/p?q{c}?{c}"),
                format!("/{c}{c}"),
            ] {
                assert!(http::Uri::try_from(target.as_str()).is_ok(), "{target:?}");
                assert!(super::is_uri(&target));
            }
        }
        assert!(!super::is_uri("/a b") && !super::is_uri("/a\u{7f}") && !super::is_uri("a/b c"));
        assert!(super::is_uri("/a#b") && super::is_uri("http://h/p") && super::is_uri("*"));
    }
    use super::*;
    use proptest::prelude::*;

    fn run(input: &[u8], cuts: &[usize]) -> Vec<u8> {
        Scanner::new(64 * 1024, 100).scan_split(input, cuts, false)
    }

    fn text(out: Vec<u8>) -> String {
        String::from_utf8(out).unwrap()
    }

    const PIPELINE: &str = "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
        POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n\
        GET /c HTTP/1.1\r\nHost: x\r\n\r\n\
        POST /d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n";

    /// What the guard releases for PIPELINE: the CL+TE head renamed, its body dropped.
    fn pipeline_out() -> String {
        let cut = PIPELINE.rfind("0\r\n\r\n").unwrap();
        PIPELINE[..cut].replace("Content-Length: 3", "latchkey-cl-te: 3")
    }

    #[test]
    fn renames_the_length_of_a_cl_te_request_after_a_pipeline() {
        assert_eq!(text(run(PIPELINE.as_bytes(), &[])), pipeline_out());
    }

    #[test]
    fn te_before_or_after_cl_and_bare_lf_are_caught() {
        let a = "POST / HTTP/1.1\nContent-Length: 3\nTransfer-Encoding: chunked\n\n0\n\n";
        assert!(text(run(a.as_bytes(), &[])).contains("latchkey-cl-te: 3"));
        let b = "\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 3\r\n\r\n";
        assert!(text(run(b.as_bytes(), &[7])).contains("latchkey-cl-te: 3"));
    }

    #[test]
    fn a_smuggled_head_hidden_in_a_body_is_not_mistaken_for_a_request() {
        let body = "GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let input = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        assert_eq!(run(input.as_bytes(), &[3, 40]), input.as_bytes());
    }

    const SMUGGLE: &str = "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";

    #[test]
    fn only_a_switch_that_happened_makes_the_guard_step_aside() {
        for first in [
            "GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: foo\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
        ] {
            let input = format!("{first}{SMUGGLE}");
            // Switched: what follows is the new protocol's, passed as is.
            let out = Scanner::new(1024, 100).scan_split(input.as_bytes(), &[], true);
            assert_eq!(text(out), input, "{first}");
            // Not switched: the next request is followed and caught.
            let out = text(Scanner::new(1024, 100).scan_split(input.as_bytes(), &[5, 60], false));
            assert!(out.contains("latchkey-cl-te: 1"), "{first}: {out}");
        }
        // HTTP/1.0 cannot upgrade (hyper ignores the header): no wait at all.
        let input = format!("GET / HTTP/1.0\r\nUpgrade: foo\r\n\r\n{SMUGGLE}");
        assert!(text(run(input.as_bytes(), &[])).contains("latchkey-cl-te"));
    }

    #[test]
    fn bytes_after_a_switch_request_are_held_until_answered() {
        let mut s = Scanner::new(1024, 100);
        let head = "GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n";
        let mut buf = [head.as_bytes(), &[0x81, 0x05], b"hello"].concat();
        assert_eq!(s.scan(&mut buf), head.len(), "the head goes, the frame is held");
        buf.drain(..head.len());
        buf.extend_from_slice(b"more");
        assert_eq!(s.scan(&mut buf), 0);
        s.answer(true);
        assert_eq!(s.scan(&mut buf), buf.len());
    }

    #[test]
    fn bad_chunking_passes_to_hyper() {
        let input = format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{SMUGGLE}");
        assert_eq!(text(run(input.as_bytes(), &[])), input);
    }

    #[test]
    fn an_incomplete_head_is_held_until_it_ends() {
        let mut s = Scanner::new(1024, 100);
        let mut buf = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
        assert_eq!(s.scan(&mut buf), 0);
        buf.extend_from_slice(b"\r\n");
        assert_eq!(s.scan(&mut buf), buf.len());
    }

    /// The marker head a refused head becomes, parsed back the way the service does.
    fn marker_of(out: &[u8]) -> (Malformed, String) {
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(out).unwrap().is_complete(), "{}", String::from_utf8_lossy(out));
        let mut map = http::HeaderMap::new();
        for h in req.headers.iter() {
            map.append(
                http::HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(h.value).unwrap(),
            );
        }
        refused(&map).expect("a marker head")
    }

    #[test]
    fn heads_hyper_would_refuse_become_marker_heads() {
        let cases: &[(&[u8], Malformed)] = &[
            (b"CONNECT api%2eopenai.com:443 HTTP/1.1\r\n\r\n", Malformed::RequestLine),
            (b"CONNECT api.openai.com\\@evil:443 HTTP/1.1\r\n\r\n", Malformed::RequestLine),
            (b"CONNECT host.example:443/x HTTP/1.1\r\n\r\n", Malformed::RequestLine),
            (b"CONNECT api.open\tai.com:443 HTTP/1.1\r\n\r\n", Malformed::RequestLine),
            (b"GET / HTTP/2.0\r\n\r\n", Malformed::RequestLine),
            (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", Malformed::Header),
            (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", Malformed::Header),
            (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", Malformed::ContentLength),
            (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", Malformed::ContentLength),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", Malformed::TransferEncoding),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", Malformed::TransferEncoding),
        ];
        for (head, why) in cases {
            let input = [*head, b"GET /after HTTP/1.1\r\n\r\n"].concat();
            let out = run(&input, &[9]);
            let (got, line) = marker_of(&out);
            assert_eq!(got, *why, "{}", String::from_utf8_lossy(head));
            assert!(line.starts_with(&escape(&head[..4])), "{line}");
            assert!(!String::from_utf8_lossy(&out).contains("/after"), "nothing after it is released");
        }
        // A good request before the bad one still goes.
        let out = run(b"GET /ok HTTP/1.1\r\n\r\nGET /a b HTTP/1.1\r\n\r\n", &[]);
        assert!(out.starts_with(b"GET /ok HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nlatchkey-refused: request-line"));
    }

    #[test]
    fn oversized_heads_become_a_431_marker() {
        let mut s = Scanner::new(64, 8);
        let mut buf = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
        buf.extend(std::iter::repeat_n(b'a', 100));
        let n = s.scan(&mut buf);
        assert_eq!(marker_of(&buf[..n]).0, Malformed::TooLarge);
        assert!(s.refused());
        let many: String = (0..20).map(|i| format!("h{i}: v\r\n")).collect();
        let out =
            Scanner::new(4096, 8).scan_split(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes(), &[], false);
        assert_eq!(marker_of(&out).0, Malformed::TooManyHeaders);
    }

    #[test]
    fn a_client_written_marker_is_refused_too() {
        let mut map = http::HeaderMap::new();
        map.insert(REFUSED, http::HeaderValue::from_static("200 ok"));
        assert_eq!(refused(&map).map(|r| r.0.kind().status()), Some(400));
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_bytes(cuts in proptest::collection::vec(0usize..400, 0..12)) {
            prop_assert_eq!(text(run(PIPELINE.as_bytes(), &cuts)), pipeline_out());
        }
    }
}
