"""The live view in a real browser (headless Chromium, Debian's, driven by Playwright).

Run by tests/live_view.rs against a running latchkey: log in, see a request made by
curl appear in the table within 1 s, approve a held request with scope "always" and
watch the waiting curl complete with 200 and the host land in approvals.toml, deny
another and see curl get 403 with the relayable message, filter by agent. Saves
screenshots (dark and light) into the directory given.

argv: ADMIN_URL TOKEN_FILE PROXY_PORT BUNDLE APPROVALS_TOML SCREENSHOT_DIR
"""

import subprocess
import sys
import threading
import time

from playwright.sync_api import expect, sync_playwright

admin, token_file, proxy_port, bundle, approvals_toml, shots = sys.argv[1:7]
token = open(token_file).read().strip()


def proxy(agent):
    return f"http://{agent}:{agent}-token-123@127.0.0.1:{proxy_port}"


def curl(agent, url, result=None):
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}", "-x", proxy(agent), "--cacert", bundle, url],
        capture_output=True, text=True)
    body, _, code = out.stdout.rpartition("\n")
    if not code or code == "000":
        body += out.stderr
    if result is not None:
        result.extend([int(code or 0), body])
    return int(code or 0), body


def background(agent, url):
    result = []
    t = threading.Thread(target=curl, args=(agent, url, result))
    t.start()
    return t, result


with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1360, "height": 820}, color_scheme="dark")
    page.goto(admin)

    # Log in.
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#status")).to_have_text("live", timeout=5000)

    # A request made by curl appears within 1 s of its end.
    code, body = curl("alice", "https://api.github.com/repos/latchkey")
    assert code == 200, (code, body)
    expect(page.locator("#requests tbody tr", has_text="api.github.com").first).to_be_visible(timeout=1000)
    curl("bob", "https://api.github.com/user")
    curl("bob", "https://evil.example.net/blocked")  # blocked_domains: shown with its reason

    # A held request, approved in the view with scope "always".
    held, result = background("alice", "https://api.example.com/v1/models")
    card = page.locator(".approval[data-host='api.example.com']")
    expect(card).to_be_visible(timeout=10000)
    page.screenshot(path=f"{shots}/live-view-approval.png")
    card.locator("button[data-action=allow-always]").click()
    held.join(30)
    assert result and result[0] == 200, result
    expect(card).to_have_count(0, timeout=5000)
    text = open(approvals_toml).read()
    assert 'host = "api.example.com"' in text, text

    # Another, denied: curl gets 403 with the message written for the model.
    held, result = background("bob", "http://other.example.com/x")
    card = page.locator(".approval[data-host='other.example.com']")
    expect(card).to_be_visible(timeout=10000)
    card.locator("button[data-action=deny-once]").click()
    held.join(30)
    assert result and result[0] == 403, result
    assert "other.example.com is not allowed by the user's egress policy (denied); ask the user to allow it with latchkey approvals or the web view" in result[1], result
    expect(page.locator("#requests tbody tr", has_text="not allowed by the user").first).to_be_visible(timeout=2000)

    # Filter by agent.
    page.select_option("#f-agent", "bob")
    rows = page.locator("#requests tbody tr")
    expect(rows.first).to_be_visible()
    assert rows.count() > 0
    for agent in rows.evaluate_all("rs => rs.map(r => r.dataset.agent)"):
        assert agent == "bob", agent
    page.select_option("#f-agent", "")
    page.screenshot(path=f"{shots}/live-view-dark.png")

    light = browser.new_page(viewport={"width": 1360, "height": 820}, color_scheme="light")
    light.goto(admin)
    # The session cookie is the browser context's: a new page in another context logs in again.
    light.fill("#token", token)
    light.click("#login-form button[type=submit]")
    expect(light.locator("#status")).to_have_text("live", timeout=5000)
    for agent, url in [("alice", "https://api.github.com/repos/latchkey/issues"), ("bob", "https://api.example.com/v1/messages")]:
        curl(agent, url)
    expect(light.locator("#requests tbody tr").first).to_be_visible(timeout=2000)
    light.screenshot(path=f"{shots}/live-view-light.png")
    browser.close()
print("ok")
