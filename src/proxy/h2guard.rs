//! A frame-rate guard in front of the HTTP/2 server, `h2_server` (intercepted tunnels that
//! negotiated `h2`).
//!
//! h2 answers every SETTINGS frame with an ACK and every PING with a PONG, at whatever
//! rate a client sends them: a client that floods them costs a core for as long as it
//! likes (its memory is bounded: h2 stops reading while its answers cannot be written).
//! `h2` has no setting for this, so the guard reads the 9-byte frame headers of the
//! client's plaintext stream as the server reads it — in place: no byte is copied, held or
//! changed — and counts SETTINGS and PING frames (not their ACKs). A client over
//! [`SETTINGS_PER_WINDOW`] or [`PINGS_PER_WINDOW`] in one [`WINDOW`] gets no more of
//! its bytes read: the guard writes GOAWAY with ENHANCE_YOUR_CALM at the next frame
//! boundary of what the server writes (it follows those frame headers too, so the GOAWAY
//! never lands inside another frame) and closes the connection.
//!
//! The counting is a state machine free of I/O and of the clock (the caller hands in a
//! clock, read only when a count passes its limit), so it is tested on any split of
//! input (`fuzzing::h2_frames`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The window the counts are kept over.
pub const WINDOW: Duration = Duration::from_secs(1);

/// SETTINGS frames a client may send in one window. A client sends one when it
/// connects and rarely another; 100 a second is a flood, never a client.
pub const SETTINGS_PER_WINDOW: u32 = 100;

/// PING frames a client may send in one window: higher than SETTINGS because clients
/// that measure the bandwidth-delay product (gRPC's) send one per round trip while a
/// window grows, which on a fast link is many a second for a moment.
pub const PINGS_PER_WINDOW: u32 = 1000;

/// How long the guard tries to deliver its GOAWAY to a client that does not read.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The client connection preface, before the first frame.
const PREFACE_LEN: usize = 24;
const HEADER_LEN: usize = 9;

const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
/// RFC 9113 §7.
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Header {
    fn parse(b: &[u8]) -> Header {
        Header {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

/// Where frames begin in a byte stream seen in pieces.
#[derive(Debug, Clone)]
pub struct Frames {
    /// Bytes of the current payload (or of the preface) still to pass over.
    skip: usize,
    /// A header cut between two pieces: its first `have` bytes.
    head: [u8; HEADER_LEN],
    have: usize,
}

impl Frames {
    /// A stream whose first frame follows `preface` bytes.
    pub fn new(preface: usize) -> Frames {
        Frames { skip: preface, head: [0; HEADER_LEN], have: 0 }
    }

    /// Bytes to the end of the current frame's header or payload as far as it is known
    /// (0: between two frames).
    pub fn to_boundary(&self) -> usize {
        if self.have > 0 { HEADER_LEN - self.have } else { self.skip }
    }

    /// Follow `bytes`, calling `on` with each frame header completed in them. When `on`
    /// returns false, stop there and return where that frame's header begins in
    /// `bytes` (0 when it began in an earlier piece: those bytes are gone).
    pub fn feed(&mut self, bytes: &[u8], mut on: impl FnMut(Header) -> bool) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            if self.skip > 0 {
                let take = self.skip.min(bytes.len() - i);
                self.skip -= take;
                i += take;
                continue;
            }
            let start = i;
            let header = if self.have == 0 && bytes.len() - i >= HEADER_LEN {
                i += HEADER_LEN;
                Header::parse(&bytes[start..i])
            } else {
                let take = (HEADER_LEN - self.have).min(bytes.len() - i);
                self.head[self.have..self.have + take].copy_from_slice(&bytes[i..i + take]);
                self.have += take;
                i += take;
                if self.have < HEADER_LEN {
                    return None;
                }
                self.have = 0;
                Header::parse(&self.head)
            };
            self.skip = header.len as usize;
            if !on(header) {
                return Some(start);
            }
        }
        None
    }
}

/// A count of frames in a window that begins when the guard starts and again each time
/// the count passes its limit a window or more after the last beginning: the clock is
/// read once per `limit` frames, never per byte.
#[derive(Debug, Clone)]
struct Rate {
    limit: u32,
    count: u32,
    since: Instant,
}

impl Rate {
    /// Count one frame; true when it is one too many.
    fn hit(&mut self, clock: &mut impl FnMut() -> Instant) -> bool {
        self.count += 1;
        if self.count <= self.limit {
            return false;
        }
        let now = clock();
        if now.saturating_duration_since(self.since) < WINDOW {
            return true;
        }
        self.since = now;
        self.count = 1;
        false
    }
}

/// What a client flooded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flood {
    Settings,
    Ping,
}

impl Flood {
    /// The GOAWAY's debug data, and the log's words.
    pub fn what(self) -> &'static str {
        match self {
            Flood::Settings => "more than 100 SETTINGS frames a second",
            Flood::Ping => "more than 1000 PING frames a second",
        }
    }
}

/// The client side's frames, counted.
#[derive(Debug, Clone)]
pub struct Watch {
    frames: Frames,
    settings: Rate,
    pings: Rate,
    /// The highest stream a client opened (the GOAWAY's last stream id).
    last_stream: u32,
}

impl Watch {
    pub fn new(now: Instant) -> Watch {
        let rate = |limit| Rate { limit, count: 0, since: now };
        Watch {
            frames: Frames::new(PREFACE_LEN),
            settings: rate(SETTINGS_PER_WINDOW),
            pings: rate(PINGS_PER_WINDOW),
            last_stream: 0,
        }
    }

    /// Follow bytes the client sent. `Err((at, flood))`: the frame whose header begins
    /// at `at` is one too many; nothing from there on may reach the server.
    pub fn read(&mut self, bytes: &[u8], clock: &mut impl FnMut() -> Instant) -> Result<(), (usize, Flood)> {
        let (settings, pings, last) = (&mut self.settings, &mut self.pings, &mut self.last_stream);
        let mut flood = None;
        let stopped = self.frames.feed(bytes, |h| {
            flood = match (h.kind, h.flags & ACK) {
                (SETTINGS, 0) if settings.hit(clock) => Some(Flood::Settings),
                (PING, 0) if pings.hit(clock) => Some(Flood::Ping),
                (HEADERS, _) => {
                    *last = (*last).max(h.stream);
                    None
                }
                _ => None,
            };
            flood.is_none()
        });
        match (stopped, flood) {
            (Some(at), Some(f)) => Err((at, f)),
            _ => Ok(()),
        }
    }

    /// The GOAWAY frame that ends a flooding client's connection.
    pub fn goaway(&self, flood: Flood) -> Vec<u8> {
        let debug = flood.what().as_bytes();
        let len = u32::try_from(8 + debug.len()).unwrap_or(8).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], GOAWAY, 0, 0, 0, 0, 0];
        f.extend_from_slice(&self.last_stream.to_be_bytes());
        f.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
        f.extend_from_slice(debug);
        f
    }
}

/// Where the guard is in ending a connection.
enum Phase {
    Open,
    /// Over a limit: the GOAWAY, written from `sent` on once the server's output is between
    /// two frames, then flushed, then the stream shut down, all within `deadline`.
    Closing {
        goaway: Vec<u8>,
        sent: usize,
        flushed: bool,
        deadline: Pin<Box<tokio::time::Sleep>>,
    },
    Closed,
}

/// A client stream of an intercepted h2 tunnel, watched.
pub struct H2Guard<S> {
    io: S,
    watch: Watch,
    /// Frame boundaries of what the server writes.
    out: Frames,
    phase: Phase,
    peer: SocketAddr,
}

impl<S> H2Guard<S> {
    pub fn new(io: S, peer: SocketAddr) -> Self {
        H2Guard { io, watch: Watch::new(Instant::now()), out: Frames::new(0), phase: Phase::Open, peer }
    }

    fn trip(&mut self, flood: Flood) {
        tracing::warn!(
            "h2 client {}: {}: sent GOAWAY (ENHANCE_YOUR_CALM) and closed",
            self.peer,
            flood.what()
        );
        let deadline = Box::pin(tokio::time::sleep(CLOSE_TIMEOUT));
        self.phase = Phase::Closing { goaway: self.watch.goaway(flood), sent: 0, flushed: false, deadline };
    }
}

impl<S: AsyncWrite + Unpin> H2Guard<S> {
    /// Deliver the GOAWAY and shut down; Ready once closed (or given up). Only called
    /// between two of the server's frames.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Phase::Closing { goaway, sent, flushed, deadline } = &mut self.phase else {
            return Poll::Ready(());
        };
        if deadline.as_mut().poll(cx).is_ready() {
            self.phase = Phase::Closed;
            return Poll::Ready(());
        }
        let io = Pin::new(&mut self.io);
        // Ok(true): shut down (or the stream took no more bytes).
        let step: Poll<io::Result<bool>> = if *sent < goaway.len() {
            io.poll_write(cx, &goaway[*sent..]).map_ok(|n| {
                *sent += n;
                n == 0
            })
        } else if !*flushed {
            io.poll_flush(cx).map_ok(|()| {
                *flushed = true;
                false
            })
        } else {
            io.poll_shutdown(cx).map_ok(|()| true)
        };
        match ready!(step) {
            Ok(false) => self.poll_close(cx),
            _ => {
                self.phase = Phase::Closed;
                // The server may be waiting on its read side, which ends now.
                cx.waker().wake_by_ref();
                Poll::Ready(())
            }
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "h2 client flooded control frames")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for H2Guard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.phase {
            Phase::Open => {
                let before = buf.filled().len();
                ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
                match this.watch.read(&buf.filled()[before..], &mut Instant::now) {
                    Ok(()) => return Poll::Ready(Ok(())),
                    Err((at, flood)) => {
                        buf.set_filled(before + at);
                        this.trip(flood);
                        if at > 0 {
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
            }
            Phase::Closing { .. } => {}
            Phase::Closed => return Poll::Ready(Err(closed())),
        }
        // h2 flushes what it has written whenever a read is pending, and the GOAWAY
        // goes out from there when its output is inside a frame; the deadline holds
        // even if that flush never completes (a client that reads nothing).
        if this.out.to_boundary() > 0 {
            if let Phase::Closing { deadline, .. } = &mut this.phase
                && deadline.as_mut().poll(cx).is_ready()
            {
                this.phase = Phase::Closed;
                return Poll::Ready(Err(closed()));
            }
            return Poll::Pending;
        }
        ready!(this.poll_close(cx));
        Poll::Ready(Err(closed()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for H2Guard<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let buf = match this.phase {
            Phase::Open => buf,
            Phase::Closing { .. } if this.out.to_boundary() > 0 => {
                // Finish the frame hyper is in the middle of, nothing after it.
                &buf[..buf.len().min(this.out.to_boundary())]
            }
            Phase::Closing { .. } => {
                ready!(this.poll_close(cx));
                return Poll::Ready(Err(closed()));
            }
            Phase::Closed => return Poll::Ready(Err(closed())),
        };
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.out.feed(&buf[..n], |_| true);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if !matches!(this.phase, Phase::Open) {
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
            return self.poll_write(cx, first);
        }
        let mut left = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        let n = left;
        for b in bufs {
            let take = left.min(b.len());
            this.out.feed(&b[..take], |_| true);
            left -= take;
            if left == 0 {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if matches!(this.phase, Phase::Closing { .. }) && this.out.to_boundary() == 0 {
            ready!(this.poll_close(cx));
        }
        match this.phase {
            Phase::Closed => Poll::Ready(Ok(())),
            _ => Pin::new(&mut this.io).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if matches!(this.phase, Phase::Closing { .. }) && this.out.to_boundary() == 0 {
            ready!(this.poll_close(cx));
        }
        match this.phase {
            Phase::Closed => Poll::Ready(Ok(())),
            _ => Pin::new(&mut this.io).poll_shutdown(cx),
        }
    }
}

/// Feed `input` in pieces cut at `cuts` (modulo its length) through a [`Watch`] whose
/// clock advances `tick` per reading; return where it stopped (offset in `input`) and
/// why. For tests and the fuzz target.
#[cfg(any(test, feature = "fuzzing"))]
pub fn watch_split(input: &[u8], cuts: &[usize], tick: Duration) -> Option<(usize, Flood)> {
    let start = Instant::now();
    let mut now = start;
    let mut clock = move || {
        now += tick;
        now
    };
    let mut watch = Watch::new(start);
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(input.len());
    points.sort_unstable();
    let mut last = 0;
    for p in points {
        if let Err((at, flood)) = watch.read(&input[last..p], &mut clock) {
            return Some((last + at, flood));
        }
        last = p;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn preface() -> Vec<u8> {
        let mut v = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        v.extend(frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
        v
    }

    fn headers_of(input: &[u8], cuts: &[usize]) -> Vec<Header> {
        let mut frames = Frames::new(PREFACE_LEN);
        let mut seen = Vec::new();
        let mut last = 0;
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        points.push(input.len());
        points.sort_unstable();
        for p in points {
            assert_eq!(
                frames.feed(&input[last..p], |h| {
                    seen.push(h);
                    true
                }),
                None
            );
            last = p;
        }
        seen
    }

    #[test]
    fn headers_are_found_however_the_stream_is_cut() {
        let mut input = preface();
        input.extend(frame(HEADERS, 4, 1, b"abc"));
        input.extend(frame(0, 1, 1, &[7; 40000]));
        input.extend(frame(PING, 0, 0, b"12345678"));
        let whole = headers_of(&input, &[]);
        assert_eq!(whole.iter().map(|h| h.kind).collect::<Vec<_>>(), [SETTINGS, HEADERS, 0, PING]);
        assert_eq!(whole[2].len, 40000);
        for cut in 0..input.len().min(200) {
            assert_eq!(headers_of(&input, &[cut, cut + 3, cut + 40010]), whole, "cut at {cut}");
        }
    }

    #[test]
    fn a_settings_flood_is_stopped_at_the_frame_over_the_limit() {
        let mut input = preface();
        let one = frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]);
        for _ in 0..200 {
            input.extend_from_slice(&one);
        }
        // The preface's SETTINGS is the first; the 101st SETTINGS is the one too many.
        let at = PREFACE_LEN + 100 * one.len();
        for cuts in [vec![], vec![5], vec![at - 4, at + 20], vec![30, 31, 32]] {
            assert_eq!(watch_split(&input, &cuts, Duration::ZERO), Some((at, Flood::Settings)), "{cuts:?}");
        }
        // Its header cut in two: its first bytes went to hyper with the piece before.
        assert_eq!(watch_split(&input, &[at + 2], Duration::ZERO), Some((at + 2, Flood::Settings)));
    }

    #[test]
    fn acks_and_a_slow_rate_are_not_a_flood() {
        let mut input = preface();
        for _ in 0..5000 {
            input.extend(frame(SETTINGS, ACK, 0, &[]));
            input.extend(frame(PING, ACK, 0, b"12345678"));
        }
        assert_eq!(watch_split(&input, &[], Duration::ZERO), None, "ACKs are not counted");
        let mut input = preface();
        for _ in 0..1000 {
            input.extend(frame(SETTINGS, 0, 0, &[]));
        }
        // The clock is read once per hundred: 1.01 s later each time is under the limit.
        assert_eq!(watch_split(&input, &[], Duration::from_millis(1010)), None);
        // 0.5 s: the second hundred within a window is one too many.
        assert_eq!(watch_split(&input, &[], Duration::from_millis(500)).map(|s| s.1), Some(Flood::Settings));
    }

    #[test]
    fn a_ping_flood_is_stopped_at_its_own_limit() {
        let mut input = preface();
        let one = frame(PING, 0, 0, b"12345678");
        for _ in 0..1500 {
            input.extend_from_slice(&one);
        }
        let at = preface().len() + 1000 * one.len();
        assert_eq!(watch_split(&input, &[77], Duration::ZERO), Some((at, Flood::Ping)));
    }

    #[test]
    fn the_goaway_names_the_last_stream_and_enhance_your_calm() {
        let mut watch = Watch::new(Instant::now());
        let mut input = preface();
        input.extend(frame(HEADERS, 5, 7, b"x"));
        input.extend(frame(HEADERS, 5, 3, b"x"));
        watch.read(&input, &mut Instant::now).unwrap();
        let g = watch.goaway(Flood::Settings);
        let h = Header::parse(&g);
        assert_eq!((h.kind, h.flags, h.stream, h.len as usize), (GOAWAY, 0, 0, g.len() - 9));
        assert_eq!(&g[9..13], &7u32.to_be_bytes());
        assert_eq!(&g[13..17], &ENHANCE_YOUR_CALM.to_be_bytes());
    }

    #[test]
    fn the_write_side_knows_when_it_is_between_frames() {
        let mut out = Frames::new(0);
        let f = frame(0, 0, 1, &[1; 100]);
        assert_eq!(out.to_boundary(), 0);
        out.feed(&f[..4], |_| true);
        assert_eq!(out.to_boundary(), 5, "inside the header");
        out.feed(&f[4..50], |_| true);
        assert_eq!(out.to_boundary(), 100 + 9 - 50);
        out.feed(&f[50..], |_| true);
        assert_eq!(out.to_boundary(), 0);
    }
}
