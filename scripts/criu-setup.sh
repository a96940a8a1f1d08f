#!/usr/bin/env bash
# Finds a CRIU that works on this kernel, building CRIU 4.2 when none does.
# Prints the path of the `criu` binary; everything else goes to stderr.
#
# Order: a `criu` on PATH that passes `criu check`; the cached build under
# /var/cache/tern/criu; else a build from the vendored source
# (../shared/vendor/criu-4.2.tar.gz beside the repository, /work/shared/vendor,
# or $TERN_CRIU_SOURCE). Debian 12's own criu (3.17) fails `criu check` on
# newer kernels ("vdso: Unexpected rt vDSO area bounds"), so it is not used.
# Idempotent: a cached build is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=/var/cache/tern/criu
works() { "$1" check >/dev/null 2>&1; }
{
if command -v criu >/dev/null && works "$(command -v criu)"; then
    found=$(command -v criu)
elif [ -x "$cache/criu-4.2/criu/criu" ] && works "$cache/criu-4.2/criu/criu"; then
    found=$cache/criu-4.2/criu/criu
else
    src=""
    for s in "${TERN_CRIU_SOURCE:-}" ../shared/vendor/criu-4.2.tar.gz /work/shared/vendor/criu-4.2.tar.gz; do
        [ -n "$s" ] && [ -f "$s" ] && { src=$s; break; }
    done
    [ -n "$src" ] || { echo "no working criu and no criu-4.2.tar.gz to build one from (set TERN_CRIU_SOURCE)"; exit 1; }
    deps=(libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler python3-protobuf
          pkg-config libnl-3-dev libnet1-dev libcap-dev libbsd-dev libgnutls28-dev libnftables-dev)
    missing=()
    for d in "${deps[@]}"; do dpkg -s "$d" >/dev/null 2>&1 || missing+=("$d"); done
    if [ ${#missing[@]} -gt 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        if ! apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null; then
            apt-get -y --fix-broken install </dev/null
            apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
        fi
    fi
    echo "building CRIU 4.2 from $src (a few minutes)"
    rm -rf "$cache" && mkdir -p "$cache"
    tar xzf "$src" -C "$cache"
    make -C "$cache/criu-4.2" -j"$(nproc)" criu >"$cache/build.log" 2>&1 \
        || { tail -30 "$cache/build.log"; echo "CRIU did not build"; exit 1; }
    found=$cache/criu-4.2/criu/criu
    works "$found" || { "$found" check; echo "the CRIU built here fails criu check"; exit 1; }
fi
echo "criu: $found ($("$found" --version | head -1))"
} 1>&2
echo "$found"
