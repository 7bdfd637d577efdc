//! Scanning a body past what is held whole (or a gRPC stream message by message): each
//! chunk is scanned together with the bytes held from before, and the trailing
//! `LONGEST_MATCH` bytes (or the own-secret redactor's hold-back, if wider) are kept
//! until more comes, so a match split across chunks is seen whole before any of it is
//! released. A gRPC message is released whole at its end.

use bytes::{Bytes, BytesMut};

use super::{Findings, Scanner, rules};
use crate::redact::{GrpcMessages, Set};

#[derive(Debug)]
pub struct Stream {
    carry: BytesMut,
    /// Stream offset of `carry[0]`.
    base: u64,
    /// (rule, stream offset) of the matches already reported.
    reported: Vec<(usize, u64)>,
    grpc: Option<GrpcMessages>,
    message_end: bool,
}

impl Stream {
    /// `offset`: how many body bytes came before (the part held whole).
    pub fn new(offset: u64, grpc: bool) -> Stream {
        Stream {
            carry: BytesMut::new(),
            base: offset,
            reported: Vec::new(),
            grpc: grpc.then(GrpcMessages::default),
            message_end: false,
        }
    }

    /// Add a chunk and scan what is held; the matches not reported before, with
    /// ranges in [`Stream::window`]. `last`: the body ends with this chunk.
    pub fn feed(&mut self, chunk: &[u8], scanner: &Scanner, own: Option<&Set>, last: bool) -> Findings {
        self.message_end = self.grpc.as_mut().is_some_and(|g| g.feed(chunk));
        self.carry.extend_from_slice(chunk);
        let mut found = scanner.scan(&self.carry, own);
        let complete = last || self.message_end;
        let len = self.carry.len();
        // A match running to the end may go on in the next chunk: it is found then.
        found.hits.retain(|h| complete || h.range.end < len);
        let base = self.base;
        let reported = &mut self.reported;
        found.hits.retain(|h| {
            let key = (h.rule, base + h.range.start as u64);
            let new = !reported.contains(&key);
            if new {
                reported.push(key);
            }
            new
        });
        found
    }

    /// The bytes held, to be masked in place before they are released.
    pub fn window(&mut self) -> &mut [u8] {
        &mut self.carry
    }

    /// What can go on now: everything at the end of the body or of a gRPC message,
    /// else all but the tail a match could still start in.
    pub fn release(&mut self, own: Option<&Set>, last: bool) -> Bytes {
        let keep = if last || self.message_end {
            0
        } else {
            let wide = own.map_or(0, |s| s.holdback(&self.carry));
            rules::LONGEST_MATCH.max(wide).min(self.carry.len())
        };
        let out = self.carry.split_to(self.carry.len() - keep).freeze();
        self.base += out.len() as u64;
        let base = self.base;
        self.reported.retain(|(_, at)| *at >= base.saturating_sub(rules::LONGEST_MATCH as u64));
        out
    }

    pub fn held(&self) -> usize {
        self.carry.len()
    }
}
