#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the real clients the integration
# tests drive (curl, git, Node, Claude Code, Python requests/websockets/grpcio/botocore/
# google-auth/anthropic, nftables for exec --jail, podman, kubectl, systemd-analyze,
# redis-server, squid, gnome-keyring, Chromium + Playwright for the live view),
# then fmt, clippy and cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
command -v git >/dev/null || need_apt+=(git)
command -v prlimit >/dev/null || need_apt+=(util-linux)
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)
# exec --jail: nft (the jail's redirect rules), script/setpriv/unshare (TTY, nobody and
# no-user-namespace tests), Node (fetch, and the Claude Code CLI).
command -v nft >/dev/null || need_apt+=(nftables)
command -v script >/dev/null || need_apt+=(bsdutils)
command -v setpriv >/dev/null || need_apt+=(util-linux)
command -v node >/dev/null || need_apt+=(nodejs npm)
# Transparent mode (tests/transparent.rs): `ip netns` and veth pairs, plus nft above.
command -v ip >/dev/null || need_apt+=(iproute2)
# Containers (tests/container.rs): podman with runc, podman-compose for compose.yaml,
# strip for the image's binary. Kubernetes manifests (tests/deploy.rs): kubectl's
# kustomize. The systemd unit: systemd-analyze. setpriv: the Secret-mount test.
command -v podman >/dev/null || need_apt+=(podman)
command -v runc >/dev/null || need_apt+=(runc)
command -v podman-compose >/dev/null || need_apt+=(podman-compose)
command -v strip >/dev/null || need_apt+=(binutils)
command -v kubectl >/dev/null || command -v kustomize >/dev/null || need_apt+=(kubernetes-client)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
# Many replicas, one state (tests/cluster.rs): the tests start their own redis-server.
command -v redis-server >/dev/null || need_apt+=(redis-server)
# Issue 19: squid as the corporate proxy (tests/corporate_proxy.rs; openssl makes its
# password file), gnome-keyring + secret-tool under dbus-run-session (tests/keyring.rs).
command -v squid >/dev/null || need_apt+=(squid-openssl)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v gnome-keyring-daemon >/dev/null || need_apt+=(gnome-keyring)
command -v secret-tool >/dev/null || need_apt+=(libsecret-tools)
command -v dbus-run-session >/dev/null || need_apt+=(dbus-daemon)
# The live view's browser test (tests/live_view.rs): Debian's Chromium, driven by
# Playwright from PyPI (tests/requirements.txt) with executable_path=/usr/bin/chromium.
command -v chromium >/dev/null || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
# Python clients and servers the integration tests run (tests/requirements.txt).
python3 -m pip install -q --disable-pip-version-check -r tests/requirements.txt
# The real Claude Code CLI, run jailed against a loopback fake of the Messages API.
command -v claude >/dev/null || npm install -g --silent @anthropic-ai/claude-code

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
