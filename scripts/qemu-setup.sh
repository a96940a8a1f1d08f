#!/usr/bin/env bash
# Installs QEMU for the qemu driver (qemu-system-x86; qemu-img from
# qemu-utils) when missing. Idempotent. Output goes to stderr.
set -euo pipefail
exec 1>&2
export DEBIAN_FRONTEND=noninteractive
want=()
command -v qemu-system-x86_64 >/dev/null || want+=(qemu-system-x86)
command -v qemu-img >/dev/null || want+=(qemu-utils)
[ ${#want[@]} -eq 0 ] && { qemu-system-x86_64 --version | head -1; exit 0; }
apt-get update -qq
if ! apt-get install -y -q --no-install-recommends "${want[@]}" </dev/null; then
    apt-get -y --fix-broken install </dev/null
    apt-get install -y -q --no-install-recommends "${want[@]}" </dev/null
fi
qemu-system-x86_64 --version | head -1
