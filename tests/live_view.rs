//! The live view in headless Chromium (Debian's `chromium`, driven by Playwright from
//! PyPI with `executable_path=/usr/bin/chromium`; no browser download): the steps are in
//! tests/py/live_view.py. `LATCHKEY_SCREENSHOTS=1` writes its screenshots to docs/img/.

mod common;
use common::*;

use std::path::Path;
use std::time::{Duration, Instant};

/// Every host intercepted, so curl (trusting latchkey's CA) reaches the test upstream.
const CFG: &str = r#"intercept = "all"
#END-PROXY
[proxy.filters]
allowlist_only = true
on_unlisted = "ask"
allowed_domains = ["api.github.com", "evil.example.net"]
blocked_domains = ["evil.example.net"]

[credentials.github]
auth_type = "bearer"
value = "${GITHUB_TOKEN}"
domains = ["api.github.com"]
requests_per_minute = 60
tokens_per_day = 200000

[agents.alice]
token = "alice-token-123"

[agents.bob]
token = "bob-token-123"
"#;

#[test]
fn the_live_view_in_a_real_browser() {
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "this test needs Debian's chromium at /usr/bin/chromium (apt-get install chromium; scripts/test.sh does)"
    );
    let probe = std::process::Command::new("python3").args(["-c", "import playwright"]).output().unwrap();
    assert!(
        probe.status.success(),
        "this test needs Playwright for Python (pip install playwright; scripts/test.sh does)"
    );
    let up = upstream(true, None);
    let plain = upstream(false, None);
    let admin = free_port();
    let body = format!("{CFG}\n[admin]\nlisten = \"127.0.0.1:{admin}\"\nui = true\n");
    let lk = Latchkey::start_plain(&up, &plain, &body, &[("GITHUB_TOKEN", "ghp_live_view_test_0123456789")]);
    let token = lk.dir.path().join("admin.token");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !token.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Screenshots: into docs/img/ when asked (LATCHKEY_SCREENSHOTS=1), so an ordinary
    // run leaves the committed ones alone; else beside the test's latchkey.
    let shots = match std::env::var_os("LATCHKEY_SCREENSHOTS") {
        Some(_) => Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/img"),
        None => lk.dir.path().join("screenshots"),
    };
    std::fs::create_dir_all(&shots).unwrap();
    let out = py("live_view.py")
        .arg(format!("http://127.0.0.1:{admin}/"))
        .arg(&token)
        .arg(lk.port.to_string())
        .arg(lk.bundle())
        .arg(lk.dir.path().join("approvals.toml"))
        .arg(&shots)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}\nlatchkey: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        lk.stderr()
    );
}
