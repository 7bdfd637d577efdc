#!/usr/bin/env python3
"""Other clients' throughput while one client floods latchkey over HTTP/2 (issue 20:
others keep at least 0.5× their normal rate).

For each attack of tests/py/h2_flood.py (run from inside an intercepted tunnel to the
nginx upstream bench/bench.py starts): `oha` on keep-alive connections through the
same latchkey for DURATION seconds with nobody flooding, then for DURATION seconds
while the flood runs; the share is the second rate over the first. Rounds alternate
nothing else, so a change in the machine's load between the two windows moves the
share: take the median over rounds, and read it next to `cargo test`'s own share
(tests/staying_up.rs, which asserts only 0.25 because a loaded machine moves it).
The flooding client is a Python process: on a 2-core machine it takes a core that
oha and latchkey would otherwise share, which the share includes.

    cargo build --release && python3 bench/floods.py --rounds 3 --duration 5
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402

ATTACKS = ["rapid_reset", "continuation", "hpack_bomb", "ping_flood_again", "settings_flood_again",
           "zero_window", "idle_streams"]
FLOOD = b.ROOT / "tests" / "py" / "h2_flood.py"


def flood(t, up_port, attack, seconds):
    port = t.proxy.rsplit(":", 1)[1]
    return subprocess.Popen([sys.executable, str(FLOOD), port, f"127.0.0.1:{up_port}", attack, str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latchkey", type=Path, default=b.ROOT / "target" / "release" / "latchkey")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5, help="seconds per window")
    ap.add_argument("--conns", type=int, default=4, help="oha's keep-alive connections")
    ap.add_argument("--http2", action="store_true", help="oha speaks HTTP/2 (default HTTP/1.1)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.no_jail = True
    work = Path(tempfile.mkdtemp(prefix="latchkey-floods-"))
    work.chmod(0o755)
    bench = b.Bench(work, args)
    extra = ("--http2",) if args.http2 else ()
    rows = []
    try:
        bench.certs()
        bench.start_nginx()
        t = bench.start_latchkey()
        b.verify_injection(bench, t)
        url = f"https://127.0.0.1:{bench.up_port}/"
        for attack in ATTACKS:
            shares, quiet_rates, flood_rates, results = [], [], [], []
            for r in range(args.rounds):
                quiet = b.oha(bench, t, url, args.conns, args.duration, extra)
                p = flood(t, bench.up_port, attack, args.duration + 1)
                during = b.oha(bench, t, url, args.conns, args.duration, extra)
                out, err = p.communicate(timeout=120)
                if p.returncode != 0:
                    raise SystemExit(f"{attack}: the flood failed: {err}")
                results.append(json.loads(out))
                if not quiet or not during:
                    raise SystemExit(f"{attack}: oha got no 200s")
                shares.append(during["rps"] / quiet["rps"])
                quiet_rates.append(quiet["rps"])
                flood_rates.append(during["rps"])
                print(f"# {attack} round {r + 1}: {quiet['rps']:.0f}/s quiet, {during['rps']:.0f}/s during "
                      f"({shares[-1]:.2f}); errors during {during['errors']}; {results[-1]}", file=sys.stderr)
            last = results[-1]
            if "goaways" in last:
                ended = f"{last['connections']} connections: {sorted(set(map(str, last['goaways'])))}"
            else:
                ended = last["goaway"] if last["goaway"] is not None else ("closed" if last["closed"] else "none")
            rows.append(f"| {attack} | {statistics.median(quiet_rates):,.0f} | {statistics.median(flood_rates):,.0f} "
                        f"| **{statistics.median(shares):.2f}×** (min {min(shares):.2f}) | {ended} |")
    finally:
        bench.stop_all()
    kind = "HTTP/2" if args.http2 else "HTTP/1.1"
    text = "\n".join([
        f"Another client's rate during each flood ({kind}, {args.conns} keep-alive connections, "
        f"{args.duration} s windows, median of {args.rounds}):", "",
        "| flood | quiet req/s | during req/s | share | offender's GOAWAY codes (last round) |",
        "|---|---|---|---|---|", *rows]) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
