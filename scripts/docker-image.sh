#!/usr/bin/env bash
# Builds tern's container test image, `tern-workload:1`, by `docker import` of
# a rootfs made here (no registry is reachable): Debian's busybox-static and
# the workload in images/workload/. Idempotent: an image built from the same
# files is kept. Output goes to stderr.
set -euo pipefail
exec 1>&2
cd "$(dirname "$0")/.."
ref=tern-workload:1
busybox=/var/cache/tern/guest/root/bin/busybox
[ -x "$busybox" ] || bash scripts/guest-kernel.sh >/dev/null
sum=$(cat "$busybox" images/workload/* | sha256sum | cut -c1-16)
if [ "$(docker image inspect -f '{{index .Config.Labels "tern.build"}}' "$ref" 2>/dev/null)" = "$sum" ]; then
    echo "$ref is current ($sum)"
    exit 0
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,etc/tern,tmp,proc,sys,dev,run}
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for app in $("$busybox" --list); do
    [ -e "$root/bin/$app" ] || ln -s busybox "$root/bin/$app"
done
install -m 0755 images/workload/* "$root/bin/"
echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"
tar -C "$root" -c . | docker import \
    --change 'CMD ["/bin/tern-workload"]' \
    --change "LABEL tern.build=$sum" \
    --change 'ENV PATH=/bin' - "$ref" >/dev/null
echo "built $ref ($sum)"
