// latchkey's live view: plain JavaScript, no build step, no dependency. It reads the
// admin API with the session cookie set by the login, and sends the CSRF token with
// every change. It never sees a secret value: the API has none to give.
"use strict";

const MAX_ROWS = 500;
const state = { csrf: null, rows: [], credentials: [], usage: null, filters: {}, agents: new Set(), creds: new Set(), source: null };
const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}

async function api(path, options = {}) {
  const headers = Object.assign({ "Content-Type": "application/json" }, options.headers || {});
  if (options.method && options.method !== "GET" && state.csrf) headers["X-CSRF-Token"] = state.csrf;
  const resp = await fetch(path, Object.assign({ credentials: "same-origin" }, options, { headers }));
  if (resp.status === 401) { showLogin(); throw new Error("not logged in"); }
  if (!resp.ok) throw new Error((await resp.text()).trim());
  return resp.json();
}

// ---- theme -------------------------------------------------------------------------
function applyTheme(t) { if (t) document.documentElement.dataset.theme = t; else delete document.documentElement.dataset.theme; }
applyTheme(localStorage.getItem("latchkey-theme"));
function toggleTheme() {
  const dark = document.documentElement.dataset.theme
    ? document.documentElement.dataset.theme === "dark"
    : matchMedia("(prefers-color-scheme: dark)").matches;
  const next = dark ? "light" : "dark";
  localStorage.setItem("latchkey-theme", next);
  applyTheme(next);
}

// ---- login -------------------------------------------------------------------------
function showLogin() { $("#login").hidden = false; $("#app").hidden = true; setStatus(false); }

async function login(ev) {
  ev.preventDefault();
  $("#login-error").textContent = "";
  const resp = await fetch("/login", { method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token: $("#token").value }) });
  if (!resp.ok) { $("#login-error").textContent = "That is not the admin token."; return; }
  $("#token").value = "";
  state.csrf = (await resp.json()).csrf;
  start();
}

async function start() {
  try { state.csrf = (await api("/api/session")).csrf; } catch { return; }
  $("#login").hidden = true; $("#app").hidden = false;
  refreshSide();
  connect();
  setInterval(refreshSide, 5000);
  setInterval(renderUsage, 5000);
}

// ---- live feed ---------------------------------------------------------------------
function setStatus(on) { const s = $("#status"); s.textContent = on ? "live" : "offline"; s.className = "status " + (on ? "on" : "off"); }

function connect() {
  if (state.source) state.source.close();
  const src = new EventSource("/api/events");
  state.source = src;
  src.onopen = () => setStatus(true);
  src.onerror = () => { setStatus(false); if (src.readyState === EventSource.CLOSED) setTimeout(connect, 2000); };
  src.addEventListener("request", (e) => addRow(JSON.parse(e.data)));
  src.addEventListener("approvals", (e) => renderApprovals(JSON.parse(e.data)));
}

function addRow(r) {
  r._at = Date.now();
  state.rows.unshift(r);
  if (state.rows.length > MAX_ROWS) state.rows.length = MAX_ROWS;
  if (r.agent && !state.agents.has(r.agent)) { state.agents.add(r.agent); addOption("#f-agent", r.agent); }
  if (r.credential && !state.creds.has(r.credential)) { state.creds.add(r.credential); addOption("#f-credential", r.credential); }
  if (matches(r)) { const tb = $("#requests tbody"); tb.prepend(...rows(r, true)); while (tb.rows.length > 2 * MAX_ROWS) tb.deleteRow(-1); }
  $("#no-requests").hidden = state.rows.length > 0;
  scheduleUsage();
}

// The per-minute meters follow the feed, at most a few times a second.
let usageQueued = false;
function scheduleUsage() {
  if (usageQueued) return;
  usageQueued = true;
  setTimeout(() => { usageQueued = false; renderUsage(); }, 250);
}

function addOption(sel, value) { $(sel).append(el("option", { value }, value)); }

function matches(r) {
  const f = state.filters;
  if (f.agent && r.agent !== f.agent) return false;
  if (f.credential && r.credential !== f.credential) return false;
  if (f.decision && r.decision !== f.decision) return false;
  if (f.host && !(r.host || "").toLowerCase().includes(f.host.toLowerCase())) return false;
  return true;
}

function fmtBytes(n) { return n < 1024 ? n + " B" : n < 1048576 ? (n / 1024).toFixed(1) + " KiB" : (n / 1048576).toFixed(1) + " MiB"; }
function statusClass(s) { return !s ? "" : s < 300 ? "s-ok" : s < 400 ? "s-mid" : "s-bad"; }

function row(r, fresh) {
  const t = new Date(r.ts);
  const tokens = r.usage ? ((r.usage.input_tokens || 0) + (r.usage.output_tokens || 0)) : "";
  const host = r.port === 443 || r.port === 80 ? r.host : r.host + ":" + r.port;
  const decision = el("td", null, el("span", { class: "badge d-" + r.decision }, r.decision));
  return el("tr", { class: fresh ? "fresh" : "", "data-agent": r.agent || "", "data-decision": r.decision },
    el("td", { title: r.ts }, t.toLocaleTimeString([], { hour12: false }) + "." + String(t.getMilliseconds()).padStart(3, "0")),
    el("td", null, r.agent || "—"),
    el("td", null, r.method),
    el("td", { class: "host" }, host),
    el("td", { class: "path", title: r.path || "" }, r.path || ""),
    el("td", { class: statusClass(r.status) }, r.status ?? ""),
    decision,
    el("td", null, r.credential || "—"),
    el("td", { class: "num" }, fmtBytes(r.bytes_up) + " / " + fmtBytes(r.bytes_down)),
    el("td", { class: "num" }, r.duration_ms),
    el("td", { class: "num" }, tokens));
}

// A request's row, and for a blocked one a second row with the reason, full width.
function rows(r, fresh) {
  const out = [row(r, fresh)];
  if (r.decision === "blocked" && r.reason) {
    out.push(el("tr", { class: "reason-row" + (fresh ? " fresh" : ""), "data-agent": r.agent || "", "data-decision": r.decision },
      el("td", { colspan: 11, class: "reason" }, "↳ " + r.reason)));
  }
  return out;
}

function rerender() {
  const tb = $("#requests tbody");
  tb.replaceChildren(...state.rows.filter(matches).flatMap((r) => rows(r, false)));
}

// ---- approvals ---------------------------------------------------------------------
function renderApprovals(list) {
  $("#pending-count").textContent = list.length;
  $("#pending-count").className = "count" + (list.length ? " hot" : "");
  $("#no-pending").hidden = list.length > 0;
  $("#approvals").replaceChildren(...list.map(approval));
  document.title = (list.length ? "(" + list.length + ") " : "") + "latchkey — live view";
}

function approval(p) {
  const decide = (decision, scope) => async (ev) => {
    ev.target.disabled = true;
    try { await api("/api/approvals/" + encodeURIComponent(p.id), { method: "POST", body: JSON.stringify({ decision, scope }) }); }
    catch (e) { alert(e.message); ev.target.disabled = false; }
  };
  const what = [p.method, p.path].filter(Boolean).join(" ");
  const who = [p.agent && "agent " + p.agent, p.credential && "credential " + p.credential, p.waiting + " waiting", "since " + new Date(p.since).toLocaleTimeString([], { hour12: false })].filter(Boolean).join(" · ");
  return el("div", { class: "approval", "data-id": p.id, "data-host": p.host },
    el("div", { class: "what" }, el("div", { class: "host" }, p.port === 443 || p.port === 80 ? p.host : p.host + ":" + p.port), el("div", { class: "meta" }, what + " — " + who)),
    el("div", { class: "actions" },
      el("button", { class: "allow", "data-action": "allow-once", onclick: decide("allow", "once") }, "Allow once"),
      el("button", { class: "allow", "data-action": "allow-run", onclick: decide("allow", "run") }, "Allow until restart"),
      el("button", { class: "allow strong", "data-action": "allow-always", onclick: decide("allow", "always") }, "Always allow"),
      el("button", { class: "deny", "data-action": "deny-once", onclick: decide("deny", "once") }, "Deny"),
      el("button", { class: "deny strong", "data-action": "deny-always", onclick: decide("deny", "always") }, "Always deny")));
}

// ---- credentials and usage ---------------------------------------------------------
async function refreshSide() {
  try {
    const [creds, usage] = await Promise.all([api("/api/credentials"), api("/api/usage")]);
    state.credentials = creds; state.usage = usage;
    renderCredentials(); renderUsage();
  } catch { /* the feed's status says it */ }
}

function renderCredentials() {
  $("#credentials").replaceChildren(...(state.credentials.length ? state.credentials.map((c) =>
    el("li", null,
      el("span", null, el("span", { class: "name" }, c.name), " ", el("span", { class: "badge " + (c.state === "active" ? "d-injected" : c.state === "failed" ? "d-blocked" : "d-passed") }, c.state), " ", el("span", { class: "muted" }, c.auth_type)),
      el("span", { class: "hosts" }, c.hosts.join(", ")))) : [el("li", { class: "muted" }, "No credentials configured.")]));
}

function meter(label, used, limit, unit) {
  const m = el("div", { class: "meter" }, el("div", { class: "label" }, el("span", null, label), el("span", { class: "muted" }, limit ? used + " / " + limit + " " + unit : used + " " + unit)));
  if (limit) {
    const fill = el("div", { class: "fill" + (used / limit > 0.85 ? " high" : "") });
    fill.style.width = Math.min(100, (100 * used) / limit) + "%";
    m.append(el("div", { class: "track" }, fill));
  }
  return m;
}

function lastMinute(key, name) {
  const since = Date.now() - 60000;
  return state.rows.filter((r) => r._at >= since && r[key] === name && r.decision !== "blocked").length;
}

function renderUsage() {
  const u = state.usage;
  if (!u) return;
  const parts = [];
  for (const [kind, key, list] of [["credential", "credential", u.credentials], ["agent", "agent", u.agents]]) {
    for (const x of list) {
      parts.push(el("div", { class: "muted" }, kind + " " + x.name));
      parts.push(meter("tokens today", x.tokens_today, x.tokens_per_day, ""));
      parts.push(meter("requests, last minute", lastMinute(key, x.name), x.requests_per_minute, "/min"));
    }
  }
  $("#usage").replaceChildren(...(parts.length ? parts : [el("p", { class: "muted" }, "No active credential or agent.")]));
}

// ---- wiring ------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("#theme").addEventListener("click", toggleTheme);
  $("#login-form").addEventListener("submit", login);
  for (const k of ["agent", "credential", "decision", "host"]) {
    $("#f-" + k).addEventListener("input", (e) => { state.filters[k] = e.target.value; rerender(); });
  }
  $("#clear").addEventListener("click", () => { state.rows = []; rerender(); $("#no-requests").hidden = false; });
  start();
});
