//! An exchange being recorded: its record, span, LLM-usage meter and captured body,
//! filled in as the response streams and written out once, when the response body ends
//! (or is dropped).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::otlp::Span;
use super::record::Record;
use super::usage::Meter;
use super::{Telemetry, all_redactors};
use crate::config::Config;

pub struct Pending {
    pub telemetry: Arc<Telemetry>,
    pub record: Record,
    /// Request body bytes sent upstream (counted by the request body, elsewhere); none
    /// made for a request without a body.
    pub up: Option<Arc<AtomicU64>>,
    /// Response body bytes passed to the client.
    pub down: u64,
    pub started: Instant,
    /// Time to the upstream's response head.
    pub upstream: Option<Duration>,
    /// Reads LLM token usage from the (redacted) body as it passes.
    pub meter: Option<Meter>,
    pub span: Option<Span>,
    /// Up to this many redacted body bytes go on the span.
    pub capture: Option<(usize, Vec<u8>)>,
    /// Where every credential's redactor is found when something read out of the
    /// response (a captured body, a model name) is about to leave latchkey.
    pub config: Arc<Config>,
}

impl Pending {
    /// Response body bytes on their way to the client.
    pub fn saw(&mut self, data: &[u8]) {
        self.down += data.len() as u64;
        if let Some(m) = &mut self.meter {
            m.feed(data);
        }
        if let Some((cap, buf)) = &mut self.capture {
            let room = cap.saturating_sub(buf.len());
            buf.extend_from_slice(&data[..room.min(data.len())]);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.record.bytes_up = self.up.as_ref().map_or(0, |up| up.load(Ordering::Relaxed));
        self.record.bytes_down = self.down;
        self.record.duration_ms = self.started.elapsed().as_millis() as u64;
        let usage = self.meter.take().and_then(Meter::finish);
        let read_out = self.capture.is_some() || usage.as_ref().is_some_and(|u| u.model.is_some());
        // Masked again here: with `redact_responses = false` (or a form the body redactor
        // does not know) the client saw raw bytes, but no log, label or span carries them.
        let redactors = if read_out { all_redactors(&self.config) } else { Vec::new() };
        self.record.usage = usage.map(|u| u.redacted(&redactors));
        let mut span = self.span.take();
        if let (Some(s), Some((cap, mut body))) = (&mut span, self.capture.take()) {
            let cut_short = body.len() >= cap;
            for r in &redactors {
                r.mask(&mut body);
                // A form cut off by the capture limit: its start is not exported either.
                if cut_short {
                    let cut = r.holdback(&body);
                    body.truncate(body.len() - cut);
                }
            }
            s.str("latchkey.response.body", String::from_utf8_lossy(&body));
        }
        self.telemetry.finish(&self.record, self.upstream, span);
    }
}
