#!/usr/bin/env bash
# Installs QEMU for the qemu driver (qemu-system-x86; qemu-img from
# qemu-utils) when missing. Idempotent. Output goes to stderr.
set -euo pipefail
exec 1>&2
export DEBIAN_FRONTEND=noninteractive
install() {
    if ! apt-get install -y -q --no-install-recommends "$@" </dev/null; then
        apt-get -y --fix-broken install </dev/null
        apt-get install -y -q --no-install-recommends "$@" </dev/null
    fi
}
updated=
# qemu-system-x86 first: installing it may remove a qemu-utils of another
# release (a backport), taking qemu-img away; qemu-utils is checked after.
if ! command -v qemu-system-x86_64 >/dev/null; then
    apt-get update -qq && updated=1
    install qemu-system-x86
fi
if ! command -v qemu-img >/dev/null; then
    [ -n "$updated" ] || apt-get update -qq
    install qemu-utils
fi
for tool in qemu-system-x86_64 qemu-img; do
    command -v "$tool" >/dev/null || { echo "QEMU setup: $tool is still missing"; exit 1; }
done
qemu-system-x86_64 --version | head -1
