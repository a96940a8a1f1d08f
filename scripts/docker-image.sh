#!/usr/bin/env bash
# Builds tern's container test image, `tern-workload:1`, by `docker import` of
# the workload rootfs (scripts/workload-rootfs.sh; no registry is reachable).
# Idempotent: an image imported from the same rootfs is kept. Output goes to stderr.
set -euo pipefail
exec 1>&2
cd "$(dirname "$0")/.."
ref=tern-workload:1
tarball=$(bash scripts/workload-rootfs.sh)
sum=$(cat "$(dirname "$tarball")/rootfs.sum")
if [ "$(docker image inspect -f '{{index .Config.Labels "tern.build"}}' "$ref" 2>/dev/null)" = "$sum" ]; then
    echo "$ref is current ($sum)"
    exit 0
fi
docker import \
    --change 'CMD ["/bin/tern-workload"]' \
    --change "LABEL tern.build=$sum" \
    --change 'ENV PATH=/bin' "$tarball" "$ref" >/dev/null
echo "built $ref ($sum)"
