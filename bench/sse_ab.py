#!/usr/bin/env python3
"""SSE first-event latency of several latchkey builds in one run, alternating (bench.py's
`sse_first_byte`, 100 requests per build per round). Usage:
    python3 bench/sse_ab.py BUILD_A BUILD_B [BUILD_C ...]
Found the regression noted in docs/performance.md (2026-12-02)."""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench as B  # noqa: E402

builds = sys.argv[1:]
args = argparse.Namespace(latchkey=builds[0], rounds=1, duration=1, soak=0, idle=0, only="latchkey",
                          baseline=None, quick=False)
work = Path(tempfile.mkdtemp(prefix="sse-ab-"))
work.chmod(0o755)
b = B.Bench(work, args)
try:
    b.certs()
    b.start_nginx()
    # Not named `latchkey`: that name gets the transparent listener and the admin view.
    ts = [b.start_latchkey(f"build{i}", p) for i, p in enumerate(builds)]
    for r in range(3):
        print(" ".join(f"{p}: {B.sse_first_byte(b, t, 100):.3f} ms" for p, t in zip(builds, ts)), flush=True)
finally:
    b.stop_all()
