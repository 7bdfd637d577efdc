#!/usr/bin/env python3
"""Scale and soak runs for latchkey (issue 20, SPEC 8), against bench/bench.py's nginx.

  --connections N  N concurrent keep-alive client connections, each through CONNECT with
                   TLS intercepted, requests flowing on all of them for --duration
                   seconds (oha -c N). Reports errors (target: none), peak RSS (target
                   < 300 MiB for 10,000), peak open descriptors (showing the N were open
                   at once). The run's config raises max_connections (default 4,096) and
                   max_connections_per_client above N.
  --soak S         S seconds of moderate keep-alive load (--conns connections, --rate
                   requests/s), sampling RSS and open descriptors every --every seconds;
                   reports both fitted slopes (per hour) after the first 10% (warm-up).
                   The target is flat: the lead runs --soak 3600; --soak 300 checks the
                   script.

Long runs: the lead runs them, not CI. Everything binds to 127.0.0.1; every process
started here is stopped here by PID; the file-descriptor limit is raised for the
children (`ulimit -n` 65536 or the hard limit).

    cargo build --release && python3 bench/scale.py --connections 10000 --duration 60
    python3 bench/scale.py --soak 3600
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Samples:
    """(seconds, RSS MiB, open descriptors) of one process, every `every` seconds."""

    def __init__(self, pid, every):
        self.pid, self.every, self.rows = pid, every, []
        self._stop = threading.Event()

    def __enter__(self):
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.every):
            self.rows.append((time.monotonic() - self.t0, b.rss_kib([self.pid]) / 1024, open_fds(self.pid)))

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def slope_per_hour(points):
    n = len(points)
    if n < 2:
        return 0.0
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / max(sxx, 1e-9) * 3600


def oha(t, url, args, timeout):
    cmd = ["oha", "--no-tui", "--output-format", "json", "--cacert", str(t.ca), "-x", t.proxy, *args, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    try:
        d = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"oha failed: {out.stderr[-500:]}")
    codes = d.get("statusCodeDistribution", {})
    ok = codes.get("200", 0)
    bad = sum(v for k, v in codes.items() if k != "200")
    # oha stops the requests still in flight when -z runs out: not errors of the proxy.
    errors = {k: v for k, v in (d.get("errorDistribution") or {}).items() if "deadline" not in k}
    return ok, bad, errors, d


def pct(d, which):
    """A latency percentile of oha's JSON, in ms."""
    v = (d.get("latencyPercentiles") or {}).get(which)
    return f"{v * 1000:.0f} ms" if v is not None else "?"


def scale(bench, t, args):
    url = f"https://127.0.0.1:{bench.up_port}/"
    base_rss, base_fds = b.rss_kib([t.pid]) / 1024, open_fds(t.pid)
    with Samples(t.pid, 0.5) as s:
        ok, bad, errors, d = oha(t, url, ["-c", str(args.connections), "-z", f"{args.duration}s"],
                                 args.duration + 300)
    peak_rss = max((r for _, r, _ in s.rows), default=0)
    peak_fds = max((f for _, _, f in s.rows), default=0)
    verdict = "met" if not bad and not errors and peak_rss < 300 else "missed"
    return "\n".join([
        f"{args.connections} concurrent keep-alive connections through CONNECT, TLS intercepted, "
        f"{args.duration} s (oha -c {args.connections}):",
        "",
        f"- requests: {ok:,} answered 200 ({ok / args.duration:,.0f}/s); other statuses {bad} "
        f"{ {k: v for k, v in d.get('statusCodeDistribution', {}).items() if k != '200'} or ''}; "
        f"errors {sum(errors.values())} {errors if errors else ''}",
        f"- latency p50 {pct(d, 'p50')} / p99 {pct(d, 'p99')} / max {d.get('summary', {}).get('slowest', 0) * 1000:.0f} ms",
        f"- latchkey RSS {base_rss:.1f} MiB idle → peak {peak_rss:.1f} MiB (target < 300 MiB: {verdict})",
        f"- latchkey open descriptors {base_fds} idle → peak {peak_fds} "
        f"(client + upstream sockets: ≥ {args.connections} means they were all open at once)",
        "",
    ])


def soak(bench, t, args):
    url = f"https://127.0.0.1:{bench.up_port}/"
    with Samples(t.pid, args.every) as s:
        ok, bad, errors, _ = oha(t, url, ["-c", str(args.conns), "-q", str(args.rate), "-z", f"{args.soak}s"],
                                 args.soak + 300)
    rows = [r for r in s.rows if r[0] > args.soak * 0.1]
    rss = [(x, r) for x, r, _ in rows]
    fds = [(x, f) for x, _, f in rows]
    if not rows:
        return "soak: too short to fit\n"
    return "\n".join([
        f"Soak: {args.soak} s, {args.conns} keep-alive connections at {args.rate} requests/s "
        f"({ok:,} answered 200; other statuses {bad}; errors {sum(errors.values())}):",
        "",
        f"- RSS {rows[0][1]:.1f} → {rows[-1][1]:.1f} MiB (peak {max(r for _, r in rss):.1f}), "
        f"fitted slope {slope_per_hour(rss):+.2f} MiB/hour",
        f"- open descriptors {rows[0][2]} → {rows[-1][2]} (peak {max(f for _, f in fds)}), "
        f"fitted slope {slope_per_hour(fds):+.1f}/hour",
        "",
    ])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=0, metavar="N")
    ap.add_argument("--duration", type=int, default=60)
    ap.add_argument("--soak", type=int, default=0, metavar="SECONDS")
    ap.add_argument("--conns", type=int, default=32, help="soak connections")
    ap.add_argument("--rate", type=int, default=1000, help="soak requests per second")
    ap.add_argument("--every", type=float, default=5.0, help="soak sampling interval, seconds")
    ap.add_argument("--latchkey", type=Path, default=b.ROOT / "target" / "release" / "latchkey")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--upstream", type=int, default=0, help="max_upstream_connections (default: N + 1024, as fits)")
    args = ap.parse_args()
    if not (args.connections or args.soak):
        ap.error("choose --connections N and/or --soak SECONDS")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(65536, hard) if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    # Each process has its own limit: latchkey holds the N client sockets plus its upstream
    # pool, oha the N client sockets, nginx the pool's other ends. Where the hard limit is
    # below 2N (an unprivileged sandbox), the pool is capped to fit: requests then share
    # fewer upstream connections, which the run reports.
    upstream = min(args.upstream or args.connections + 1024, want - args.connections - 1024)
    if upstream < 64:
        raise SystemExit(f"{args.connections} connections need more than {want} descriptors")

    work = Path(tempfile.mkdtemp(prefix="latchkey-scale-"))
    work.chmod(0o755)
    args.no_jail = True
    bench = b.Bench(work, args)
    bench.nginx_connections = max(8192, upstream + 1024)
    limit = max(4096, args.connections + 1024)
    extra = (f"[proxy.limits]\nmax_connections = {limit}\nmax_connections_per_client = {limit}\n"
             f"max_upstream_connections = {upstream}\n")
    print(f"# descriptor limit {want}: max_upstream_connections = {upstream}", file=sys.stderr)
    out = []
    try:
        bench.certs()
        bench.start_nginx()
        t = bench.start_latchkey("latchkey", args.latchkey, tail=extra)
        b.verify_injection(bench, t)
        if args.connections:
            out.append(scale(bench, t, args))
        if args.soak:
            out.append(soak(bench, t, args))
    finally:
        bench.stop_all()
    text = "\n".join(out)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
