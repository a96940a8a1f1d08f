#!/usr/bin/env bash
# The demo: `tern demo` runs the fleet on this machine: a control plane
# (`tern up --driver agents`, SQLite), three host agents that join it (the
# control plane's CA signs their certificates; peers come from heartbeats),
# six test guests the scheduler places across them, host-a drained live with
# a progress bar per migration, and a summary of where every VM went, each
# checked on arrival (counter advancing, working-set checksum right). Needs
# /dev/kvm. The control-plane walk through the HTTP API
# (mock driver) is scripts/api-walk.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v gcc >/dev/null || { apt-get update -qq && apt-get install -y -qq gcc >/dev/null; }
cargo build --release --locked -q -p tern
exec target/release/tern demo
