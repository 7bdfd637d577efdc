#!/usr/bin/env python3
"""Instructions latchkey spends per request with `[proxy.dlp]` off and on, under
valgrind's callgrind (a count, not a timing: it means something on a busy machine,
where the wall-clock rows of bench.py do not).

For each setting, latchkey (release build) runs under callgrind; curl sends WARM
requests, then callgrind's counters are zeroed and N requests are sent one at a time over
one keep-alive connection (curl reuses it; its TLS handshake is counted, shared by the N); the instructions counted from the zeroing
to the end are divided by N. Two loads, as bench.py's DLP rows: 1 MiB JSON uploads, and
small GETs (keep-alive). Every process started here is stopped here, by PID.

usage: bench/callgrind_dlp.py [--latchkey target/release/latchkey] [-n 20]
"""

import argparse
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import http.server
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench import upload_body  # noqa: E402  (the same body as the wall-clock row)

HOST = "upload.test"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def certs(w):
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", *ec, "-keyout", w / "ca.key", "-out", w / "ca.pem", "-days", "1",
        "-subj", "/CN=callgrind CA")
    run("openssl", "req", *ec, "-keyout", w / "up.key", "-out", w / "up.csr", "-subj", f"/CN={HOST}")
    (w / "ext").write_text(f"subjectAltName=DNS:{HOST}\nextendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", w / "up.csr", "-CA", w / "ca.pem", "-CAkey", w / "ca.key",
        "-CAcreateserial", "-out", w / "up.pem", "-days", "1", "-extfile", w / "ext")


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        left = int(self.headers.get("content-length") or 0)
        while left:
            left -= len(self.rfile.read(min(left, 1 << 16)))
        self.reply()

    def do_GET(self):
        self.reply()

    def reply(self):
        self.send_response(200)
        self.send_header("content-length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *a):
        pass


def upstream(w):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(w / "up.pem", w / "up.key")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv.server_address[1]


def measure(args, w, up_port, dlp, load):
    port = free_port()
    name = f"{'on' if dlp else 'off'}-{load}"
    conf = w / f"{name}.toml"
    extra = '[proxy.dlp]\nenabled = true\naction = "block"\n' if dlp else ""
    # As in bench.py: a credential for the host, so both settings intercept and inject.
    conf.write_text(f'[proxy]\nport = {port}\nca_dir = "{w}/lk-ca"\n{extra}'
                    f'[upstream]\nca_file = "{w}/ca.pem"\n[upstream.resolve]\n"{HOST}:443" = "127.0.0.1:{up_port}"\n'
                    f'[credentials.bench]\nheader = "x-api-key"\nvalue = "${{BENCH_SECRET}}"\ndomains = ["{HOST}"]\n')
    conf.chmod(0o600)
    out = w / f"callgrind.{name}"
    p = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                          str(args.latchkey), "run", "--config", str(conf)],
                         stdout=subprocess.DEVNULL, stderr=open(w / f"{name}.log", "w"),
                         env=dict(os.environ, RUST_LOG="warn", HOME=str(w), BENCH_SECRET="bench-secret-value-0123456789"), start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or p.poll() is not None:
                    raise SystemExit(f"latchkey did not start: {(w / f'{name}.log').read_text()}")
                time.sleep(0.5)

        def curl(n):
            url = f"https://{HOST}/upload" if load == "upload" else f"https://{HOST}/"
            cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}\n", "--proxy", f"http://127.0.0.1:{port}",
                   "--cacert", f"{w}/lk-ca/ca.crt"]
            for i in range(n):
                if i:
                    cmd.append("--next")
                    cmd += ["-sS", "-o", "/dev/null", "-w", "%{http_code}\n", "--proxy", f"http://127.0.0.1:{port}",
                            "--cacert", f"{w}/lk-ca/ca.crt"]
                if load == "upload":
                    cmd += ["-H", "content-type: application/json", "--data-binary", f"@{w}/upload.json"]
                cmd.append(url)
            codes = subprocess.run(cmd, capture_output=True, text=True, timeout=1800).stdout.split()
            if codes != ["200"] * n:
                raise SystemExit(f"{name}: {codes}")

        n = args.n if load == "upload" else args.n_small
        curl(args.warm)
        subprocess.run(["callgrind_control", "--zero", str(p.pid)], check=True, capture_output=True)
        curl(n)
        subprocess.run(["callgrind_control", "--dump", str(p.pid)], check=True, capture_output=True)
    finally:
        os.killpg(p.pid, signal.SIGINT)
        p.wait(timeout=120)
    dumps = sorted(w.glob(f"callgrind.{name}*"))
    totals = []
    for d in dumps:
        m = re.search(r"^summary: (\d+)", d.read_text(errors="replace"), re.M) or \
            re.search(r"^totals: (\d+)", d.read_text(errors="replace"), re.M)
        if m:
            totals.append((d, int(m.group(1))))
    # The explicit dump (after zeroing) is the measured part.
    measured = [t for d, t in totals if d.name != f"callgrind.{name}"] or [totals[-1][1]]
    return measured[0] / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latchkey", type=Path, default=ROOT / "target" / "release" / "latchkey")
    ap.add_argument("-n", type=int, default=20, help="1 MiB uploads measured")
    ap.add_argument("--n-small", type=int, default=200, help="small GETs measured (the connection's handshake is shared by them)")
    ap.add_argument("--warm", type=int, default=3)
    args = ap.parse_args()
    w = Path(tempfile.mkdtemp(prefix="latchkey-callgrind-"))
    certs(w)
    (w / "upload.json").write_bytes(upload_body(1 << 20))
    up_port = upstream(w)
    rows = []
    for load in ["upload", "small"]:
        off = measure(args, w, up_port, False, load)
        on = measure(args, w, up_port, True, load)
        rows.append((load, off, on))
        print(f"# {load}: off {off:,.0f} on {on:,.0f} instructions/request", file=sys.stderr)
    print("| load | DLP off (Ir/request) | DLP on | off / on |\n|---|---|---|---|")
    for load, off, on in rows:
        label = "1 MiB JSON upload" if load == "upload" else "small GET, keep-alive"
        print(f"| {label} | {off:,.0f} | {on:,.0f} | {off / on:.2f} |")


if __name__ == "__main__":
    main()
