//! The jail's DNS: every name gets an address from 198.18.0.0/15 that latchkey maps
//! back to the name, so a connection to that address *is* a connection to that name.
//! No real address is ever looked up for, or shown to, the jail.
//!
//! A hand-written parser for the one thing asked of it (a standard query with one
//! question): no dependency, and `fuzz/` drives it (target `dns`).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::num::NonZeroUsize;

use crate::policy::Host;

/// 198.18.0.0/15 (RFC 2544): never routed on the internet, and refused by the SSRF
/// rule, so an address from here that latchkey no longer knows goes nowhere.
pub const RANGE_START: u32 = u32::from_be_bytes([198, 18, 0, 0]);
pub const RANGE_SIZE: u32 = 1 << 17;
/// Names one jail keeps (least recently used go first); well below the range, so an
/// address is handed out again only after the whole range has gone round.
pub const CAPACITY: usize = 65_536;
/// Seconds a client may cache an answer.
const TTL: u32 = 300;

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const RCODE_FORMERR: u8 = 1;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOTIMP: u8 = 4;

/// One jail's name ↔ address map, bounded (LRU).
pub struct FakeAddrs {
    names: lru::LruCache<String, u32>,
    by_offset: HashMap<u32, String>,
    next: u32,
}

impl Default for FakeAddrs {
    fn default() -> Self {
        FakeAddrs::with_capacity(CAPACITY)
    }
}

impl FakeAddrs {
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, RANGE_SIZE as usize / 2);
        let cap = NonZeroUsize::new(capacity).expect("clamped to at least 1");
        FakeAddrs { names: lru::LruCache::new(cap), by_offset: HashMap::new(), next: 1 }
    }

    /// Whether `ip` is in the range this map hands out.
    pub fn in_range(ip: Ipv4Addr) -> bool {
        u32::from(ip).wrapping_sub(RANGE_START) < RANGE_SIZE
    }

    /// The address for `name` (normalised), handing out a new one when needed.
    pub fn address_for(&mut self, name: &str) -> Ipv4Addr {
        if let Some(off) = self.names.get(name) {
            return Ipv4Addr::from(RANGE_START + off);
        }
        if self.names.len() == self.names.cap().get()
            && let Some((_, off)) = self.names.pop_lru()
        {
            self.by_offset.remove(&off);
        }
        // Fewer names are kept than the range holds, so a free address is near.
        let mut off = self.next;
        while off == 0 || off == RANGE_SIZE - 1 || self.by_offset.contains_key(&off) {
            off = (off + 1) % RANGE_SIZE;
        }
        self.next = (off + 1) % RANGE_SIZE;
        self.names.put(name.to_string(), off);
        self.by_offset.insert(off, name.to_string());
        Ipv4Addr::from(RANGE_START + off)
    }

    /// The name `ip` was handed out for, if this map still holds it.
    pub fn name_of(&mut self, ip: Ipv4Addr) -> Option<String> {
        let off = u32::from(ip).wrapping_sub(RANGE_START);
        let name = self.by_offset.get(&off)?.clone();
        self.names.get(&name); // a name in use stays
        Some(name)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The answer to one DNS message, or `None` when it deserves none (too short to carry
/// an ID, or itself a response).
pub fn answer(query: &[u8], addrs: &mut FakeAddrs) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let opcode = (query[2] >> 3) & 0x0f;
    let qdcount = u16::from_be_bytes([query[4], query[5]]);
    if opcode != 0 {
        return Some(reply(query, None, RCODE_NOTIMP));
    }
    if qdcount != 1 {
        return Some(reply(query, None, RCODE_FORMERR));
    }
    let Some(q) = parse_question(&query[12..]) else {
        return Some(reply(query, None, RCODE_FORMERR));
    };
    let question = &query[12..12 + q.len];
    let name = match Host::parse(&q.name) {
        Ok(Host::Domain(d)) => d,
        // An IP written as a name, or no host at all: nothing to hand out.
        _ => return Some(reply(query, Some((question, None)), RCODE_NXDOMAIN)),
    };
    if q.class != CLASS_IN {
        return Some(reply(query, Some((question, None)), RCODE_NOTIMP));
    }
    // A only: AAAA (and every other type) is answered with no records, so clients use
    // IPv4, the one family the jail maps names in.
    let addr = (q.qtype == TYPE_A).then(|| {
        if name == "localhost" || name.ends_with(".localhost") {
            Ipv4Addr::LOCALHOST
        } else {
            addrs.address_for(&name)
        }
    });
    Some(reply(query, Some((question, addr)), 0))
}

struct Question {
    name: String,
    qtype: u16,
    class: u16,
    /// Bytes of the question section.
    len: usize,
}

/// QNAME (uncompressed labels, as every resolver writes a query), QTYPE, QCLASS.
fn parse_question(b: &[u8]) -> Option<Question> {
    let mut at = 0;
    let mut name = String::new();
    loop {
        let len = *b.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        // 0xC0: a compression pointer; 0x40/0x80: reserved label types.
        if len > 63 {
            return None;
        }
        let label = b.get(at..at + len)?;
        if !name.is_empty() {
            name.push('.');
        }
        // Bytes outside printable ASCII cannot name a host; `Host::parse` refuses them.
        name.extend(label.iter().map(|&c| if c.is_ascii_graphic() && c != b'.' { c as char } else { ' ' }));
        at += len;
        if name.len() > 253 {
            return None;
        }
    }
    let fixed = b.get(at..at + 4)?;
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let class = u16::from_be_bytes([fixed[2], fixed[3]]);
    Some(Question { name, qtype, class, len: at + 4 })
}

/// A response: the query's ID and RD bit, its question echoed, at most one A record.
fn reply(query: &[u8], question: Option<(&[u8], Option<Ipv4Addr>)>, rcode: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&query[..2]);
    let rd = query[2] & 0x01;
    out.push(0x80 | 0x04 | rd); // QR, AA, RD as asked
    out.push(0x80 | rcode); // RA
    let (qd, an) = match question {
        Some((_, Some(_))) => (1u16, 1u16),
        Some((_, None)) => (1, 0),
        None => (0, 0),
    };
    for n in [qd, an, 0, 0] {
        out.extend_from_slice(&n.to_be_bytes());
    }
    if let Some((q, addr)) = question {
        out.extend_from_slice(q);
        if let Some(addr) = addr {
            out.extend_from_slice(&[0xc0, 12]); // the name: a pointer to the question's
            out.extend_from_slice(&TYPE_A.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
            out.extend_from_slice(&TTL.to_be_bytes());
            out.extend_from_slice(&4u16.to_be_bytes());
            out.extend_from_slice(&addr.octets());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    fn a_record(resp: &[u8]) -> Option<Ipv4Addr> {
        let an = u16::from_be_bytes([resp[6], resp[7]]);
        (an == 1).then(|| {
            let o = &resp[resp.len() - 4..];
            Ipv4Addr::new(o[0], o[1], o[2], o[3])
        })
    }

    #[test]
    fn names_get_stable_private_addresses_that_map_back() {
        let mut map = FakeAddrs::default();
        let r = answer(&query("API.Anthropic.com", TYPE_A), &mut map).unwrap();
        assert_eq!(&r[..2], &[0x12, 0x34], "same ID");
        assert_eq!(r[3] & 0x0f, 0, "NOERROR");
        let ip = a_record(&r).unwrap();
        assert!(FakeAddrs::in_range(ip), "{ip}");
        assert_eq!(map.name_of(ip).as_deref(), Some("api.anthropic.com"));
        let again = a_record(&answer(&query("api.anthropic.com", TYPE_A), &mut map).unwrap());
        assert_eq!(again, Some(ip));
        let other = a_record(&answer(&query("github.com", TYPE_A), &mut map).unwrap()).unwrap();
        assert_ne!(other, ip);
    }

    #[test]
    fn aaaa_and_other_types_get_no_records() {
        let mut map = FakeAddrs::default();
        for qtype in [28u16, 65, 16] {
            let r = answer(&query("api.anthropic.com", qtype), &mut map).unwrap();
            assert_eq!(r[3] & 0x0f, 0);
            assert_eq!(a_record(&r), None);
        }
    }

    #[test]
    fn malformed_queries_get_formerr_or_nothing() {
        let mut map = FakeAddrs::default();
        assert!(answer(b"\x00\x01", &mut map).is_none());
        let mut compressed = query("a.example", TYPE_A);
        compressed[12] = 0xc0;
        assert_eq!(answer(&compressed, &mut map).unwrap()[3] & 0x0f, RCODE_FORMERR);
        let mut response = query("a.example", TYPE_A);
        response[2] |= 0x80;
        assert!(answer(&response, &mut map).is_none());
        let r = answer(&query("bad name.example", TYPE_A), &mut map).unwrap();
        assert_eq!(r[3] & 0x0f, RCODE_NXDOMAIN);
        let r = answer(&query("127.0.0.1", TYPE_A), &mut map).unwrap();
        assert_eq!(r[3] & 0x0f, RCODE_NXDOMAIN, "an IP is not a name to map");
    }

    #[test]
    fn the_map_is_bounded_and_never_reuses_a_live_address() {
        let mut map = FakeAddrs::with_capacity(4);
        let first = map.address_for("a.example");
        for i in 0..10 {
            map.address_for(&format!("n{i}.example"));
        }
        assert_eq!(map.len(), 4);
        assert_eq!(map.name_of(first), None, "evicted");
        let live: Vec<Ipv4Addr> = (6..10).map(|i| map.address_for(&format!("n{i}.example"))).collect();
        let mut unique = live.clone();
        unique.dedup();
        assert_eq!(unique.len(), 4);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_get_a_well_formed_answer_or_none(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut map = FakeAddrs::with_capacity(8);
            crate::fuzzing::dns(&bytes);
            if let Some(r) = answer(&bytes, &mut map) {
                proptest::prop_assert!(r.len() >= 12);
                proptest::prop_assert_eq!(&r[..2], &bytes[..2]);
            }
        }
    }
}
