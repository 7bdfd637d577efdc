#!/usr/bin/env python3
"""What a request costs latchkey, in units that survive a noisy machine (issue 20).

Three measurements, each against the same nginx upstream bench/bench.py starts:

  --cpu        CPU µs per request of the client (oha's rusage), the origin and latchkey
               in the same run: utime+stime from /proc/<pid>/stat over a fixed number of
               requests sent by `oha -n` (keep-alive, HTTP/1.1 and HTTP/2 clients, a new
               connection per request), next to the client and origin alone (direct),
               with the machine's busy share. CPU time, not wall time: other processes
               slow a run down but do not add to its CPU time (caches and frequency still
               move it a few percent). The last column is the proxy's budget: the CPU per
               request it may spend for SPEC 8's ratio to direct on this machine, the
               client and origin costing what they did (throughput = busy x cores / CPU
               per request, solved for the proxy's share). `--nginx-proxy` adds nginx as
               a TLS-terminating reverse proxy (the yardstick); `--origin rustls` puts
               examples/origin.rs in nginx's place as the origin (a rustls handshake,
               like latchkey's, instead of OpenSSL 3.0's; docs/performance.md). The
               proxy's context switches per request are shown too (voluntary /
               involuntary); `--threads N` adds latchkey with `[proxy] threads = N`.
  --callgrind  instructions per request under `valgrind --tool=callgrind`: latchkey is
               started afresh under callgrind for N=100 and N=300 requests of each kind
               (one client connection, sequential), and (Ir(300) - Ir(100)) / 200 is the
               per-request cost, start-up, handshakes and the first upstream connection
               cancelling out. Deterministic to within ~1%: use it to judge a change.
  --download   instructions per 1 MiB download under callgrind (bench.py's `/1m.bin`, 5
               and 45 downloads on one connection): the bulk path's cost, which the
               wall-clock 1 MiB row cannot judge on a noisy machine.
  --features   the same instruction counts for what a feature adds: a scoped token in the
               slot vs the plain placeholder, one live-view watcher vs none (SPEC 8 rows),
               DLP on vs off, the built-in providers loaded beside one credential.
  --idle N     RSS of a fresh latchkey before and after N idle intercepted keep-alive
               connections (each served one request), the SPEC 8 row; then the same
               with HTTP/2 clients, in another fresh latchkey.

`--baseline PATH` measures an earlier build the same way in the same run (A/B).
Everything binds to 127.0.0.1; every process started here is stopped here by PID.

    cargo build --release && python3 bench/cpu.py --callgrind
    python3 bench/cpu.py --cpu --requests 50000 --baseline /tmp/latchkey-main
    cargo build --release --example origin && python3 bench/cpu.py --cpu --nginx-proxy --origin rustls
"""

import argparse
import json
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402

KEEP = None  # --keep: where callgrind profiles are copied

# The request kinds of the fixed mix: name, extra oha arguments.
KINDS = [
    ("HTTP/1.1 keep-alive", ()),
    ("HTTP/2 keep-alive", ("--http2",)),
    # What agents send most: a JSON body up (a Content-Length upload), a short answer back.
    ("HTTP/1.1 keep-alive, 1 KiB POST", ("-m", "POST", "-H", "content-type: application/json", "-d", "{\"p\":\"" + "x" * 1014 + "\"}")),
    # A TCP connection, CONNECT and a TLS handshake per request (the "new connection" row).
    ("HTTP/1.1 new connection per request", ("--disable-keepalive",)),
]

# `--features`: what a feature adds to an HTTP/1.1 keep-alive request, each pair measured
# the same way (SPEC 8: a scoped token >= 0.9x a plain placeholder; the live view with a
# watcher >= 0.95x without). Extra oha arguments are made once latchkey has started (the
# token is minted then); "watch" keeps one live-view client reading GET /api/events; "dlp"
# turns `[proxy.dlp]` on (built-in rules, block; SPEC 8: keep-alive >= 0.9x off);
# "providers" loads the built-in provider table beside the bench's credential (what a
# config without `[credentials]` gets): what each configured credential costs a request.
FEATURE_KINDS = [
    ("HTTP/1.1, plain placeholder in the slot", lambda bench: ("-H", "x-api-key: latchkey-bench"), ""),
    ("HTTP/1.1, scoped token in the slot", lambda bench: ("-H", f"x-api-key: {bench.token}"), ""),
    ("HTTP/1.1, no live-view watcher", lambda bench: (), ""),
    ("HTTP/1.1, one live-view watcher", lambda bench: (), "watch"),
    ("HTTP/1.1, DLP off", lambda bench: (), ""),
    ("HTTP/1.1, DLP on", lambda bench: (), "dlp"),
    ("HTTP/1.1, one credential", lambda bench: (), ""),
    ("HTTP/1.1, and the 20 built-in providers", lambda bench: (), "providers"),
]


def oha_n(bench, t, url, n, conns, extra, ca):
    """`n` requests on `conns` connections; fails loudly unless every one got a 200.
    Returns oha's report and the CPU seconds oha itself spent (the client's share)."""
    cmd = ["oha", "-n", str(n), "-c", str(conns), "--no-tui", "--output-format", "json", "--cacert", str(ca),
           *extra]
    if t.proxy:
        cmd += ["-x", t.proxy]
    if t.reverse:
        url = url.replace(f"127.0.0.1:{bench.up_port}", f"127.0.0.1:{t.reverse}", 1)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    d = json.loads(out.stdout)
    ok = d.get("statusCodeDistribution", {}).get("200", 0)
    if ok != n:
        raise SystemExit(f"{t.name}: {ok} of {n} requests answered 200: {d.get('errorDistribution')}")
    client = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return d, client


def ticks(pid):
    return b.cpu_ticks(b.tree(pid))


def switches(pid):
    """(voluntary, involuntary) context switches of every thread of `pid`'s tree so far:
    a proxy whose threads are preempted (involuntary) pays for the switch and for the
    caches the other process cooled (docs/performance.md, eighteenth session)."""
    vol = inv = 0
    for p in b.tree(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                status = (task / "status").read_text()
            except OSError:
                continue  # a thread that ended in between
            for line in status.splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    inv += int(line.split()[1])
    return vol, inv


# SPEC 8's ratios to direct, for the budget column of `--cpu`.
SPEC_RATIO = {"HTTP/1.1 keep-alive": 0.5, "HTTP/2 keep-alive": 0.6, "HTTP/1.1 new connection per request": 0.55}


def busy():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f)


def cpu_rows(bench, targets, nginx_pid, args):
    """CPU µs per request of the client, the origin and the proxy, median over rounds,
    targets alternating; and the proxy's budget: what it may spend per request for the
    SPEC's ratio to direct on this machine, the client and origin costing what they did."""
    kinds = [k for k in KINDS if args.match in k[0]]
    url = f"https://127.0.0.1:{bench.up_port}/"
    runs = {}
    for r in range(args.rounds):
        for kind, extra in kinds:
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for t in order:
                ca = t.ca if t.proxy else bench.work / "up-ca.pem"
                oha_n(bench, t, url, 2000, args.conns, extra, ca)  # warm: connections, pools, caches
                s0 = switches(t.pid) if t.pid else (0, 0)
                p0, n0, m0 = (ticks(t.pid) if t.pid else 0), ticks(nginx_pid), busy()
                d, client = oha_n(bench, t, url, args.requests, args.conns, extra, ca)
                p1, n1, m1 = (ticks(t.pid) if t.pid else 0), ticks(nginx_pid), busy()
                s1 = switches(t.pid) if t.pid else (0, 0)
                per = lambda ticks: ticks / b.HZ / args.requests * 1e6  # noqa: E731
                row = {"rps": d["summary"]["requestsPerSec"], "client": client / args.requests * 1e6,
                       "origin": per(n1 - n0), "proxy": per(p1 - p0), "busy": (m1[0] - m0[0]) / (m1[1] - m0[1]),
                       "vol": (s1[0] - s0[0]) / args.requests, "invol": (s1[1] - s0[1]) / args.requests}
                runs.setdefault((kind, t.name), []).append(row)
                print(f"# round {r + 1} {kind} {t.name}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()),
                      file=sys.stderr)
    lines = [f"CPU µs per request ({args.requests} requests, {args.conns} connections, median of {args.rounds}; "
             "client: oha's rusage; origin and proxy: /proc/<pid>/stat utime+stime; busy: the machine's "
             "non-idle share, /proc/stat; proxy switches: its threads' voluntary / involuntary context "
             "switches per request, /proc/<pid>/task/*/status):", "",
             "| request kind | target | req/s (× direct) | client | origin | proxy | all | busy | "
             "proxy switches | proxy budget for the SPEC ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, _ in kinds:
        med = {t.name: {k: statistics.median(x[k] for x in runs[(kind, t.name)])
                        for k in runs[(kind, t.name)][0]} for t in targets}
        direct = med["direct"]
        for t in targets:
            m = med[t.name]
            total = m["client"] + m["origin"] + m["proxy"]
            proxy = f"{m['proxy']:.1f}" if t.pid else "—"
            switched = f"{m['vol']:.2f} / {m['invol']:.2f}" if t.pid else "—"
            budget = "—"
            if t.pid and kind in SPEC_RATIO:
                # Throughput is busy × cores / CPU per request; solve the ratio for the proxy's share.
                allowed = (direct["client"] + direct["origin"]) * m["busy"] / direct["busy"] / SPEC_RATIO[kind]
                budget = f"{allowed - m['client'] - m['origin']:.1f} µs for {SPEC_RATIO[kind]}×"
            lines.append(f"| {kind} | {t.name} | {m['rps']:.0f} ({m['rps'] / direct['rps']:.2f}×) | "
                         f"{m['client']:.1f} | {m['origin']:.1f} | {proxy} | "
                         f"{total:.1f} | {100 * m['busy']:.0f}% | {switched} | {budget} |")
    return "\n".join(lines) + "\n"


def callgrind_ir(bench, name, binary, n, extra, mode="", path=""):
    """Total instructions latchkey executed from start to exit, serving n requests for
    the origin's `/{path}`. `extra` may be a function of the bench (called once latchkey
    runs); `mode` "watch" keeps one live-view watcher reading while the requests are
    served, "dlp" turns on `[proxy.dlp]`, "providers" loads the built-in provider table."""
    out = bench.work / f"callgrind.{name}.{n}.{time.monotonic_ns()}.out"
    # aws-lc seeds its random generator once per process from CPU jitter: ~430 million
    # instructions (over 90% of a 300-request run) whose count varies by millions from
    # run to run, as much as the requests themselves. Not counting inside it leaves the
    # requests' difference alone. (--toggle-collect turns collecting at start off, so
    # --collect-atstart must come after it.)
    jitter = ["--toggle-collect=tree_jitter_initialize_once"]
    wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
               *jitter, "--collect-atstart=yes"]
    # The feature rows need the admin listener and the minted token: the "latchkey" instance.
    proxy_extra = {"dlp": '[proxy.dlp]\nenabled = true\naction = "block"', "providers": "builtin_providers = true"}
    t = bench.start_latchkey("latchkey" if callable(extra) else name, binary, wrapper=wrapper,
                             proxy_extra=proxy_extra.get(mode, ""))
    url = f"https://127.0.0.1:{bench.up_port}/{path}"
    watcher = None
    try:
        if callable(extra):
            extra = extra(bench)
        if mode == "watch":
            token = (bench.work / "admin.token").read_text().strip()
            watcher = b.Watchers(bench.admin_port, token, 1)
        oha_n(bench, t, url, n, 1, extra, t.ca)
        if watcher:
            time.sleep(0.5)  # the last batch of events goes out
            if not watcher.bytes:
                raise SystemExit("the live-view watcher received nothing")
    finally:
        if watcher:
            watcher.close()
        proc = next(p for nm, p in bench.procs if p.pid == t.pid)
        proc.terminate()
        proc.wait(timeout=120)
    text = out.read_text()
    if KEEP:
        shutil.copy(out, KEEP / out.name)
    m = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
    if not m:
        raise SystemExit(f"no totals in {out}")
    return int(m.group(1))


def callgrind_rows(bench, builds, args, kinds=None):
    lines = [f"Instructions per request under callgrind ((Ir(N={args.n_big}) - Ir(N={args.n_small})) / "
             f"{args.n_big - args.n_small}, one connection, "
             "sequential):", "", "| request kind | " + " | ".join(n for n, _ in builds) + " |",
             "|---|" + "---|" * len(builds)]
    for kind, extra, *mode in kinds or KINDS:
        cells = []
        mode = mode[0] if mode else ""
        for name, binary in builds:
            small = callgrind_ir(bench, name, binary, args.n_small, extra, mode)
            big = callgrind_ir(bench, name, binary, args.n_big, extra, mode)
            per = (big - small) / (args.n_big - args.n_small)
            print(f"# {kind} {name}: Ir({args.n_small})={small} Ir({args.n_big})={big} → {per:,.0f}/request",
                  file=sys.stderr)
            cells.append(f"{per:,.0f}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def download_rows(bench, builds, small=5, big=45):
    """Instructions per 1 MiB download: fewer downloads than requests, each a thousand
    requests' worth of TLS records."""
    lines = [f"Instructions per 1 MiB download under callgrind ((Ir(N={big}) - Ir(N={small})) / {big - small}, "
             "one connection, sequential):", "", "| | " + " | ".join(n for n, _ in builds) + " |",
             "|---|" + "---|" * len(builds)]
    cells = []
    for name, binary in builds:
        lo = callgrind_ir(bench, name, binary, small, (), path="1m.bin")
        hi = callgrind_ir(bench, name, binary, big, (), path="1m.bin")
        per = (hi - lo) / (big - small)
        print(f"# 1 MiB download {name}: Ir({small})={lo} Ir({big})={hi} → {per:,.0f}/download", file=sys.stderr)
        cells.append(f"{per:,.0f}")
    lines.append("| 1 MiB download | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def idle_rows(bench, builds, n):
    lines = [f"RSS of a fresh process before → after {n} idle intercepted connections (MiB):", ""]
    for name, binary in builds:
        t = bench.start_latchkey(name, binary)
        time.sleep(1)
        before, after = b.idle_connections(bench, t, n)
        lines.append(f"- {name}: {before:.1f} → {after:.1f} (+{after - before:.1f}, "
                     f"{(after - before) * 1024 / n:.1f} KiB per connection)")
        t = bench.start_latchkey(name + "-h2", binary)
        time.sleep(1)
        before, after = b.idle_connections(bench, t, n, http2=True)
        lines.append(f"- {name}, HTTP/2 clients: {before:.1f} → {after:.1f} (+{after - before:.1f}, "
                     f"{(after - before) * 1024 / n:.1f} KiB per connection)")
    return "\n".join(lines) + "\n"


def start_rustls_origin(bench):
    """`examples/origin.rs` in nginx's place as the origin (`--origin rustls`): the same
    paths, the handshake latchkey does. Returns its pid."""
    binary = b.ROOT / "target" / "release" / "examples" / "origin"
    if not binary.exists():
        raise SystemExit(f"{binary} is missing: cargo build --release --example origin")
    port = b.free_port()
    p = bench.spawn("origin", [str(binary), f"127.0.0.1:{port}", str(bench.work / "up.pem"),
                               str(bench.work / "up.key"), b.SECRET])
    b.wait_port(port)
    bench.up_port = port
    return p.pid


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--callgrind", action="store_true")
    ap.add_argument("--idle", type=int, default=0, metavar="N")
    ap.add_argument("--download", action="store_true", help="callgrind: instructions per 1 MiB download")
    ap.add_argument("--features", action="store_true",
                    help="callgrind rows: plain placeholder vs scoped token, live view unwatched vs watched")
    # What still varies between runs (the leaf key generated at start-up, threads) is ~1%
    # at the default N: a larger difference between the two runs divides it down.
    ap.add_argument("--n-small", type=int, default=100, help="requests in the smaller callgrind run")
    ap.add_argument("--n-big", type=int, default=300, help="requests in the larger callgrind run")
    ap.add_argument("--match", default="", help="only the request kinds whose name contains this")
    ap.add_argument("--requests", type=int, default=50000, help="requests per --cpu run")
    ap.add_argument("--conns", type=int, default=32, help="connections per --cpu run")
    ap.add_argument("--rounds", type=int, default=3, help="--cpu rounds")
    ap.add_argument("--latchkey", type=Path, default=b.ROOT / "target" / "release" / "latchkey")
    ap.add_argument("--baseline", type=Path, default=None, help="an earlier build, measured the same way")
    ap.add_argument("--nginx-proxy", action="store_true",
                    help="--cpu: measure nginx as a TLS-terminating reverse proxy too (the yardstick)")
    ap.add_argument("--threads", type=int, default=None,
                    help="--cpu: also measure latchkey with `[proxy] threads` set to this")
    ap.add_argument("--origin", choices=["nginx", "rustls"], default="nginx",
                    help="the origin: the bench's nginx (OpenSSL 3.0), or examples/origin.rs (rustls)")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables here")
    ap.add_argument("--keep", type=Path, default=None,
                    help="copy each callgrind profile here (for callgrind_annotate --inclusive=yes)")
    args = ap.parse_args()
    global KEEP
    KEEP = args.keep
    if KEEP:
        KEEP.mkdir(parents=True, exist_ok=True)
    if not (args.cpu or args.callgrind or args.idle or args.features or args.download):
        ap.error("choose at least one of --cpu, --callgrind, --download, --features, --idle N")
    builds = [("latchkey", args.latchkey)] + ([("baseline", args.baseline)] if args.baseline else [])

    work = Path(tempfile.mkdtemp(prefix="latchkey-cpu-"))
    work.chmod(0o755)
    args.no_jail = True
    bench = b.Bench(work, args)
    out = []
    try:
        bench.certs()
        bench.start_nginx()
        nginx_pid = next(p.pid for name, p in bench.procs if name == "nginx")
        if args.origin == "rustls":
            nginx_pid = start_rustls_origin(bench)
        if args.callgrind:
            out.append(callgrind_rows(bench, builds, args, [k for k in KINDS if args.match in k[0]]))
        if args.features:
            out.append(callgrind_rows(bench, builds, args, [k for k in FEATURE_KINDS if args.match in k[0]]))
        if args.download:
            out.append(download_rows(bench, builds))
        if args.idle:
            out.append(idle_rows(bench, builds, args.idle))
        if args.cpu:
            targets = [b.Target("direct", None, None, None)]
            targets += [bench.start_latchkey(name, binary) for name, binary in builds]
            if args.threads:
                name, extra = f"latchkey-threads-{args.threads}", f"threads = {args.threads}"
                targets.append(bench.start_latchkey(name, args.latchkey, proxy_extra=extra))
            if args.nginx_proxy:
                targets.append(bench.start_nginx_proxy())
            for t in targets:
                b.verify_injection(bench, t)
            out.append(cpu_rows(bench, targets, nginx_pid, args))
    finally:
        bench.stop_all()
    text = "\n".join(out)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
