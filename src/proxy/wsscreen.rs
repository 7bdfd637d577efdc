//! Client-to-server WebSocket frames under `[proxy.dlp]`: every data message is held
//! until its last fragment (up to `wsframes::MAX_MESSAGE`), unmasked, scanned across its
//! fragments as one text, and then — unless the policy refuses it — re-masked with each
//! frame's own key and sent on (with `redact`, the secret's bytes masked first, same
//! length). Control frames are scanned on their own. A refused message never reaches
//! the upstream: the connection ends there. A frame latchkey cannot read (unmasked,
//! RSV bits, reserved opcode...) ends the connection too: nothing passes unscanned.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::wsframes::{Header, MAX_MESSAGE, header};
use crate::config::Config;
use crate::dlp::{Hit, Settings};
use crate::policy::{Destination, DlpVerdict};
use crate::redact::Set;

/// What scanning a WebSocket's client side needs.
pub struct WsScreen {
    pub dlp: Arc<Settings>,
    pub own: Option<Set>,
    pub config: Arc<Config>,
    pub dest: Destination,
}

fn failed(why: impl Into<String>) -> std::io::Error {
    std::io::Error::other(why.into())
}

fn refuse(h: &Header, in_message: bool, size: u64) -> Option<&'static str> {
    let control = h.opcode >= 8;
    match h.opcode {
        _ if !h.masked => Some("an unmasked frame from the client"),
        _ if h.rsv => Some("RSV bits set, but no extension was negotiated"),
        3..=7 | 11..=15 => Some("a reserved opcode"),
        _ if control && (!h.fin || h.payload > 125) => Some("a fragmented or oversized control frame"),
        0 if !in_message => Some("a continuation frame outside a message"),
        1 | 2 if in_message => Some("a new message inside a fragmented one"),
        _ if !control && size.saturating_add(h.payload) > MAX_MESSAGE => {
            Some("a message too large to scan for secrets")
        }
        _ => None,
    }
}

/// Copy client frames from `from` to `to`, scanning every message.
pub async fn screen<R, W>(mut from: R, mut to: W, s: WsScreen) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut message: Vec<(BytesMut, usize)> = Vec::new();
    let mut size = 0u64;
    loop {
        let Some(h) = header(&buf) else {
            if from.read_buf(&mut buf).await? == 0 {
                return to.shutdown().await;
            }
            continue;
        };
        if let Some(why) = refuse(&h, !message.is_empty(), size) {
            return Err(failed(format!("WebSocket connection failed: {why}")));
        }
        let total = h.len + h.payload as usize;
        while buf.len() < total {
            if from.read_buf(&mut buf).await? == 0 {
                return to.shutdown().await;
            }
        }
        let frame = buf.split_to(total);
        if h.opcode >= 8 {
            let mut one = [(frame, h.len)];
            s.message(&mut one)?;
            to.write_all(&one[0].0).await?;
            continue;
        }
        size += h.payload;
        message.push((frame, h.len));
        if h.fin {
            s.message(&mut message)?;
            for (f, _) in message.drain(..) {
                to.write_all(&f).await?;
            }
            size = 0;
        }
    }
}

/// XOR a payload with its frame's masking key.
fn unmask(payload: &mut [u8], key: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

impl WsScreen {
    /// Scan a message's frames (each: the frame and its header length) as one text;
    /// masks what `redact` masks; `Err` when the policy refuses the message.
    fn message(&self, frames: &mut [(BytesMut, usize)]) -> std::io::Result<()> {
        let key =
            |f: &BytesMut, hlen: usize| -> [u8; 4] { [f[hlen - 4], f[hlen - 3], f[hlen - 2], f[hlen - 1]] };
        let mut text = Vec::new();
        for (f, hlen) in frames.iter() {
            let mut p = f[*hlen..].to_vec();
            unmask(&mut p, key(f, *hlen));
            text.extend_from_slice(&p);
        }
        let found = self.dlp.scanner.scan(&text, self.own.as_ref());
        if found.is_empty() {
            return Ok(());
        }
        let policy = &self.config.policy.dlp;
        let ids = &self.dlp.scanner.ids;
        let counted: Vec<&Hit> =
            found.hits.iter().filter(|h| !policy.allowed(&ids[h.rule], &self.dest)).collect();
        let names: Vec<&str> = counted.iter().map(|h| &*ids[h.rule]).collect();
        let summary = crate::dlp::summary(ids, &found, |_| true);
        let rules: Vec<String> = summary.iter().map(|(id, n)| format!("{id}:{n}")).collect();
        let verdict = policy.verdict(&self.dest, found.own, &names);
        tracing::warn!(target: "latchkey::dlp", dest = %self.dest, rules = %rules.join(","), "outbound secret in a WebSocket message");
        match verdict {
            DlpVerdict::Block(r) => Err(failed(format!("WebSocket message refused: {}", r.message))),
            DlpVerdict::Warn | DlpVerdict::Forward => Ok(()),
            DlpVerdict::Redact => {
                let keep = |h: &Hit| !policy.allowed(&ids[h.rule], &self.dest);
                self.dlp.scanner.mask_all(&mut text, &counted, keep);
                let mut at = 0;
                for (f, hlen) in frames.iter_mut() {
                    let k = key(f, *hlen);
                    let n = f.len() - *hlen;
                    let mut p = text[at..at + n].to_vec();
                    unmask(&mut p, k);
                    f[*hlen..].copy_from_slice(&p);
                    at += n;
                }
                Ok(())
            }
        }
    }
}
