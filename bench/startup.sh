#!/usr/bin/env bash
# Time from `latchkey run` to the first proxied response, with a cold CA (generated
# at start) and a warm one. Loopback only; everything started here is stopped here.
# Usage: bench/startup.sh [runs]   (needs a release build: cargo build --release)
set -euo pipefail
runs=${1:-10}
bin=${LATCHKEY_BIN:-$(dirname "$0")/../target/release/latchkey}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

python3 -m http.server 0 --bind 127.0.0.1 --directory "$work" >"$work/http.log" 2>&1 &
for _ in $(seq 50); do
  up=$(grep -o 'port [0-9]*' "$work/http.log" | head -1 | cut -d' ' -f2 || true)
  [ -n "$up" ] && break; sleep 0.1
done
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/config.toml" <<TOML
[proxy]
port = $port
ca_dir = "$work/ca"
allow_private = ["127.0.0.0/8"]
[credentials.demo]
header = "x-demo"
value = "demo"
allow_http = true
domains = ["127.0.0.1:$up"]
TOML
chmod 600 "$work/config.toml"

measure() { # prints milliseconds from spawn to the first 200 through the proxy
  local start end
  start=$(date +%s%N)
  HOME="$work" "$bin" run --config "$work/config.toml" 2>/dev/null &
  local pid=$!
  until curl -s -o /dev/null -w '%{http_code}' -x "http://127.0.0.1:$port" "http://127.0.0.1:$up/" 2>/dev/null | grep -q 200; do :; done
  end=$(date +%s%N)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo $(( (end - start) / 1000000 ))
}

cold=(); warm=()
for _ in $(seq "$runs"); do
  rm -rf "$work/ca"; cold+=("$(measure)")
  warm+=("$(measure)")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "runs: $runs"
echo "cold CA (generated at start): median $(median "${cold[@]}") ms  [${cold[*]}]"
echo "warm CA (loaded from disk):   median $(median "${warm[@]}") ms  [${warm[*]}]"
