//! One decision: the proxy and `latchkey explain` ask the same function, so they agree.
//! Random requests — agent, scheme, host, method, path, headers — go through the real
//! binary (curl, as that agent) and through `latchkey explain --json` with the same
//! config and agent; the decision in the request log and the one explain prints must
//! be the same every time.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};

const SECRET: &str = "sk-ant-decision-REAL-0123456789";

/// Credentials that can each be kept off a request in a different way (paths and
/// except_paths, methods, a required placeholder, plain HTTP), agents that narrow them,
/// and filters.
fn config(log: &std::path::Path) -> String {
    format!(
        r#"[proxy.logging]
log_requests = true
log_file = "{}"
[proxy.filters]
blocked_domains = ["evil.example.net"]
#END-PROXY
[credentials.anthropic]
header = ["x-api-key", "Authorization: Bearer"]
value = "${{ANTHROPIC_API_KEY}}"
domains = ["api.anthropic.com"]
paths = ["/v1"]

[credentials.gh]
auth_type = "bearer"
value = "gh-REAL-token"
domains = ["api.github.com"]
except_paths = ["/user/keys"]

[credentials.scoped]
header = "x-key"
value = "scoped-REAL-key"
domains = ["api.example.com"]
methods = ["GET"]
require_placeholder = true
allow_http = true

[agents.alice]
token = "alice-token"
credentials = ["anthropic", "scoped"]
allowed_domains = ["api.anthropic.com", "api.example.com", "other.example.com", "evil.example.net"]

[agents.bob]
token = "bob-token"
"#,
        log.display()
    )
}

#[derive(Debug, Clone)]
struct Case {
    agent: Option<&'static str>,
    url: String,
    method: &'static str,
    headers: Vec<&'static str>,
}

fn cases() -> impl Strategy<Value = Case> {
    let agent = prop::sample::select(vec![Some("alice"), Some("bob"), None]);
    let scheme = prop::sample::select(vec!["https", "http"]);
    let host = prop::sample::select(vec![
        "api.anthropic.com",
        "api.github.com",
        "api.example.com",
        "other.example.com",
        "evil.example.net",
    ]);
    let path = prop::sample::select(vec!["/", "/v1/messages", "/user/keys", "/user", "/v1beta"]);
    let method = prop::sample::select(vec!["GET", "POST", "DELETE", "TRACE", "trace", "get"]);
    let header = prop::sample::select(vec![
        "Origin: https://evil.example",
        "X-HTTP-Method-Override: TRACE",
        "X-HTTP-Method-Override: DELETE",
        "x-key: latchkey-scoped",
        "x-api-key: placeholder",
    ]);
    let headers = prop::collection::vec(header, 0..3);
    (agent, scheme, host, path, method, headers).prop_map(|(agent, scheme, host, path, method, headers)| {
        Case { agent, url: format!("{scheme}://{host}{path}"), method, headers }
    })
}

/// The decision the proxy logged for one request made as `case` says.
fn through_the_proxy(lk: &Latchkey, log: &std::path::Path, case: &Case) -> String {
    let before = log_lines(log).len();
    let proxy = match case.agent {
        Some(a) => format!("http://{a}:{a}-token@127.0.0.1:{}", lk.port),
        None => lk.proxy_url(),
    };
    let mut curl = Command::new("curl");
    curl.args([
        "-s",
        "-k",
        "--http1.1",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-x",
        &proxy,
        "-X",
        case.method,
    ]);
    for h in &case.headers {
        curl.args(["-H", h]);
    }
    let out = curl.arg(&case.url).output().expect("curl");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = log_lines(log);
        if lines.len() > before {
            assert_eq!(lines.len(), before + 1, "one request, one line: {lines:?}");
            return lines[before]["decision"].as_str().unwrap_or("?").to_string();
        }
        assert!(Instant::now() < deadline, "no log line for {case:?}: curl {out:?}\n{}", lk.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What `latchkey explain --json` says of the same request.
fn explained(lk: &Latchkey, case: &Case) -> (String, String) {
    let mut args = vec!["explain", "--json", "--method", case.method];
    if let Some(a) = case.agent {
        args.extend(["--agent", a]);
    }
    for h in &case.headers {
        args.extend(["--header", h]);
    }
    args.push(&case.url);
    let o = lk.cli(&args, &[]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{case:?}: {text}{}", String::from_utf8_lossy(&o.stderr));
    let v = json(&text);
    assert_eq!(v["described"], "running", "explain asks the running instance: {v}");
    (v["decision"].as_str().unwrap_or("?").to_string(), v["reason"].as_str().unwrap_or("").to_string())
}

fn log_lines(log: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

#[test]
fn explain_decides_every_request_as_the_proxy_does() {
    let (up, plain) = (upstream(true, None), upstream(false, None));
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("requests.log");
    let lk = Latchkey::start_plain(&up, &plain, &config(&log), &[("ANTHROPIC_API_KEY", SECRET)]);
    let logged_as = |explained: &str| match explained {
        "inject" => "injected",
        "pass" => "passed",
        "tunnel" => "tunnelled",
        "block" => "blocked",
        other => panic!("explain said {other:?}"),
    };
    let seen = std::cell::RefCell::new(std::collections::BTreeSet::new());
    let agree = |case: Case| {
        let proxy = through_the_proxy(&lk, &log, &case);
        let (explain, reason) = explained(&lk, &case);
        seen.borrow_mut().insert(proxy.clone());
        if proxy != logged_as(&explain) {
            return Err(TestCaseError::fail(format!(
                "{case:?}: the proxy logged {proxy}, explain said {explain} ({reason})"
            )));
        }
        Ok(())
    };
    // A few requests that reach every decision, whatever the random ones do.
    for (agent, method, url, headers) in [
        (Some("bob"), "GET", "https://api.anthropic.com/v1/messages", vec![]),
        (Some("bob"), "GET", "https://other.example.com/", vec![]),
        (Some("bob"), "GET", "http://other.example.com/", vec![]),
        (Some("bob"), "GET", "https://evil.example.net/", vec![]),
        (Some("alice"), "GET", "https://api.github.com/user", vec![]),
        (Some("bob"), "GET", "https://api.github.com/user/keys", vec![]),
        (Some("bob"), "TRACE", "https://api.anthropic.com/v1/x", vec![]),
        (Some("alice"), "GET", "http://api.example.com/", vec!["x-key: latchkey-scoped"]),
        (Some("alice"), "GET", "http://api.example.com/", vec![]),
        (Some("bob"), "POST", "https://api.anthropic.com/v1/x", vec!["Origin: https://evil.example"]),
        (None, "GET", "https://api.anthropic.com/v1/x", vec![]),
    ] {
        let case = Case { agent, url: url.to_string(), method, headers };
        if let Err(e) = agree(case) {
            panic!("{e}\n{}", lk.stderr());
        }
    }
    let mut runner =
        TestRunner::new(RunnerConfig { cases: 40, failure_persistence: None, ..RunnerConfig::default() });
    if let Err(e) = runner.run(&cases(), agree) {
        panic!("{e}\n{}", lk.stderr());
    }
    let seen = seen.into_inner();
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["blocked", "injected", "passed", "tunnelled"]);
}
