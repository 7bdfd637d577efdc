//! A request-framing guard in front of hyper's HTTP/1 parser.
//!
//! hyper resolves `Content-Length` together with `Transfer-Encoding` the RFC 9112 way
//! (chunked wins, the length is dropped, the connection closes afterwards), so nothing
//! can desync — but the request still goes out, and the spec refuses smuggling attempts
//! with 400. By the time a handler runs the dropped `Content-Length` is invisible, so
//! this guard reads the byte stream first: it follows each request's framing with the
//! same parser hyper uses (httparse), holds a request head back until it is complete,
//! and renames the `Content-Length` of a CL+TE head to [`SMUGGLED`] (same length, so
//! nothing shifts). The service answers any request carrying that header with 400.
//!
//! Anything the guard does not understand (a malformed head, bad chunking, an upgrade)
//! makes it step aside for the rest of the connection: hyper then rejects or handles
//! the bytes as it would have, so the guard can only add refusals, never remove one.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Header name a CL+TE request's `Content-Length` is renamed to (14 bytes, as is
/// `content-length`).
pub const SMUGGLED: &str = "latchkey-cl-te";

/// Longest chunk-size or trailer line followed before stepping aside.
const MAX_LINE: usize = 8 * 1024;

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
    /// Not following any more: bytes pass as they come.
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
}

impl Scanner {
    pub fn new(max_head: usize, max_headers: usize) -> Self {
        Scanner { state: State::Head, seen: 0, line: Vec::new(), max_head, max_headers, heads: 0 }
    }

    fn blind(&self) -> bool {
        self.state == State::Blind
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
            State::Fixed(left) if left == n => State::Head,
            State::Fixed(left) => State::Fixed(left - n),
            State::ChunkData(left) if left == n => State::ChunkEnd(false),
            State::ChunkData(left) => State::ChunkData(left - n),
            other => other,
        };
    }

    /// Look at the bytes of `buf` not seen yet (rewriting a smuggling head in place) and
    /// return how many bytes from its front may be handed to hyper. Everything before
    /// the cursor is released except an incomplete head, which is held.
    pub fn scan(&mut self, buf: &mut [u8]) -> usize {
        let mut i = self.seen;
        let mut released = 0;
        while i < buf.len() {
            match self.state {
                State::Blind => i = buf.len(),
                // Empty lines before a request line are allowed (RFC 9112 §2.2).
                State::Head if i == released && matches!(buf[i], b'\r' | b'\n') => i += 1,
                State::Head => match head_end(&buf[released..], i - released) {
                    Some(end) => {
                        i = released + end;
                        self.state = self.on_head(&mut buf[released..i]);
                        self.heads += 1;
                    }
                    // Too big for hyper too: it answers 431.
                    None if buf.len() - released > self.max_head => self.state = State::Blind,
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
                    let (line, done) = match buf[i..].iter().position(|&b| b == b'\n') {
                        Some(p) => (&buf[i..i + p + 1], true),
                        None => (&buf[i..], false),
                    };
                    i += line.len();
                    if self.line.len() + line.len() > MAX_LINE {
                        self.state = State::Blind;
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
                        _ => State::Blind,
                    };
                    i += 1;
                }
            }
            released = i;
        }
        self.seen = 0;
        released
    }

    /// A complete chunk-size or trailer line.
    fn on_line(&self) -> State {
        match self.state {
            State::ChunkSize => match chunk_size(&self.line) {
                Some(0) => State::Trailer,
                Some(n) => State::ChunkData(n),
                None => State::Blind, // hyper fails the body; latchkey answers 400
            },
            _ if matches!(self.line.as_slice(), b"\n" | b"\r\n") => State::Head,
            _ => State::Trailer,
        }
    }

    /// Feed `input` arriving in pieces cut at `cuts` (taken modulo its length); return
    /// what was released, in order, the end of the stream releasing what was held.
    /// For tests and the fuzz target.
    pub fn scan_split(&mut self, input: &[u8], cuts: &[usize]) -> Vec<u8> {
        let (mut buf, mut out, mut last) = (Vec::new(), Vec::new(), 0);
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        points.push(input.len());
        points.sort_unstable();
        for p in points {
            buf.extend_from_slice(&input[last..p]);
            last = p;
            let n = self.scan(&mut buf);
            out.extend(buf.drain(..n));
        }
        out.append(&mut buf);
        out
    }

    /// Decide how the body after a complete head is framed.
    fn on_head(&self, head: &mut [u8]) -> State {
        let mut headers = vec![httparse::EMPTY_HEADER; self.max_headers];
        let mut req = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(_)) = req.parse(head) else {
            return State::Blind; // hyper answers 400 or 431
        };
        if req.method == Some("CONNECT") {
            return State::Blind; // the stream becomes a tunnel
        }
        let base = head.as_ptr() as usize;
        let mut lengths = Vec::new();
        let mut chunked = None;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("upgrade") {
                return State::Blind;
            } else if h.name.eq_ignore_ascii_case("content-length") {
                lengths.push((h.name.as_ptr() as usize - base, h.value));
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = Some(last_coding_is_chunked(h.value));
            }
        }
        let lengths: Vec<(usize, Option<u64>)> =
            lengths.into_iter().map(|(at, v)| (at, content_length(v))).collect();
        match (chunked, lengths.as_slice()) {
            (Some(_), [_, ..]) => {
                for (at, _) in &lengths {
                    head[*at..*at + SMUGGLED.len()].copy_from_slice(SMUGGLED.as_bytes());
                }
                State::Blind // the connection closes after the 400
            }
            (Some(true), []) => State::ChunkSize,
            (Some(false), []) => State::Blind, // hyper answers 400
            (None, []) => State::Head,
            (None, [(_, Some(n)), rest @ ..]) if rest.iter().all(|(_, m)| *m == Some(*n)) => {
                if *n == 0 {
                    State::Head
                } else {
                    State::Fixed(*n)
                }
            }
            (None, _) => State::Blind, // differing or invalid lengths: hyper answers 400
        }
    }
}

/// Where a head ends in `buf`: after the first empty line, searching from `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(2);
    let mut i = start;
    while let Some(p) = buf[i..].iter().position(|&b| b == b'\n') {
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
        }
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
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.released > 0 {
                let n = this.released.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.drain(..n);
                this.released -= n;
                return Poll::Ready(Ok(()));
            }
            if this.buf.is_empty() {
                if this.scanner.blind() {
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
            this.check_deadline(cx)?;
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            std::task::ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // End of stream: whatever is held goes to hyper, which decides.
                this.scanner.state = State::Blind;
                this.released = this.buf.len();
                if this.released == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.buf.extend_from_slice(rb.filled());
            this.released = this.scanner.scan(&mut this.buf);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(input: &[u8], cuts: &[usize]) -> Vec<u8> {
        Scanner::new(64 * 1024, 100).scan_split(input, cuts)
    }

    const PIPELINE: &str = "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
        POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n\
        GET /c HTTP/1.1\r\nHost: x\r\n\r\n\
        POST /d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n";

    #[test]
    fn renames_the_length_of_a_cl_te_request_after_a_pipeline() {
        let out = run(PIPELINE.as_bytes(), &[]);
        let expected = PIPELINE.replace("Content-Length: 3", "latchkey-cl-te: 3");
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }

    #[test]
    fn te_before_or_after_cl_and_bare_lf_are_caught() {
        let a = "POST / HTTP/1.1\nContent-Length: 3\nTransfer-Encoding: chunked\n\n0\n\n";
        assert!(String::from_utf8(run(a.as_bytes(), &[])).unwrap().contains("latchkey-cl-te: 3"));
        let b = "\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 3\r\n\r\n";
        assert!(String::from_utf8(run(b.as_bytes(), &[7])).unwrap().contains("latchkey-cl-te: 3"));
    }

    #[test]
    fn a_smuggled_head_hidden_in_a_body_is_not_mistaken_for_a_request() {
        let body = "GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let input = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        assert_eq!(run(input.as_bytes(), &[3, 40]), input.as_bytes());
    }

    #[test]
    fn steps_aside_on_upgrade_connect_and_bad_chunking() {
        for input in [
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(run(input.as_bytes(), &[]), input.as_bytes(), "{input}");
        }
    }

    #[test]
    fn an_incomplete_head_is_held_until_it_ends() {
        let mut s = Scanner::new(1024, 100);
        let mut buf = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
        assert_eq!(s.scan(&mut buf), 0);
        buf.extend_from_slice(b"\r\n");
        assert_eq!(s.scan(&mut buf), buf.len());
    }

    #[test]
    fn an_oversized_head_is_released_for_hyper_to_refuse() {
        let mut s = Scanner::new(16, 100);
        let mut buf = b"GET / HTTP/1.1\r\nX-Long: aaaaaaaaaaaaaaaaaaaaa".to_vec();
        assert_eq!(s.scan(&mut buf), buf.len());
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_bytes(cuts in proptest::collection::vec(0usize..400, 0..12)) {
            let expected = PIPELINE.replace("Content-Length: 3", "latchkey-cl-te: 3");
            prop_assert_eq!(String::from_utf8(run(PIPELINE.as_bytes(), &cuts)).unwrap(), expected);
        }
    }
}
