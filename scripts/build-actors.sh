#!/usr/bin/env bash
# Builds the example actors written in C into wasm32 modules:
#   scripts/build-actors.sh [OUT_DIR]   (default target/actors)
# With clang --target=wasm32 and lld's wasm-ld (Debian packages clang and
# lld, installed when missing); no libc, no Rust wasm target. Idempotent: a
# module newer than its source is kept.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/target/actors}"
mkdir -p "$out"
if ! command -v clang >/dev/null || ! command -v wasm-ld >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends clang lld </dev/null >/dev/null \
        || { apt-get -y --fix-broken install >/dev/null; apt-get install -y -qq --no-install-recommends clang lld </dev/null >/dev/null; }
fi
for src in "$root"/crates/tern-actors/actors/*.c; do
    wasm="$out/$(basename "${src%.c}").wasm"
    if [ "$wasm" -nt "$src" ]; then continue; fi
    clang --target=wasm32 -O2 -nostdlib -fno-builtin -Wall -Werror \
        -Wl,--no-entry -o "$wasm.tmp" "$src"
    mv "$wasm.tmp" "$wasm"
    echo "built $wasm"
done
