#!/usr/bin/env python3
"""Side-by-side benchmark: direct vs latchkey vs mitmproxy vs squid (ssl-bump), and nginx
as a TLS-terminating reverse proxy (`nginx-proxy`: the yardstick for CPU per request).

Everything binds to 127.0.0.1, every process started here is stopped here by PID, and
every run is bounded in time. Targets alternate within each round so drift hits all
alike; each proxy's header injection is verified before it is timed.

Usage: bench/run.sh [--quick] [--rounds N] [--duration S] [--soak S] [--only a,b]
(run.sh installs the tools; this script expects them on PATH).
"""

import argparse
import json
import selectors
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SECRET = "bench-secret-value-0123456789"
# The upstream by name: inside `exec --jail` 127.0.0.1 is the jail's own loopback, so the
# jailed client reaches nginx through a name latchkey resolves ([upstream.resolve]).
JAIL_HOST = "upstream.bench.test"
HZ = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


# --- process accounting -------------------------------------------------------------


def tree(pid):
    """pid and all its descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(d))
            except (OSError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ticks(pids):
    total = 0
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except OSError:
            pass
    return total


def rss_kib(pids):
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class Sampler:
    """Samples the RSS of a process tree while a run lasts; reports CPU and peak RSS."""

    def __init__(self, pid):
        self.pid = pid
        self.peak = 0
        self.samples = []
        self._stop = threading.Event()

    def __enter__(self):
        self.pids = tree(self.pid) if self.pid else []
        self.t0, self.c0 = time.monotonic(), cpu_ticks(self.pids)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.25):
            if self.pid:
                r = rss_kib(tree(self.pid))
                self.peak = max(self.peak, r)
                self.samples.append((time.monotonic() - self.t0, r))

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.wall = time.monotonic() - self.t0
        if self.pid:
            self.peak = max(self.peak, rss_kib(tree(self.pid)))
        self.cpu = (cpu_ticks(tree(self.pid)) - self.c0) / HZ / self.wall * 100 if self.pid else 0


# --- the upstream and the proxies -----------------------------------------------------


class Bench:
    def __init__(self, work, args):
        self.work = work
        self.args = args
        self.procs = []
        self.token = None  # a scoped token for the token row, when latchkey can mint one
        self.nginx_connections = 8192  # bench/scale.py raises it for 10,000 connections
        self.up_port = free_port()  # HTTP/2 and HTTP/1.1 by ALPN, as provider APIs are
        self.sse_port = free_port()

    def spawn(self, name, cmd, **kw):
        log = open(self.work / f"{name}.log", "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.procs.append((name, p))
        return p

    def stop_all(self):
        for name, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(p.pid, signal.SIGKILL)

    def certs(self):
        w = self.work
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        sh("openssl", "req", "-x509", *ec, "-keyout", w / "up-ca.key", "-out", w / "up-ca.pem",
           "-days", "2", "-subj", "/CN=bench upstream CA")
        sh("openssl", "req", *ec, "-keyout", w / "up.key", "-out", w / "up.csr", "-subj", "/CN=127.0.0.1")
        (w / "ext").write_text(f"subjectAltName=IP:127.0.0.1,DNS:{JAIL_HOST}\nextendedKeyUsage=serverAuth\n")
        sh("openssl", "x509", "-req", "-in", w / "up.csr", "-CA", w / "up-ca.pem", "-CAkey", w / "up-ca.key",
           "-CAcreateserial", "-out", w / "up.pem", "-days", "2", "-extfile", w / "ext")
        sh("openssl", "req", "-x509", *ec, "-keyout", w / "squid-ca.key", "-out", w / "squid-ca.pem",
           "-days", "2", "-subj", "/CN=squid bench CA", "-addext", "basicConstraints=critical,CA:true",
           "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        (w / "www").mkdir()
        (w / "www" / "1m.bin").write_bytes(os.urandom(1 << 20))
        (w / "upload.json").write_bytes(upload_body(1 << 20))

    def start_nginx(self):
        w = self.work
        conf = w / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/nginx.err warn;
daemon off;
worker_rlimit_nofile {self.nginx_connections * 2};
events {{ worker_connections {self.nginx_connections}; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 600s;
  server {{
    listen 127.0.0.1:{self.up_port} ssl http2;
    ssl_certificate {w}/up.pem;
    ssl_certificate_key {w}/up.key;
    ssl_protocols TLSv1.2 TLSv1.3;  # nginx < 1.23.4 (Debian's 1.22) leaves TLS 1.3 off
    root {w}/www;
    location = / {{ return 200 "hello from upstream\\n"; }}
    location = /upload {{ client_max_body_size 4m; return 200 "uploaded\\n"; }}
    location = /check {{
      if ($http_x_api_key = "{SECRET}") {{ return 200 "injected\\n"; }}
      return 403 "no credential\\n";
    }}
  }}
}}
""")
        self.spawn("nginx", ["nginx", "-c", str(conf)])
        self.spawn("sse", [sys.executable, str(ROOT / "bench" / "sse_server.py"), str(self.sse_port),
                           str(w / "up.pem"), str(w / "up.key")])
        wait_port(self.up_port)
        wait_port(self.sse_port)

    def start_latchkey(self, name="latchkey", binary=None, cred_extra="", tail="", wrapper=(), proxy_extra=""):
        """latchkey (or, as `baseline`, an earlier build of it, to compare two builds in one run).
        `cred_extra` goes into the credential's table, `tail` at the end of the config;
        `wrapper` runs it under another command (bench/cpu.py: valgrind); `proxy_extra`:
        more of `[proxy]` (the DLP rows' second instance)."""
        w, port = self.work, free_port()
        conf = w / f"{name}.toml"
        conf.write_text(f"""
[proxy]
port = {port}
ca_dir = "{w}/{name}-ca"
allow_private = ["127.0.0.1/32"]
{proxy_extra}
[upstream]
ca_file = "{w}/up-ca.pem"
[credentials.bench]
header = "x-api-key"
value = "${{BENCH_SECRET}}"
domains = ["127.0.0.1:{self.up_port}", "127.0.0.1:{self.sse_port}", "{JAIL_HOST}:{self.up_port}"]
{cred_extra}
[upstream.resolve]
"{JAIL_HOST}:{self.up_port}" = "127.0.0.1:{self.up_port}"
{tail}
""")
        if name == "latchkey":
            self.latchkey_conf = conf
            # Transparent mode (SPEC 9) for the transparent row; `[proxy]` is the first table.
            self.transparent_port = free_port()
            conf.write_text(conf.read_text().replace(
                "[proxy]\n", f'[proxy]\ntransparent = "127.0.0.1:{self.transparent_port}"\n', 1))
            # The admin listener with the live view, for the live-view rows; the admin
            # token is created beside the config at start.
            self.admin_port = free_port()
            with conf.open("a") as f:
                f.write(f'[admin]\nlisten = "127.0.0.1:{self.admin_port}"\nui = true\n')
        conf.chmod(0o600)
        env = dict(os.environ, BENCH_SECRET=SECRET, RUST_LOG="warn")
        binary = str(binary or self.args.latchkey)
        # A scoped token for the token row (docs/tokens.md); minting creates token.key.
        if name == "latchkey":
            minted = subprocess.run([binary, "token", "--config", str(conf), "mint", "--credential", "bench",
                                     "--path", "/", "--ttl", "1d"], capture_output=True, text=True)
            self.token = minted.stdout.strip() if minted.returncode == 0 else None
        p = self.spawn(name, [*wrapper, binary, "run", "--config", str(conf)], env=env)
        wait_port(port, timeout=120 if wrapper else 30)
        return Target(name, p.pid, f"http://127.0.0.1:{port}", w / f"{name}-ca" / "ca.crt")

    def start_mitmproxy(self):
        w, port = self.work, free_port()
        (w / "inject.py").write_text(
            f'def request(flow):\n    flow.request.headers["x-api-key"] = "{SECRET}"\n')
        p = self.spawn("mitmproxy", ["mitmdump", "-q", "--listen-host", "127.0.0.1", "-p", str(port),
                                     "--set", f"confdir={w}/mitm", "--set",
                                     f"ssl_verify_upstream_trusted_ca={w}/up-ca.pem", "-s", str(w / "inject.py")])
        wait_port(port)
        return Target("mitmproxy", p.pid, f"http://127.0.0.1:{port}", w / "mitm" / "mitmproxy-ca-cert.pem")

    def start_squid(self):
        w, port = self.work, free_port()
        certgen = next(p for p in ["/usr/lib/squid/security_file_certgen", "/usr/lib/squid3/security_file_certgen"]
                       if Path(p).exists())
        sh(certgen, "-c", "-s", str(w / "ssldb"), "-M", "16MB")
        conf = w / "squid.conf"
        conf.write_text(f"""
http_port 127.0.0.1:{port} ssl-bump generate-host-certificates=on dynamic_cert_mem_cache_size=16MB tls-cert={w}/squid-ca.pem tls-key={w}/squid-ca.key
sslcrtd_program {certgen} -s {w}/ssldb -M 16MB
sslcrtd_children 4
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump bump all
tls_outgoing_options cafile={w}/up-ca.pem
request_header_add X-Api-Key "{SECRET}" all
http_access allow all
cache deny all
access_log none
cache_log {w}/squid-cache.log
pid_filename {w}/squid.pid
coredump_dir {w}
max_filedescriptors 16384
""")
        p = self.spawn("squid", ["squid", "-f", str(conf), "-N"])
        wait_port(port)
        return Target("squid", p.pid, f"http://127.0.0.1:{port}", w / "squid-ca.pem")

    def start_nginx_proxy(self):
        """nginx as a TLS-terminating reverse proxy that writes the credential in: both TLS
        legs, HTTP parsed twice, a keep-alive pool upstream — the work latchkey does per
        request, minus CONNECT (once per connection) and the policy. It is not a
        credential proxy (no CONNECT, no per-destination decision); it is here as the
        yardstick for CPU per request: what a mature C proxy gets on this machine."""
        w, port = self.work, free_port()
        conf = w / "nginx-proxy.conf"
        conf.write_text(f"""
worker_processes auto;
pid {w}/nginx-proxy.pid;
error_log {w}/nginx-proxy.err warn;
daemon off;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 600s;
  upstream up {{ server 127.0.0.1:{self.up_port}; keepalive 64; keepalive_requests 10000000; }}
  server {{
    listen 127.0.0.1:{port} ssl http2;
    ssl_certificate {w}/up.pem;
    ssl_certificate_key {w}/up.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
      proxy_pass https://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host 127.0.0.1:{self.up_port};
      proxy_set_header X-Api-Key "{SECRET}";
      proxy_buffering off;
      proxy_ssl_session_reuse on;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {w}/up-ca.pem;
      proxy_ssl_name {JAIL_HOST};
    }}
  }}
}}
""")
        p = self.spawn("nginx-proxy", ["nginx", "-c", str(conf)])
        wait_port(port)
        return Target("nginx-proxy", p.pid, None, w / "up-ca.pem", reverse=port)


class Target:
    def __init__(self, name, pid, proxy, ca, reverse=None):
        self.name, self.pid, self.proxy, self.ca = name, pid, proxy, ca
        # A reverse proxy (nginx-proxy): the client asks it instead of the upstream, on
        # this port, with no CONNECT; it has the upstream's certificate.
        self.reverse = reverse


def wait_port(port, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


# --- clients ----------------------------------------------------------------------------


def open_stream(target, port, path_ca, alpn=None):
    """A TLS stream to 127.0.0.1:port, through the target's CONNECT when it has one."""
    s = socket.create_connection(("127.0.0.1", int(target.proxy.rsplit(":", 1)[1]) if target.proxy else port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if target.proxy:
        s.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                raise OSError("proxy closed during CONNECT")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
            raise OSError(f"CONNECT refused: {head[:80]!r}")
    ctx = ssl.create_default_context(cafile=str(path_ca))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    tls = ctx.wrap_socket(s, server_hostname="127.0.0.1")
    if alpn and tls.selected_alpn_protocol() != alpn[0]:
        raise OSError(f"ALPN {alpn[0]} not chosen: {tls.selected_alpn_protocol()}")
    return tls


def h2_get(tls, authority):
    """GET / as stream 1 of a new HTTP/2 connection, read until its answer ends. Frames
    by hand (HPACK literals without indexing) so the bench needs no HTTP/2 library."""
    def frame(kind, flags, stream, payload=b""):
        return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    block = b"".join(b"\x00" + bytes([len(k)]) + k + bytes([len(v)]) + v for k, v in (
        (b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", authority.encode())))
    tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0) + frame(1, 0x5, 1, block))
    buf, acked = b"", False
    while True:
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            length, kind, flags = int.from_bytes(buf[:3], "big"), buf[3], buf[4]
            stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            buf = buf[9 + length:]
            if kind == 4 and not flags & 1 and not acked:
                tls.sendall(frame(4, 1, 0))  # the server's SETTINGS, acknowledged
                acked = True
            if stream == 1 and kind in (0, 1) and flags & 1:
                return
            if kind in (3, 7):
                raise OSError(f"HTTP/2 stream reset or connection gone away (frame type {kind})")
        chunk = tls.recv(65536)
        if not chunk:
            raise OSError("closed before the HTTP/2 answer ended")
        buf += chunk


def verify_injection(bench, t):
    if not t.proxy and not t.reverse:
        return
    s = open_stream(t, t.reverse or bench.up_port, t.ca)
    s.sendall(f"GET /check HTTP/1.1\r\nHost: 127.0.0.1:{bench.up_port}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    if b"injected" not in data:
        raise SystemExit(f"{t.name} did not inject the credential: {data[:200]!r}")


def oha(bench, t, url, conns, duration, extra=()):
    ca = t.ca if t.proxy else bench.work / "up-ca.pem"
    cmd = ["oha", "-z", f"{duration}s", "-c", str(conns), "--no-tui", "--output-format", "json", "--cacert", str(ca),
           *extra]
    if t.proxy:
        cmd += ["-x", t.proxy]
    if t.reverse:
        url = url.replace(f"127.0.0.1:{bench.up_port}", f"127.0.0.1:{t.reverse}", 1)
    cmd.append(url)
    with Sampler(t.pid) as s:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    try:
        d = json.loads(out.stdout)
    except json.JSONDecodeError:
        return None  # this client/proxy pair cannot do the scenario (squid has no h2)
    codes = d.get("statusCodeDistribution", {})
    if not codes.get("200"):
        return None
    ok = codes.get("200", 0)
    bad = sum(v for k, v in codes.items() if k != "200")
    errors = {k: v for k, v in (d.get("errorDistribution") or {}).items() if "deadline" not in k}
    p = d["latencyPercentiles"]
    return {"rps": ok / d["summary"]["total"], "p50": p["p50"] * 1000, "p99": p["p99"] * 1000,
            "cpu": s.cpu, "rss": s.peak / 1024, "errors": bad + sum(errors.values())}


def sse_first_byte(bench, t, n):
    """Median time from sending a request to the first SSE event, on a warm connection."""
    s = open_stream(t, bench.sse_port, t.ca if t.proxy else bench.work / "up-ca.pem")
    req = f"GET /sse HTTP/1.1\r\nHost: 127.0.0.1:{bench.sse_port}\r\nAccept: text/event-stream\r\n\r\n".encode()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.sendall(req)
        buf = b""
        while b"data: first" not in buf:
            buf += s.recv(65536)
        times.append((time.perf_counter() - t0) * 1000)
        while not buf.endswith(b"0\r\n\r\n"):
            buf += s.recv(65536)
    s.close()
    return statistics.median(times)


def idle_connections(bench, t, n, http2=False):
    """RSS of the proxy holding n intercepted, idle keep-alive connections (HTTP/1.1, or
    HTTP/2 with one request answered on each)."""
    before = rss_kib(tree(t.pid))
    streams = []
    for _ in range(n):
        s = open_stream(t, bench.up_port, t.ca, ["h2"] if http2 else None)
        if http2:
            h2_get(s, f"127.0.0.1:{bench.up_port}")
            streams.append(s)
            continue
        s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{bench.up_port}\r\n\r\n".encode())
        got = b""
        while b"upstream" not in got:
            got += s.recv(4096)
        streams.append(s)
    time.sleep(1)
    after = rss_kib(tree(t.pid))
    for s in streams:
        s.close()
    return before / 1024, after / 1024


# --- the run ------------------------------------------------------------------------------


SCENARIOS = [
    # name, path, connections, extra oha args, unit
    ("keep-alive, 32 connections", "/", 32, (), "req/s"),
    ("keep-alive, 32 connections, HTTP/2 client", "/", 32, ("--http2",), "req/s"),
    ("new connection per request, 8", "/", 8, ("--disable-keepalive",), "req/s"),
    ("1 MiB downloads, 4 connections", "/1m.bin", 4, (), "MiB/s"),
    ("one sequential connection", "/", 1, (), "req/s"),
]


# latchkey only: the same keep-alive load with the placeholder in the credential's slot,
# then with a scoped token there (verified per request, from the verified-token cache).
TOKEN_SCENARIOS = [
    ("keep-alive, 32 connections, plain placeholder", "placeholder"),
    ("keep-alive, 32 connections, scoped token", "token"),
]


# latchkey only: a rate limit on the credential kept per replica, then in Redis
# (`[cluster] redis`, SPEC 12), same keep-alive load. The limit is far above the load, so
# every request is admitted: the row measures the cost of asking, not of refusing.
# Permits are taken from Redis in batches (src/cluster/limits.rs); target ≥ 0.85×.
CLUSTER_SCENARIOS = [
    ("keep-alive, 32 connections, requests_per_minute, per-replica state", "limited"),
    ("keep-alive, 32 connections, requests_per_minute in Redis ([cluster])", "shared"),
]
CLUSTER_LIMIT = "requests_per_minute = 1000000000"


def cluster_rows(bench, url, args):
    """Both limited latchkeys and a redis-server of the bench's own; None without redis-server."""
    if not shutil.which("redis-server"):
        print("# no redis-server: the [cluster] rows are skipped (apt-get install redis-server)", file=sys.stderr)
        return None
    rport = free_port()
    bench.spawn("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(bench.work)])
    wait_port(rport)
    targets = {
        "limited": bench.start_latchkey("limited", cred_extra=CLUSTER_LIMIT),
        "shared": bench.start_latchkey("shared", cred_extra=CLUSTER_LIMIT,
                                       tail=f'[cluster]\nredis = "redis://127.0.0.1:{rport}/0"\n'),
    }
    results = {}
    for r in range(args.rounds):
        order = CLUSTER_SCENARIOS if r % 2 == 0 else CLUSTER_SCENARIOS[::-1]
        for name, kind in order:
            res = oha(bench, targets[kind], url + "/", 32, args.duration, ("-H", "x-api-key: latchkey-bench"))
            if res is None:
                raise SystemExit(f"latchkey failed the {name} scenario")
            results.setdefault(name, []).append(res)
            print(f"# round {r + 1} {name}: {res['rps']:.0f}/s p50 {res['p50']:.3f} ms", file=sys.stderr)
    (local_name, _), (shared_name, _) = CLUSTER_SCENARIOS
    local, shared = med(results[local_name], "rps"), med(results[shared_name], "rps")
    lines = ["", "Shared state (latchkey, keep-alive, 32 connections, same run; target ≥ 0.85×):", "",
             "| rate limit kept | rate | p50 / p99 |", "|---|---|---|"]
    for name, rate in [(local_name, local), (shared_name, shared)]:
        runs = results[name]
        lines.append(f"| {name.split(', ', 2)[2]} | {rate:,.0f} req/s | "
                     f"{med(runs, 'p50'):.2f} / {med(runs, 'p99'):.2f} ms |")
    lines.append("")
    _, ratio = paired(results[local_name], results[shared_name])
    lines.append(f"Redis / per-replica: {ratio}.")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short runs, one round, 30 s soak")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per timed run")
    ap.add_argument("--soak", type=int, default=600, help="soak seconds (latchkey)")
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--only", default="direct,latchkey,mitmproxy,squid,nginx-proxy")
    ap.add_argument("--latchkey", type=Path, default=ROOT / "target" / "release" / "latchkey")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="an earlier latchkey build, run as target `baseline` beside `latchkey` in the same rounds")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--no-jail", action="store_true", help="skip the exec --jail rows (Linux, needs nft)")
    ap.add_argument("--no-transparent", action="store_true",
                    help="skip the transparent-mode row (Linux, needs root and nft)")
    ap.add_argument("--no-cluster", action="store_true", help="skip the [cluster] redis rows (needs redis-server)")
    ap.add_argument("--no-dlp", action="store_true", help="skip the [proxy.dlp] rows")
    ap.add_argument("--no-threads", action="store_true", help="skip the [proxy] threads = 1 rows")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration, args.soak = 1, 3, 30
    only = args.only.split(",")

    work = Path(tempfile.mkdtemp(prefix="latchkey-bench-"))
    work.chmod(0o755)  # squid's helpers run as its own user and read ssldb/ from here
    bench = Bench(work, args)
    try:
        bench.certs()
        bench.start_nginx()
        targets = [Target("direct", None, None, None)]
        for name, start in [("latchkey", bench.start_latchkey), ("mitmproxy", bench.start_mitmproxy),
                            ("squid", bench.start_squid), ("nginx-proxy", bench.start_nginx_proxy)]:
            if name in only:
                targets.append(start())
        targets = [t for t in targets if t.name in only]
        if args.baseline:
            targets.insert(2, bench.start_latchkey("baseline", args.baseline))
            only.append("baseline")
        for t in targets:
            verify_injection(bench, t)
            print(f"# {t.name}: injection verified" if t.proxy or t.reverse else "# direct: ok", file=sys.stderr)

        results = {}  # (scenario, target) -> list of runs
        url = f"https://127.0.0.1:{bench.up_port}"
        for r in range(args.rounds):
            for name, path, conns, extra, _ in SCENARIOS:
                order = targets[r % len(targets):] + targets[:r % len(targets)]
                for t in order:
                    res = oha(bench, t, url + path, conns, args.duration, extra)
                    if res is None:
                        print(f"# round {r + 1} {name} {t.name}: not supported", file=sys.stderr)
                        continue
                    results.setdefault((name, t.name), []).append(res)
                    print(f"# round {r + 1} {name} {t.name}: {res['rps']:.0f}/s p50 {res['p50']:.3f} ms",
                          file=sys.stderr)

        lk = next((t for t in targets if t.name == "latchkey"), None)
        token_results = {}
        if lk and bench.token:
            for r in range(args.rounds):
                order = TOKEN_SCENARIOS if r % 2 == 0 else TOKEN_SCENARIOS[::-1]
                for name, kind in order:
                    value = bench.token if kind == "token" else "latchkey-bench"
                    res = oha(bench, lk, url + "/", 32, args.duration, ("-H", f"x-api-key: {value}"))
                    if res is None:
                        raise SystemExit(f"latchkey failed the {name} scenario")
                    token_results.setdefault(name, []).append(res)
                    print(f"# round {r + 1} {name}: {res['rps']:.0f}/s p50 {res['p50']:.3f} ms", file=sys.stderr)

        extra_rows = {}
        for t in targets:
            if t.reverse:
                continue  # it proxies to the one upstream only; holds no intercepted tunnel
            extra_rows.setdefault("SSE first event (ms, median of 200)", {})[t.name] = sse_first_byte(bench, t, 200)
            if t.proxy:
                before, after = idle_connections(bench, t, args.idle)
                extra_rows.setdefault(f"RSS idle → {args.idle} idle intercepted connections (MiB)",
                                      {})[t.name] = (before, after)
                if t.name != "squid":  # squid's ssl-bump offers no h2
                    time.sleep(1)
                    before, after = idle_connections(bench, t, args.idle, http2=True)
                    extra_rows.setdefault(f"RSS idle → {args.idle} idle intercepted HTTP/2 connections (MiB)",
                                          {})[t.name] = (before, after)
        jail = jail_rows(bench, lk) if lk and not args.no_jail else None
        transparent = transparent_rows(bench, lk) if lk and not args.no_transparent else None
        cluster = cluster_rows(bench, url, args) if lk and not args.no_cluster else None
        live = live_view_rows(bench, lk, args) if lk else ""
        dlp = dlp_rows(bench, lk, args) if lk and not args.no_dlp else None
        threads = threads_rows(bench, lk, args) if lk and not args.no_threads else None
        soak = None
        if lk and args.soak:
            soak = run_soak(bench, lk, url, args.soak)
        table = render(targets, results, extra_rows, soak, args) + render_tokens(token_results)
        if jail:
            table += jail
        if transparent:
            table += transparent
        if cluster:
            table += cluster
        table += live
        if dlp:
            table += dlp
        if threads:
            table += threads
        print(table)
        if args.out:
            args.out.write_text(table)
    finally:
        bench.stop_all()


# --- the live view (issue 15): keep-alive with one SSE watcher >= 0.95x without; 100 watchers < 10 MiB ---


class Watchers:
    """N clients of GET /api/events on the admin listener, read continuously by one thread."""

    def __init__(self, port, token, n):
        self.socks, self.bytes, self.stop = [], 0, threading.Event()
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      f"Authorization: Bearer {token}\r\n\r\n".encode())
            s.setblocking(False)
            self.socks.append(s)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        sel = selectors.DefaultSelector()
        for s in self.socks:
            sel.register(s, selectors.EVENT_READ)
        while not self.stop.is_set():
            for key, _ in sel.select(timeout=0.2):
                try:
                    self.bytes += len(key.fileobj.recv(1 << 16))
                except BlockingIOError:
                    pass

    def close(self):
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()


def live_view_rows(bench, lk, args):
    token = (bench.work / "admin.token").read_text().strip()
    url = f"https://127.0.0.1:{bench.up_port}/"
    without, with_one = [], []
    for r in range(args.rounds):
        # Alternate the order, so neither side always runs on a warmer process.
        for watched in ([False, True] if r % 2 == 0 else [True, False]):
            w = Watchers(bench.admin_port, token, 1) if watched else None
            res = oha(bench, lk, url, 32, args.duration)
            if w:
                w.close()
                if not w.bytes:
                    raise SystemExit("the live-view watcher received nothing")
            (with_one if watched else without).append(res)
            print(f"# round {r + 1} keep-alive, live view watched={watched}: {res['rps']:.0f}/s", file=sys.stderr)
    base, watched = med(without, "rps"), med(with_one, "rps")
    time.sleep(1)
    before = rss_kib([lk.pid])
    w = Watchers(bench.admin_port, token, 100)
    oha(bench, lk, url, 32, max(3, args.duration // 2))  # events flow to all 100 while they are measured
    after = rss_kib([lk.pid])
    got = w.bytes
    w.close()
    return ("\n| live view (latchkey) | value |\n|---|---|\n"
            f"| keep-alive, 32 connections, no watcher | {base:.0f} req/s |\n"
            f"| keep-alive, 32 connections, one live-view watcher | {watched:.0f} req/s, {paired(without, with_one)[1]} |\n"
            f"| RSS with 100 live-view watchers, under load | {before / 1024:.1f} → {after / 1024:.1f} MiB "
            f"(+{(after - before) / 1024:.1f}); {got / 1048576:.1f} MiB of events delivered |\n")


# --- [proxy.dlp] (issue 18: 1 MiB uploads with DLP on >= 0.85x off; keep-alive >= 0.9x) ---


def upload_body(size):
    """An LLM-style JSON request of about `size` bytes: prose and code in message text, no
    secret (what DLP scans on every prompt)."""
    import random
    rng = random.Random(18)
    words = ("the function returns a value when the request body is parsed and the test "
             "fails because config path error line file module import self return None "
             "def class struct impl fn let mut async await match Some Ok Err").split()
    parts, total = [], 0
    while total < size - 200:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        if rng.random() < 0.2:
            line = f"    {line}({rng.randint(0, 9999)}) # sha {rng.getrandbits(64):016x}"
        parts.append(line)
        total += len(line) + 2
    text = "\n".join(parts)
    body = json.dumps({"model": "claude-test", "max_tokens": 16,
                       "messages": [{"role": "user", "content": text}]})
    return body.encode()


DLP_SCENARIOS = [
    # name, path, connections, extra oha args, target ratio
    ("1 MiB upload", "/upload", 4, ("-m", "POST", "-H", "content-type: application/json"), 0.85),
    ("keep-alive", "/", 32, (), 0.9),
]


def ab_runs(bench, a, b, scenarios, args, what):
    """Each scenario (name, path, connections, oha args) on two latchkeys, `a` and `b`
    ((label, target) each), back to back, their order swapped every round:
    {(name, label): [runs]}."""
    url = f"https://127.0.0.1:{bench.up_port}"
    runs = {}
    for r in range(args.rounds):
        for name, path, conns, extra in scenarios:
            for label, t in ([a, b] if r % 2 == 0 else [b, a]):
                res = oha(bench, t, url + path, conns, args.duration, extra)
                if res is None:
                    raise SystemExit(f"latchkey ({what} {label}) failed the {name} scenario")
                runs.setdefault((name, label), []).append(res)
                print(f"# round {r + 1} {name} {what} {label}: {res['rps']:.0f}/s", file=sys.stderr)
    return runs


def dlp_rows(bench, lk, args):
    """The same latchkey build with `[proxy.dlp] enabled = true` (block, built-in rules) beside
    the plain one, alternating within each round."""
    on = bench.start_latchkey("latchkey-dlp", proxy_extra="[proxy.dlp]\nenabled = true\naction = \"block\"")
    body = str(bench.work / "upload.json")
    scenarios = [(name, path, conns, (*extra, "-D", body) if path == "/upload" else extra)
                 for name, path, conns, extra, _ in DLP_SCENARIOS]
    runs = ab_runs(bench, ("off", lk), ("on", on), scenarios, args, "DLP")
    lines = ["", "[proxy.dlp] (same build, built-in rules, action = block; same run):", "",
             "| scenario | DLP off | DLP on | on / off | target |", "|---|---|---|---|---|"]
    for name, _, conns, _, target in DLP_SCENARIOS:
        off, on_ = med(runs[(name, "off")], "rps"), med(runs[(name, "on")], "rps")
        unit = "MiB/s" if name.startswith("1 MiB") else "req/s"
        _, ratio = paired(runs[(name, "off")], runs[(name, "on")])
        lines.append(f"| {name} DLP on/off, {conns} connections | {off:,.1f} {unit} | {on_:,.1f} {unit} | "
                     f"{ratio} | ≥ {target}× |")
    return "\n".join(lines) + "\n"


def threads_rows(bench, lk, args):
    """The same build with `[proxy] threads = 1` beside the default (a thread per core),
    alternating within each round: what one serving thread gives on a machine whose
    cores the client and the origin share (docs/performance.md, eighteenth session)."""
    one = bench.start_latchkey("latchkey-1-thread", proxy_extra="threads = 1")
    verify_injection(bench, one)
    scenarios = [(name, path, conns, extra) for name, path, conns, extra, _ in SCENARIOS[:4]]
    runs = ab_runs(bench, ("default", lk), ("one", one), scenarios, args, "threads")
    lines = ["", f"[proxy] threads (same build; default: one per core, {os.cpu_count()} here; same run):", "",
             "| scenario | default | threads = 1 | one / default |", "|---|---|---|---|"]
    for name, _, _, _, unit in SCENARIOS[:4]:
        default, one_ = med(runs[(name, "default")], "rps"), med(runs[(name, "one")], "rps")
        _, ratio = paired(runs[(name, "default")], runs[(name, "one")])
        lines.append(f"| {name} | {default:,.0f} {unit} | {one_:,.0f} {unit} | {ratio} |")
    return "\n".join(lines) + "\n"


# --- exec --jail (SPEC 8: jailed keep-alive >= 0.8x explicit proxy; fresh jail < 50 ms added) ---


def jailed(bench, cmd):
    """`cmd` inside `latchkey exec --jail`, served by the running bench latchkey (attach)."""
    env = dict(os.environ, RUST_LOG="warn")
    return [str(bench.args.latchkey), "exec", "--jail", "--config", str(bench.latchkey_conf), "--", *cmd], env


def timed_run(lk, cmd, env, timeout, label, into):
    """One timed oha run (`cmd`, JSON output) while sampling latchkey's CPU: its 200s per
    second appended to `into`. A run with no 200 at all failed; it is not a rate of 0."""
    with Sampler(lk.pid) as s:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    try:
        d = json.loads(out.stdout)
        ok = d.get("statusCodeDistribution", {}).get("200", 0)
        if not ok:
            raise KeyError(str(d.get("errorDistribution")))
        into.append({"rps": ok / d["summary"]["total"], "cpu": s.cpu})
        print(f"# {label}: {into[-1]['rps']:.0f}/s", file=sys.stderr)
    except (json.JSONDecodeError, KeyError, ZeroDivisionError):
        print(f"# {label}: failed: {out.stderr[-300:]}", file=sys.stderr)


def jail_rows(bench, lk):
    """Keep-alive through the jail (transparent: no proxy variables, oha dials the name)
    against oha with -x through the same latchkey, same URL, alternating rounds; then the
    wall time of one request from a fresh `exec --jail` against a fresh plain `exec`."""
    url = f"https://{JAIL_HOST}:{bench.up_port}/"
    oha_bin = shutil.which("oha")
    args = bench.args
    runs = {"explicit": [], "jailed": []}
    for r in range(args.rounds):
        for mode in (["explicit", "jailed"] if r % 2 == 0 else ["jailed", "explicit"]):
            cmd = [oha_bin, "-z", f"{args.duration}s", "-c", "32", "--no-tui", "--output-format", "json",
                   "--cacert", str(lk.ca)]
            env = None
            if mode == "explicit":
                # oha looks a URL's name up itself even through -x (and --connect-to
                # rewrites the CONNECT target, so the certificate no longer matches): the
                # explicit client names the same upstream by its address, a credential
                # domain as well. The work per request is the same.
                cmd += ["-x", lk.proxy, f"https://127.0.0.1:{bench.up_port}/"]
            else:
                cmd, env = jailed(bench, [*cmd, url])
            timed_run(lk, cmd, env, args.duration + 60, f"jail round {r + 1} {mode}", runs[mode])
    if not runs["explicit"] or not runs["jailed"]:
        return "\nexec --jail: could not be measured (see the log above).\n"
    explicit, jail = med(runs["explicit"], "rps"), med(runs["jailed"], "rps")
    curl = ["curl", "-sS", "-o", "/dev/null", "--cacert", str(lk.ca)]
    first = {"exec": [], "exec --jail": []}
    for i in range(20):
        for mode in (["exec", "exec --jail"] if i % 2 == 0 else ["exec --jail", "exec"]):
            if mode == "exec":
                cmd = [str(args.latchkey), "exec", "--config", str(bench.latchkey_conf), "--", *curl, url]
                env = dict(os.environ, RUST_LOG="warn")
            else:
                cmd, env = jailed(bench, [*curl, "--noproxy", "*", url])
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
            if out.returncode == 0:
                first[mode].append((time.perf_counter() - t0) * 1000)
    lines = ["", "exec --jail (same latchkey, same URL by name, 32 keep-alive connections):", "",
             "| | explicit proxy (-x) | jailed (no proxy variables) | ratio (target ≥ 0.8×) |", "|---|---|---|---|",
             f"| keep-alive req/s | {explicit:,.0f} (CPU {med(runs['explicit'], 'cpu'):.0f}%) | "
             f"{jail:,.0f} (CPU {med(runs['jailed'], 'cpu'):.0f}%) | {paired(runs['explicit'], runs['jailed'])[1]} |"]
    if first["exec"] and first["exec --jail"]:
        a, b = statistics.median(first["exec"]), statistics.median(first["exec --jail"])
        lines.append(f"| one request from a fresh process, wall ms (median of {len(first['exec --jail'])}) | "
                     f"exec {a:.1f} | exec --jail {b:.1f} | **+{b - a:.1f} ms** (target < 50) |")
    return "\n".join(lines) + "\n"


# --- transparent mode (SPEC 9): REDIRECTed keep-alive vs the explicit proxy ---

BENCH_AGENT_UID = 64999


def transparent_rows(bench, lk):
    """Keep-alive through `[proxy] transparent`: oha runs as its own uid with no proxy
    settings and dials the name at 127.0.0.2; an nftables rule in this namespace
    redirects exactly that uid's connections to 127.0.0.2:<port> (nothing else on the
    machine) to latchkey's transparent port, where the SNI names the destination. Against
    oha -x through the same latchkey, same URL, alternating rounds."""
    args = bench.args
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("setpriv"):
        return "\ntransparent mode: not measured (needs root, nft and setpriv).\n"
    w, port = bench.work, bench.up_port
    # The agent uid reads neither /root nor latchkey's ca_dir: its own copies.
    oha_bin, ca = w / "oha", w / "transparent-ca.crt"
    shutil.copy(shutil.which("oha"), oha_bin)
    shutil.copy(lk.ca, ca)
    ca.chmod(0o644)
    rules = (f"table inet latchkey_bench {{\n  chain out {{\n"
             f"    type nat hook output priority -100; policy accept;\n"
             f"    meta skuid {BENCH_AGENT_UID} ip daddr 127.0.0.2 tcp dport {port} "
             f"redirect to :{bench.transparent_port}\n  }}\n}}\n")
    loaded = subprocess.run(["nft", "-f", "-"], input=rules, capture_output=True, text=True)
    if loaded.returncode != 0:
        return f"\ntransparent mode: not measured (nft: {loaded.stderr.strip()}).\n"
    url = f"https://{JAIL_HOST}:{port}/"
    runs = {"explicit": [], "transparent": []}
    try:
        for r in range(args.rounds):
            for mode in (["explicit", "transparent"] if r % 2 == 0 else ["transparent", "explicit"]):
                cmd = [str(oha_bin), "-z", f"{args.duration}s", "-c", "32", "--no-tui", "--output-format", "json",
                       "--cacert", str(ca)]
                if mode == "explicit":
                    # As in jail_rows: the same upstream by its address (oha resolves
                    # names itself even through -x).
                    cmd += ["-x", lk.proxy, f"https://127.0.0.1:{port}/"]
                else:
                    cmd = ["setpriv", f"--reuid={BENCH_AGENT_UID}", f"--regid={BENCH_AGENT_UID}", "--clear-groups",
                           *cmd, "--connect-to", f"{JAIL_HOST}:{port}:127.0.0.2:{port}", url]
                timed_run(lk, cmd, None, args.duration + 60, f"transparent round {r + 1} {mode}", runs[mode])
    finally:
        subprocess.run(["nft", "delete", "table", "inet", "latchkey_bench"], capture_output=True)
    if not runs["explicit"] or not runs["transparent"]:
        return "\ntransparent mode: could not be measured (see the log above).\n"
    explicit, transparent = med(runs["explicit"], "rps"), med(runs["transparent"], "rps")
    return "\n".join([
        "", "transparent mode (same latchkey, same URL by name, 32 keep-alive connections):", "",
        "| | explicit proxy (-x) | transparent (REDIRECT, no proxy settings) | ratio |", "|---|---|---|---|",
        f"| keep-alive req/s | {explicit:,.0f} (CPU {med(runs['explicit'], 'cpu'):.0f}%) | "
        f"{transparent:,.0f} (CPU {med(runs['transparent'], 'cpu'):.0f}%) | "
        f"{paired(runs['explicit'], runs['transparent'])[1]} |",
    ]) + "\n"


def run_soak(bench, t, url, seconds):
    with Sampler(t.pid) as s:
        subprocess.run(["oha", "-z", f"{seconds}s", "-c", "32", "--no-tui", "--output-format", "quiet",
                        "--cacert", str(t.ca), "-x", t.proxy, url + "/"], timeout=seconds + 60,
                       capture_output=True)
    pts = [(x, r / 1024) for x, r in s.samples if x > seconds * 0.1]  # skip warm-up
    if len(pts) < 2:
        return None
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    slope = sum((x - mx) * (y - my) for x, y in pts) / max(sum((x - mx) ** 2 for x, _ in pts), 1e-9)
    return {"seconds": seconds, "first": pts[0][1], "last": pts[-1][1], "peak": s.peak / 1024,
            "slope_mib_per_hour": slope * 3600}


def render_tokens(token_results):
    if len(token_results) < 2:
        return ""
    (plain_name, _), (token_name, _) = TOKEN_SCENARIOS
    plain, token = med(token_results[plain_name], "rps"), med(token_results[token_name], "rps")
    lines = ["", "Scoped tokens (latchkey, keep-alive, 32 connections, same run; target ≥ 0.9×):", "",
             "| credential slot holds | rate | p50 / p99 |", "|---|---|---|"]
    for name, rate in [(plain_name, plain), (token_name, token)]:
        runs = token_results[name]
        lines.append(f"| {name.rsplit(', ', 1)[1]} | {rate:,.0f} req/s | {med(runs, 'p50'):.2f} / {med(runs, 'p99'):.2f} ms |")
    lines.append("")
    _, ratio = paired(token_results[plain_name], token_results[token_name])
    lines.append(f"Token / placeholder: {ratio}.")
    return "\n".join(lines) + "\n"


def med(runs, key):
    return statistics.median(r[key] for r in runs)


def paired(base, other, key="rps"):
    """`other` over `base` as the median of each round's own ratio, and the text that
    shows it with the rounds'. The two runs of a round are back to back; this machine's
    speed drifts between rounds by more than most features cost (a round at 70k req/s,
    the next at 40k, both sides alike), and two medians taken apart mix those rounds.
    Runs that failed unbalance the pairs: then the two medians, said so."""
    if len(base) != len(other) or not base:
        ratio = med(other, key) / med(base, key)
        return ratio, f"**{ratio:.2f}×** (medians; rounds unpaired)"
    ratios = [o[key] / b[key] for b, o in zip(base, other)]
    ratio = statistics.median(ratios)
    each = ", ".join(f"{r:.2f}" for r in ratios)
    return ratio, f"**{ratio:.2f}×** (median of the rounds' ratios: {each})"


def render(targets, results, extra_rows, soak, args):
    names = [t.name for t in targets]
    cpu = platform.processor() or platform.machine()
    try:
        model = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                     if l.startswith("model name"))
    except StopIteration:
        model = cpu
    lines = [f"Machine: {os.cpu_count()} cores, {model}, Linux {platform.release()}. "
             f"Rounds: {args.rounds} × {args.duration} s per cell, targets alternating; medians "
             "(a ratio to direct: the median of each round's own ratio).", ""]
    lines.append("| scenario | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for name, _, _, _, unit in SCENARIOS:
        cells = []
        direct = med(results[(name, "direct")], "rps") if (name, "direct") in results else None
        for n in names:
            runs = results.get((name, n))
            if not runs:
                cells.append("n/a")
                continue
            rate = med(runs, "rps")
            shown = rate if unit == "req/s" else rate  # 1 MiB per request
            cell = f"{shown:,.0f} {unit}" if unit == "req/s" else f"{shown:,.0f} MiB/s"
            if direct and n != "direct":
                cell += f" (**{paired(results[(name, 'direct')], runs)[0]:.2f}×**)"
            cell += f"<br>p50 {med(runs, 'p50'):.2f} / p99 {med(runs, 'p99'):.2f} ms"
            if n != "direct":
                cell += f"<br>CPU {med(runs, 'cpu'):.0f}%, RSS {max(r['rss'] for r in runs):.0f} MiB"
            if sum(r["errors"] for r in runs):
                cell += f"<br>errors {sum(r['errors'] for r in runs)}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    seq = "one sequential connection"
    if (seq, "direct") in results:
        d = med(results[(seq, "direct")], "p50")
        lines.append("| added median latency, one connection | " + " | ".join(
            "—" if n == "direct" else f"+{med(results[(seq, n)], 'p50') - d:.3f} ms" for n in names) + " |")
    for label, row in extra_rows.items():
        cells = []
        for n in names:
            v = row.get(n)
            if v is None:
                cells.append("—")
            elif isinstance(v, tuple):
                cells.append(f"{v[0]:.1f} → {v[1]:.1f} (+{v[1] - v[0]:.1f})")
            else:
                base = row.get("direct")
                cells.append(f"{v:.3f}" + (f" (+{v - base:.3f})" if base is not None and n != "direct" else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    if "latchkey" in names and "direct" in names:
        lines.append("latchkey / direct, round by round (how far the machine drifted):")
        lines.append("")
        for name, *_ in SCENARIOS:
            if (name, "latchkey") in results and (name, "direct") in results:
                lines.append(f"- {name}: {paired(results[(name, 'direct')], results[(name, 'latchkey')])[1]}")
        lines.append("")
    peers = [n for n in names if n not in ("direct", "latchkey")]
    if "latchkey" in names and peers:
        lines.append("latchkey vs peers (throughput ratio, same run):")
        lines.append("")
        for name, *_ in SCENARIOS:
            if (name, "latchkey") not in results:
                continue
            lk = med(results[(name, "latchkey")], "rps")
            lines.append(f"- {name}: " + ", ".join(f"{lk / med(results[(name, p)], 'rps'):.1f}× {p}"
                                                    for p in peers if (name, p) in results))
        lines.append("")
    if soak:
        lines.append(f"Soak (latchkey, keep-alive load, {soak['seconds']} s): RSS {soak['first']:.1f} → "
                     f"{soak['last']:.1f} MiB, peak {soak['peak']:.1f} MiB, fitted slope "
                     f"{soak['slope_mib_per_hour']:+.2f} MiB/hour.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
