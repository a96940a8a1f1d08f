#!/usr/bin/env bash
# Builds the root filesystem of tern's container workloads as a tarball:
# Debian's busybox-static and images/workload/ (tern-counter built static
# with gcc). Used by runc bundles directly and imported into Docker as
# tern-workload:1 (scripts/docker-image.sh). Idempotent: a tarball built from
# the same files is kept. Prints the tarball's path; the rest goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=/var/cache/tern/workload
tarball=$cache/rootfs.tar
{
busybox=/var/cache/tern/guest/root/bin/busybox
[ -x "$busybox" ] || bash scripts/guest-kernel.sh >/dev/null
sum=$(cat "$busybox" images/workload/* | sha256sum | cut -c1-16)
if [ -f "$tarball" ] && [ "$(cat "$cache/rootfs.sum" 2>/dev/null)" = "$sum" ]; then
    echo "workload rootfs is current ($sum)"
else
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root"/{bin,etc/tern,tmp,proc,sys,dev,run} "$cache"
    chmod 1777 "$root/tmp"
    cp "$busybox" "$root/bin/busybox"
    for app in $("$busybox" --list); do
        [ -e "$root/bin/$app" ] || ln -s busybox "$root/bin/$app"
    done
    install -m 0755 images/workload/tern-workload images/workload/tern-health "$root/bin/"
    gcc -static -O2 -Wall -Werror -o "$root/bin/tern-counter" images/workload/tern-counter.c
    echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"
    echo "root:x:0:" > "$root/etc/group"
    tar -C "$root" -cf "$tarball.new" .
    mv "$tarball.new" "$tarball"
    echo "$sum" > "$cache/rootfs.sum"
    echo "built the workload rootfs ($sum)"
fi
} 1>&2
echo "$tarball"
