#!/usr/bin/env bash
# One command for the side-by-side benchmark (docs/performance.md). Installs what it
# needs on a Debian machine (nginx, squid-openssl, oha, mitmproxy), builds latchkey in
# release mode, and runs bench/bench.py with the arguments given (--quick for a short run).
set -euo pipefail
cd "$(dirname "$0")/.."
need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need squid; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light squid-openssl openssl >/dev/null
fi
need oha || cargo install oha --locked --version 1.16.0
need mitmdump || python3 -m pip install --quiet 'mitmproxy==11.0.2'
cargo build --release --locked --quiet
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec timeout 3600 python3 bench/bench.py "$@"
