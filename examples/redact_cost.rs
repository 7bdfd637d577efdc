//! Instruction count of response redaction on a 1 MiB body, for callgrind (no clocks):
//!
//!     cargo build --release --example redact_cost
//!     valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!         target/release/examples/redact_cost KIND MIB
//!
//! KIND: `x` (one byte repeated: the longest hold-back), `random` (a binary download),
//! `json` (ASCII JSON lines), `escaped` (JSON whose text is all `\uXXXX`). The body is
//! pushed through `redact::Stream` in 16 KiB chunks MIB times; run with MIB = 0 for the
//! fixed cost and subtract.

use std::sync::Arc;

use latchkey::redact::{Redactor, Set, Stream};
use latchkey::secrets::Secret;

fn body(kind: &str) -> Vec<u8> {
    const MIB: usize = 1 << 20;
    match kind {
        "x" => vec![b'x'; MIB],
        "random" => {
            let mut state = 0x2545_f491_4f6c_dd1du64;
            (0..MIB)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect()
        }
        "json" => {
            let line =
                b"{\"id\":12345,\"text\":\"The quick brown fox jumps over the lazy dog.\",\"ok\":true}\n";
            line.iter().copied().cycle().take(MIB).collect()
        }
        "escaped" => {
            let line = b"{\"text\":\"\\u4f60\\u597d\\u4e16\\u754c\\u3002\\u4f60\\u597d\"}\n";
            line.iter().copied().cycle().take(MIB).collect()
        }
        other => panic!("unknown kind {other}"),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let kind = args.next().unwrap_or_else(|| "x".into());
    let times: usize = args.next().map(|n| n.parse().unwrap()).unwrap_or(1);
    let body = bytes::Bytes::from(body(&kind));
    let secret = Secret::new("sk-ant-api03-REALsecretVALUE_0123456789abcdefghij".into());
    let set = Set::new(vec![Arc::new(Redactor::new(&[secret]).unwrap())]).unwrap();
    let mut out = 0;
    for _ in 0..times {
        let mut stream = Stream::new(set.clone());
        for at in (0..body.len()).step_by(16 * 1024) {
            let (first, then) = stream.push(body.slice(at..body.len().min(at + 16 * 1024)));
            out += first.len() + then.map_or(0, |t| t.len());
        }
        out += stream.finish().len();
    }
    assert_eq!(out, body.len() * times);
}
