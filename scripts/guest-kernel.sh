#!/usr/bin/env bash
# Fetches Debian's stock kernel (linux-image-amd64) and busybox-static for
# Linux guests, without installing them on the host: the packages are
# downloaded and unpacked into a cache directory. Idempotent.
# Also builds a busybox initramfs whose /init prints "tern-ready" on the
# console and then either runs tern's guest workload (`tern_load=1` on the
# kernel command line: guest/tern-load.c, built static with the host's gcc),
# holds a shell (TERN_HOLD) or powers the guest off. Prints "KERNEL INITRD"
# (paths) on stdout; everything else goes to stderr.
set -euo pipefail
exec 3>&1 1>&2
cache=${TERN_GUEST_CACHE:-/var/cache/tern/guest}
# Resolved before any cd: $0 may be a relative path.
repo="$(cd "$(dirname "$0")/.." && pwd)"
load_src="$repo/guest/tern-load.c"
mkdir -p "$cache"
if ! ls "$cache"/root/boot/vmlinuz-* >/dev/null 2>&1 || [ ! -x "$cache/root/bin/busybox" ]; then
    export DEBIAN_FRONTEND=noninteractive
    cd "$cache"
    # The meta package names the current kernel image package.
    apt-get update -qq
    image=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$image" ] || { echo "cannot resolve linux-image-amd64"; exit 1; }
    rm -f ./*.deb
    apt-get download -qq "$image" busybox-static
    for deb in ./*.deb; do dpkg-deb -x "$deb" root; done
    rm -f ./*.deb
fi
kernel=$(ls "$cache"/root/boot/vmlinuz-* | sort -V | tail -1)
initrd="$cache/initramfs.cpio"
if [ ! -s "$initrd" ] || [ "$repo/scripts/guest-kernel.sh" -nt "$initrd" ] || [ "$load_src" -nt "$initrd" ]; then
    command -v gcc >/dev/null || { apt-get update -qq && apt-get install -y -qq gcc libc6-dev; }
    tree=$(mktemp -d)
    mkdir -p "$tree"/{bin,proc,sys,dev}
    cp "$cache/root/bin/busybox" "$tree/bin/busybox"
    gcc -static -O2 -Wall -Wextra -Werror -o "$tree/bin/tern-load" "$load_src"
    for app in sh mount echo cat poweroff sleep; do ln -sf busybox "$tree/bin/$app"; done
    cat > "$tree/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev 2>/dev/null
echo "tern-ready: $(cat /proc/uptime)"
[ -n "$tern_load" ] && exec /bin/tern-load
[ -n "$TERN_HOLD" ] && exec /bin/busybox sh
/bin/busybox poweroff -f
INIT
    chmod +x "$tree/init"
    (cd "$tree" && find . | "$cache/root/bin/busybox" cpio -o -H newc 2>/dev/null) > "$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
    rm -rf "$tree"
fi
echo "$kernel $initrd" >&3
