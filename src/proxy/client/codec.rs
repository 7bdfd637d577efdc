//! The own HTTP/1.1 client's codec, free of I/O: a request head out, a response head and
//! its body's framing in (issue 20).
//!
//! A pooled upstream connection serves the next client's request, so a response read
//! one byte past its end, or short of it, becomes someone else's answer. The framing is
//! RFC 9112 §6.3 as hyper's client reads it: no body after `HEAD`, 1xx (skipped), 204 and
//! 304; `Transfer-Encoding` over `Content-Length` (and then the connection is not used
//! again); differing or malformed lengths refused; no length at all read to the close.
//! Heads are capped in bytes and fields as hyper caps them, chunk lines and trailers
//! too, and every size is checked for overflow. Fuzzed: `fuzz/src/bin/client.rs`.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Version};

use crate::proxy::h1::codec::has_token;

/// hyper's client cap on a response head: its default read buffer limit.
pub const MAX_HEAD: usize = 8192 + 4096 * 100;
/// hyper's default number of header fields, for heads and trailers alike.
const MAX_HEADERS: usize = 100;
/// hyper's cap on a chunked body's trailer section.
const MAX_TRAILERS: usize = 16 * 1024;
/// A chunk-size line: the size and its extensions.
const MAX_CHUNK_LINE: usize = 4096;
/// hyper's cap on a chunked body's extensions, all its chunk lines' together.
const MAX_EXTENSIONS: u64 = 16 * 1024;

/// Why a response cannot be read, in words close to hyper's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("message head is too large")]
    HeadTooLarge,
    #[error("invalid HTTP response head")]
    Head,
    #[error("an unexpected protocol switch (101) from the upstream")]
    Switch,
    #[error("invalid content-length in the response")]
    Length,
    #[error("transfer-encoding in an HTTP/1.0 response")]
    OldChunked,
    #[error("invalid chunk size line")]
    ChunkSize,
    #[error("a chunk without its CRLF")]
    ChunkEnd,
    #[error("invalid chunked trailers")]
    Trailers,
    #[error("connection closed before the response body's end")]
    Truncated,
}

/// Write `method target version`, `host` when given (first, as RFC 9112 3.2 asks), and
/// the headers: the request head as hyper writes it.
pub fn encode_head(
    method: &http::Method,
    target: &str,
    host: Option<&str>,
    headers: &HeaderMap,
    dst: &mut Vec<u8>,
) {
    dst.extend_from_slice(method.as_str().as_bytes());
    dst.push(b' ');
    dst.extend_from_slice(target.as_bytes());
    dst.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = host {
        dst.extend_from_slice(b"host: ");
        dst.extend_from_slice(host.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    for (name, value) in headers {
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
}

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Read to the connection's close.
    Close,
}

/// A final response head.
#[derive(Debug)]
pub struct Head {
    pub response: Response<()>,
    pub framing: Framing,
    /// The connection may carry another request once this body has been read.
    pub reusable: bool,
}

/// What one look at the buffer found.
#[derive(Debug)]
pub enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// A 1xx head, taken off the buffer and skipped.
    Interim,
    Final(Head),
}

/// Parse one response head at the start of `buf`, taking it off when complete.
/// `head_request`: the request was `HEAD`, so the response has no body whatever it says.
pub fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Parsed, Malformed> {
    // Uninitialised slots: filling 100 of them costs more than parsing a short head.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(Malformed::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(Malformed::HeadTooLarge),
        Err(_) => return Err(Malformed::Head),
    };
    if len > MAX_HEAD {
        return Err(Malformed::HeadTooLarge);
    }
    let code = parsed.code.ok_or(Malformed::Head)?;
    match code {
        101 => return Err(Malformed::Switch),
        100..=199 => {
            let _ = buf.split_to(len);
            return Ok(Parsed::Interim);
        }
        _ => {}
    }
    let status = StatusCode::from_u16(code).map_err(|_| Malformed::Head)?;
    let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let reason = parsed.reason.filter(|r| !r.is_empty() && Some(*r) != status.canonical_reason());
    // Spans into the head, so names and values can be slices of one frozen copy.
    let base = buf.as_ptr() as usize;
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let count = parsed.headers.len();
    for (span, h) in spans.iter_mut().zip(parsed.headers.iter()) {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        *span = (name as u32, h.name.len() as u32, value as u32, h.value.len() as u32);
    }
    let reason = reason.map(|r| Bytes::copy_from_slice(r.as_bytes()));
    let bytes = buf.split_to(len).freeze();
    let mut map = HeaderMap::with_capacity(count);
    let mut facts = Facts::default();
    for &(name, name_len, value, value_len) in &spans[..count] {
        let (name, value) = (name as usize, value as usize);
        let name =
            HeaderName::from_bytes(&bytes[name..name + name_len as usize]).map_err(|_| Malformed::Head)?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(value..value + value_len as usize))
            .map_err(|_| Malformed::Head)?;
        facts.see(&name, &value);
        map.append(name, value);
    }
    let (framing, mut reusable) = facts.framing(version, status, head_request)?;
    reusable &= facts.keep_alive(version) && framing != Framing::Close;
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = map;
    if let Some(reason) = reason.and_then(|r| hyper::ext::ReasonPhrase::try_from(r).ok()) {
        response.extensions_mut().insert(reason);
    }
    Ok(Parsed::Final(Head { response, framing, reusable }))
}

/// What a response head says about its framing and its connection, gathered as its
/// lines are read: one pass, where looking each name up in the finished map cost four
/// hashed lookups a response.
struct Facts {
    /// A `Content-Length` line was seen.
    has_length: bool,
    /// Every `Content-Length` value, comma lists included, is the same number: `Err` once
    /// one is not a number or differs.
    length: Result<Option<u64>, Malformed>,
    /// The last `Transfer-Encoding` value, when there is one.
    last_coding: Option<HeaderValue>,
    /// `close` in a `Connection` value (heeded in any value).
    close: bool,
    /// `keep-alive` in a `Connection` value hyper reads (visible ASCII).
    keep_alive: bool,
}

impl Default for Facts {
    fn default() -> Facts {
        Facts { has_length: false, length: Ok(None), last_coding: None, close: false, keep_alive: false }
    }
}

impl Facts {
    fn see(&mut self, name: &HeaderName, value: &HeaderValue) {
        if *name == header::CONTENT_LENGTH {
            self.has_length = true;
            self.length = self.length.and_then(|length| same_length(length, value));
        } else if *name == header::TRANSFER_ENCODING {
            self.last_coding = Some(value.clone());
        } else if *name == header::CONNECTION {
            self.close |= has_token(value.as_bytes(), b"close");
            self.keep_alive |= value.to_str().is_ok() && has_token(value.as_bytes(), b"keep-alive");
        }
    }

    /// The body's framing, and whether it leaves the connection fit for another request.
    fn framing(
        &self,
        version: Version,
        status: StatusCode,
        head_request: bool,
    ) -> Result<(Framing, bool), Malformed> {
        if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return Ok((Framing::Empty, true));
        }
        if let Some(coding) = &self.last_coding {
            if version == Version::HTTP_10 {
                return Err(Malformed::OldChunked);
            }
            // Both: the length is ignored, and a connection framed two ways is not trusted again.
            return Ok(match chunked_last(coding) {
                true => (Framing::Chunked, !self.has_length),
                false => (Framing::Close, false),
            });
        }
        if !self.has_length {
            return Ok((Framing::Close, false));
        }
        Ok((self.length?.map(Framing::Length).ok_or(Malformed::Length)?, true))
    }

    /// A `close` anywhere wins over any `keep-alive`, which counts only in HTTP/1.0.
    fn keep_alive(&self, version: Version) -> bool {
        !self.close && (version == Version::HTTP_11 || self.keep_alive)
    }
}

/// The length so far and one more `Content-Length` value: every number in it must be
/// the same as every other.
fn same_length(mut length: Option<u64>, value: &HeaderValue) -> Result<Option<u64>, Malformed> {
    for part in value.as_bytes().split(|&b| b == b',') {
        let n = digits(part.trim_ascii()).ok_or(Malformed::Length)?;
        if length.is_some_and(|l| l != n) {
            return Err(Malformed::Length);
        }
        length = Some(n);
    }
    Ok(length)
}

fn digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0')))
}

/// The last transfer coding named is `chunked`, in a value hyper reads (visible ASCII:
/// hyper reads any other to the close).
fn chunked_last(last: &HeaderValue) -> bool {
    last.to_str()
        .ok()
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case("chunked"))
}

/// One step of reading a body.
#[derive(Debug)]
pub enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body has ended.
    Done,
    /// More bytes are needed.
    More,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Close,
    ChunkSize,
    Chunk(u64),
    ChunkEnd,
    Trailers,
    Done,
}

/// A body's decoder: bytes in from a buffer, frames out; and the chunk extensions' bytes
/// so far.
#[derive(Debug)]
pub struct Decoder(State, u64);

impl Decoder {
    pub fn new(framing: Framing) -> Decoder {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        Decoder(state, 0)
    }

    pub fn is_done(&self) -> bool {
        self.0 == State::Done
    }

    /// Bytes still to come, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self.0 {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// Take what `buf` holds of the body.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, Malformed> {
        loop {
            match self.0 {
                State::Done => return Ok(Step::Done),
                State::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let take = (buf.len() as u64).min(left);
                    self.0 = if take == left { State::Done } else { State::Length(left - take) };
                    return Ok(Step::Data(buf.split_to(take as usize).freeze()));
                }
                State::Close => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                State::ChunkSize => {
                    let Some(end) = line_end(buf, MAX_CHUNK_LINE, Malformed::ChunkSize)? else {
                        return Ok(Step::More);
                    };
                    let (size, extensions) = chunk_size(&buf[..end])?;
                    self.1 += extensions;
                    if self.1 >= MAX_EXTENSIONS {
                        return Err(Malformed::ChunkSize);
                    }
                    let _ = buf.split_to(end + 2);
                    self.0 = if size == 0 { State::Trailers } else { State::Chunk(size) };
                }
                State::Chunk(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let take = (buf.len() as u64).min(left);
                    self.0 = if take == left { State::ChunkEnd } else { State::Chunk(left - take) };
                    return Ok(Step::Data(buf.split_to(take as usize).freeze()));
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Malformed::ChunkEnd);
                    }
                    let _ = buf.split_to(2);
                    self.0 = State::ChunkSize;
                }
                State::Trailers => return self.trailers(buf),
            }
        }
    }

    /// The trailer section after the last chunk: nothing but its blank line, or fields.
    fn trailers(&mut self, buf: &mut BytesMut) -> Result<Step, Malformed> {
        if buf.len() < 2 {
            return Ok(Step::More);
        }
        if &buf[..2] == b"\r\n" {
            let _ = buf.split_to(2);
            self.0 = State::Done;
            return Ok(Step::Done);
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let (len, fields) = match httparse::parse_headers(buf, &mut fields) {
            Ok(httparse::Status::Complete(done)) => done,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_TRAILERS => return Err(Malformed::Trailers),
            Ok(httparse::Status::Partial) => return Ok(Step::More),
            Err(_) => return Err(Malformed::Trailers),
        };
        // hyper counts the section's last CRLF too; and a bare LF, which hyper reads as
        // part of a line, must not end the section here.
        let bare_lf =
            buf[..len].iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || buf[i - 1] != b'\r'));
        if len >= MAX_TRAILERS || bare_lf {
            return Err(Malformed::Trailers);
        }
        let mut map = HeaderMap::with_capacity(fields.len());
        for field in fields {
            let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| Malformed::Trailers)?;
            let value = HeaderValue::from_bytes(field.value).map_err(|_| Malformed::Trailers)?;
            map.append(name, value);
        }
        let _ = buf.split_to(len);
        self.0 = State::Done;
        Ok(Step::Trailers(map))
    }

    /// The connection closed: the end of a body read to the close, else a cut-off body.
    pub fn eof(&mut self) -> Result<(), Malformed> {
        match self.0 {
            State::Close | State::Done => {
                self.0 = State::Done;
                Ok(())
            }
            _ => Err(Malformed::Truncated),
        }
    }
}

/// Where the CRLF ending the first line of `buf` is; a bare LF, or no end within `max`
/// bytes, is `why`.
fn line_end(buf: &[u8], max: usize, why: Malformed) -> Result<Option<usize>, Malformed> {
    let window = &buf[..buf.len().min(max)];
    match window.iter().position(|&b| b == b'\n') {
        Some(0) => Err(why),
        Some(lf) if window[lf - 1] == b'\r' => Ok(Some(lf - 1)),
        Some(_) => Err(why),
        None if buf.len() >= max => Err(why),
        None => Ok(None),
    }
}

/// `1*HEXDIG [ BWS ";" extensions ]`: the size, checked for overflow, and the
/// extensions' length (after the `;`).
fn chunk_size(line: &[u8]) -> Result<(u64, u64), Malformed> {
    let hex = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if hex == 0 || hex > 16 {
        return Err(Malformed::ChunkSize);
    }
    let blank = line[hex..].iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    let rest = &line[hex + blank..];
    if !(rest.is_empty() || rest[0] == b';') || rest.contains(&b'\r') {
        return Err(Malformed::ChunkSize);
    }
    let text = std::str::from_utf8(&line[..hex]).map_err(|_| Malformed::ChunkSize)?;
    let size = u64::from_str_radix(text, 16).map_err(|_| Malformed::ChunkSize)?;
    Ok((size, rest.len().saturating_sub(1) as u64))
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod codec_tests;
