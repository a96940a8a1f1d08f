#!/usr/bin/env bash
# Fetches Debian's stock kernel (linux-image-amd64) and busybox-static for
# Linux guests, without installing them on the host: the packages are
# downloaded and unpacked into a cache directory. Idempotent.
# Also builds a busybox initramfs whose /init prints "tern-ready" on the
# console and powers the guest off. Prints "KERNEL INITRD" (paths) on stdout;
# everything else goes to stderr.
set -euo pipefail
exec 3>&1 1>&2
cache=${TERN_GUEST_CACHE:-/var/cache/tern/guest}
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
if [ ! -s "$initrd" ] || [ "$0" -nt "$initrd" ]; then
    tree=$(mktemp -d)
    mkdir -p "$tree"/{bin,proc,sys,dev}
    cp "$cache/root/bin/busybox" "$tree/bin/busybox"
    for app in sh mount echo cat poweroff sleep; do ln -sf busybox "$tree/bin/$app"; done
    cat > "$tree/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
echo "tern-ready: $(cat /proc/uptime)"
[ -n "$TERN_HOLD" ] && exec /bin/busybox sh
/bin/busybox poweroff -f
INIT
    chmod +x "$tree/init"
    (cd "$tree" && find . | "$cache/root/bin/busybox" cpio -o -H newc 2>/dev/null) > "$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
    rm -rf "$tree"
fi
echo "$kernel $initrd" >&3
