#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the real clients the integration
# tests drive (curl, git, Python requests/websockets/grpcio/botocore/google-auth),
# then fmt, clippy and cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
command -v git >/dev/null || need_apt+=(git)
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
# Python clients and servers the integration tests run: requests, websockets, grpcio,
# botocore (the independent SigV4 verifier), google-auth (a real Google client),
# prometheus-client (parses /metrics), opentelemetry-proto (decodes OTLP spans), h2
# (an OpenSSL-based HTTP/2-only upstream, and raw HTTP/2 clients) and biscuit-python
# (another Biscuit library attenuating latchkey's scoped tokens).
python3 -c 'import requests, websockets.sync.client, grpc, botocore, google.auth, prometheus_client, opentelemetry.proto, h2, biscuit_auth' 2>/dev/null ||
  python3 -m pip install -q requests 'websockets>=15' grpcio botocore google-auth prometheus-client opentelemetry-proto h2 biscuit-python

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
