#!/usr/bin/env bash
# The demo: `tern demo` starts two host agents on this machine (mutual TLS,
# Ed25519 host keys), boots tern's test guest on the first, and live-migrates
# it to the second while it rewrites its working set, with a progress bar and
# the final report. Needs /dev/kvm. The control-plane walk through the HTTP API
# (mock driver) is scripts/api-walk.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v gcc >/dev/null || { apt-get update -qq && apt-get install -y -qq gcc >/dev/null; }
cargo build --release --locked -q -p tern
exec target/release/tern demo
