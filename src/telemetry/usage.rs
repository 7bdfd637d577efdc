//! LLM token usage, read from credentialed responses as they stream past: Anthropic
//! and OpenAI shapes, JSON bodies and SSE streams. Nothing is held back from the client,
//! and the meter's memory is bounded per response: SSE is read line by line (a line
//! longer than `MAX_LINE` is skipped); of a JSON body only the first `HEAD` and last
//! `TAIL` bytes are kept — where `model` and `usage` sit in these APIs' answers.

use serde::Serialize;
use serde_json::Value;

/// Token counts and model of one response (`gen_ai.usage.*` in the span).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub model: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.input_tokens.unwrap_or(0) + self.output_tokens.unwrap_or(0)
    }

    /// What may leave latchkey of a decoded response value (invariant 5): the model name
    /// with every live secret masked, and `other` unless it then looks like a model name
    /// — an upstream, or an agent it echoes, decides what this string is.
    pub fn redacted(mut self, redactors: &[std::sync::Arc<crate::redact::Redactor>]) -> Usage {
        if let Some(model) = self.model.take() {
            let mut bytes = model.into_bytes();
            let masked: usize = redactors.iter().map(|r| r.mask(&mut bytes)).sum();
            let plausible = masked == 0 && is_model_name(&bytes);
            self.model =
                Some(if plausible { String::from_utf8_lossy(&bytes).into_owned() } else { "other".into() });
        }
        self
    }

    /// Take what one JSON object says. Anthropic streams put input tokens in
    /// `message_start.message.usage` and the final output count in the last
    /// `message_delta.usage`; OpenAI puts `usage` (prompt/completion, or input/output for
    /// the Responses API) at the top level or under `response`. Later values win.
    fn absorb(&mut self, v: &Value) {
        for obj in [Some(v), v.get("message"), v.get("response")].into_iter().flatten() {
            if self.model.is_none()
                && let Some(m) = obj.get("model").and_then(Value::as_str)
            {
                self.model = Some(m.chars().take(200).collect());
            }
            let Some(u) = obj.get("usage").filter(|u| u.is_object()) else { continue };
            let count = |keys: [&str; 2]| keys.iter().find_map(|k| u.get(*k).and_then(Value::as_u64));
            if let Some(n) = count(["input_tokens", "prompt_tokens"]) {
                self.input_tokens = Some(n);
            }
            if let Some(n) = count(["output_tokens", "completion_tokens"]) {
                self.output_tokens = Some(n);
            }
        }
    }
}

/// Model names as providers write them: `claude-sonnet-4-5`, `gpt-4o-2024-08-06`,
/// `models/gemini-2.5-pro`, `anthropic.claude-3-haiku-20240307-v1:0`, `meta-llama/Llama-3-8b`.
fn is_model_name(s: &[u8]) -> bool {
    (1..=128).contains(&s.len()) && s.iter().all(|b| b.is_ascii_alphanumeric() || b"-._:/@+".contains(b))
}

/// Longest SSE line looked at (usage events are small).
const MAX_LINE: usize = 256 << 10;
/// What is kept of a JSON body: its start and its end.
const HEAD: usize = 4 << 10;
const TAIL: usize = 64 << 10;

enum Kind {
    Sse { line: Vec<u8> },
    Json { head: Vec<u8>, tail: std::collections::VecDeque<u8>, total: usize },
}

pub struct Meter {
    kind: Kind,
    usage: Usage,
    overflow: bool,
}

impl Meter {
    /// A meter for a response of this content type, if it is one that can carry usage.
    pub fn for_content_type(content_type: &str) -> Option<Meter> {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        let kind = if essence.eq_ignore_ascii_case("text/event-stream") {
            Kind::Sse { line: Vec::new() }
        } else if essence.eq_ignore_ascii_case("application/json") {
            Kind::Json { head: Vec::new(), tail: Default::default(), total: 0 }
        } else {
            return None;
        };
        Some(Meter { kind, usage: Usage::default(), overflow: false })
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        match &mut self.kind {
            Kind::Json { head, tail, total } => {
                *total += data.len();
                let into_head = (HEAD - head.len().min(HEAD)).min(data.len());
                head.extend_from_slice(&data[..into_head]);
                let rest = &data[into_head..];
                let keep = rest.len().min(TAIL);
                tail.extend(&rest[rest.len() - keep..]);
                let excess = tail.len().saturating_sub(TAIL);
                tail.drain(..excess);
            }
            Kind::Sse { line } => {
                while let Some(nl) = data.iter().position(|&b| b == b'\n') {
                    if !self.overflow {
                        line.extend_from_slice(&data[..nl]);
                        sse_line(line, &mut self.usage);
                    }
                    self.overflow = false;
                    line.clear();
                    data = &data[nl + 1..];
                }
                if line.len() + data.len() > MAX_LINE {
                    self.overflow = true;
                    line.clear();
                } else if !self.overflow {
                    line.extend_from_slice(data);
                }
            }
        }
    }

    /// The usage seen, if the response reported any.
    pub fn finish(mut self) -> Option<Usage> {
        match &mut self.kind {
            Kind::Json { head, tail, total } => {
                let tail: Vec<u8> = tail.iter().copied().collect();
                if *total == head.len() + tail.len() {
                    head.extend_from_slice(&tail);
                    if let Ok(v) = serde_json::from_slice::<Value>(head) {
                        self.usage.absorb(&v);
                    }
                } else {
                    // Too long to keep whole: the `usage` object from the end, the
                    // `model` string from the start.
                    if let Some(v) = value_after_key(&tail, b"\"usage\"") {
                        self.usage.absorb(&serde_json::json!({ "usage": v }));
                    }
                    if let Some(Value::String(m)) = value_after_key(head, b"\"model\"") {
                        self.usage.model = Some(m.chars().take(200).collect());
                    }
                }
            }
            Kind::Sse { line } if !self.overflow => sse_line(line, &mut self.usage),
            _ => {}
        }
        let u = self.usage;
        (u.input_tokens.is_some() || u.output_tokens.is_some()).then_some(u)
    }
}

/// The JSON value after the last `key":` in `buf`, if it parses.
fn value_after_key(buf: &[u8], key: &[u8]) -> Option<Value> {
    let at = buf.windows(key.len()).rposition(|w| w == key)? + key.len();
    let rest = &buf[at..];
    let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    if rest[colon] != b':' {
        return None;
    }
    serde_json::Deserializer::from_slice(&rest[colon + 1..]).into_iter::<Value>().next()?.ok()
}

fn sse_line(line: &[u8], usage: &mut Usage) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else { return };
    let data = data.strip_prefix(b" ").unwrap_or(data);
    if data.first() == Some(&b'{')
        && let Ok(v) = serde_json::from_slice::<Value>(data)
    {
        usage.absorb(&v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of an Anthropic Messages stream (docs.anthropic.com, "Streaming Messages").
    pub const ANTHROPIC_SSE: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: ping\n\
data: {\"type\": \"ping\"}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

    pub const OPENAI_JSON: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29}}"#;

    fn run(ct: &str, body: &str, chunk: usize) -> Option<Usage> {
        let mut m = Meter::for_content_type(ct)?;
        for c in body.as_bytes().chunks(chunk.max(1)) {
            m.feed(c);
        }
        m.finish()
    }

    #[test]
    fn anthropic_stream_is_exact_at_any_chunking() {
        for chunk in [1, 3, 7, 64, 10_000] {
            let u = run("text/event-stream; charset=utf-8", ANTHROPIC_SSE, chunk).unwrap();
            assert_eq!(u.input_tokens, Some(25), "chunk {chunk}");
            assert_eq!(u.output_tokens, Some(15));
            assert_eq!(u.model.as_deref(), Some("claude-sonnet-4-5"));
        }
    }

    #[test]
    fn openai_json_and_stream_with_usage() {
        let u = run("application/json", OPENAI_JSON, 5).unwrap();
        assert_eq!((u.input_tokens, u.output_tokens, u.total()), (Some(19), Some(10), 29));
        assert_eq!(u.model.as_deref(), Some("gpt-4o-2024-08-06"));
        let stream = "data: {\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
                      data: {\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n\
                      data: [DONE]\n\n";
        let u = run("text/event-stream", stream, 4).unwrap();
        assert_eq!((u.input_tokens, u.output_tokens), (Some(7), Some(3)));
    }

    #[test]
    fn a_long_json_body_is_read_from_its_ends_in_bounded_memory() {
        let filler = "x".repeat(300_000);
        let body = format!(
            r#"{{"id":"1","model":"gpt-4o","choices":[{{"message":{{"content":"{filler}"}}}}],"usage":{{"prompt_tokens":1234,"completion_tokens":5678}}}}"#
        );
        let mut m = Meter::for_content_type("application/json").unwrap();
        for c in body.as_bytes().chunks(1000) {
            m.feed(c);
            if let Kind::Json { head, tail, .. } = &m.kind {
                assert!(head.len() <= HEAD && tail.len() <= TAIL);
            }
        }
        let u = m.finish().unwrap();
        assert_eq!((u.input_tokens, u.output_tokens), (Some(1234), Some(5678)));
        assert_eq!(u.model.as_deref(), Some("gpt-4o"));
    }

    #[test]
    fn model_names_are_masked_after_decoding_and_must_look_like_one() {
        use crate::secrets::Secret;
        let secret = "scoped-REALsecret-0123456789";
        let r = std::sync::Arc::new(crate::redact::Redactor::new(&[Secret::new(secret.into())]).unwrap());
        let escaped = secret.replacen('p', "\\u0070", 1);
        let body = format!(r#"{{"model":"{escaped}","usage":{{"input_tokens":1,"output_tokens":2}}}}"#);
        let u = run("application/json", &body, 7).unwrap();
        assert_eq!(u.model.as_deref(), Some(secret), "the meter decodes JSON");
        assert_eq!(u.redacted(std::slice::from_ref(&r)).model.as_deref(), Some("other"));
        let named = |m: &str| {
            Usage { model: Some(m.into()), ..Default::default() }.redacted(std::slice::from_ref(&r)).model
        };
        assert_eq!(named("claude-sonnet-4-5").as_deref(), Some("claude-sonnet-4-5"));
        assert_eq!(
            named("anthropic.claude-3-haiku-20240307-v1:0").as_deref(),
            Some("anthropic.claude-3-haiku-20240307-v1:0")
        );
        for odd in ["", "a b", "x\"}", "<script>", &"m".repeat(129)] {
            assert_eq!(named(odd).as_deref(), Some("other"), "{odd:?}");
        }
    }

    #[test]
    fn responses_without_usage_or_of_other_types_report_nothing() {
        assert_eq!(run("application/json", r#"{"ok":true}"#, 3), None);
        assert_eq!(run("text/html", OPENAI_JSON, 3), None);
        assert_eq!(run("application/json", "{not json", 3), None);
    }
}
