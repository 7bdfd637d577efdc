//! Credential injection through the real binary with real clients (curl, Python requests).

mod common;
use common::*;

const ANTHROPIC: &str = r#"
[credentials.anthropic]
header = ["x-api-key", "Authorization: Bearer"]
value = "${ANTHROPIC_API_KEY}"
domains = ["api.anthropic.com"]
"#;

#[test]
fn curl_gets_the_real_key_injected() {
    let up = upstream(true, None);
    let lk = Latchkey::start(Some(&up), ANTHROPIC, &[("ANTHROPIC_API_KEY", "sk-ant-REAL")]);
    let (status, body) = lk.curl(&["-H", "x-api-key: latchkey-anthropic", "https://api.anthropic.com/v1/messages"]);
    assert_eq!(status, 200, "{body}\n{}", lk.stderr());
    assert_eq!(echoed(&body, "x-api-key"), ["sk-ant-REAL"]);
    assert!(echoed(&body, "authorization").is_empty());
    assert_eq!(echoed(&body, "host"), ["api.anthropic.com"]);
}
