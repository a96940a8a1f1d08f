#!/usr/bin/env bash
# Installs (Debian's docker.io) and starts the Docker Engine when it is not
# answering, then builds tern's container test image (scripts/docker-image.sh).
# Idempotent. Prints the engine's socket path; everything else goes to stderr.
#
# The engine is started without a default bridge and without iptables rules:
# tern's containers run with no network (or in namespaces tern makes), and a
# test machine's host network is left as it was.
set -euo pipefail
cd "$(dirname "$0")/.."
sock=${TERN_DOCKER_SOCKET:-/var/run/docker.sock}
{
if ! command -v dockerd >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if ! apt-get install -y -q docker.io </dev/null; then
        apt-get -y --fix-broken install </dev/null
        apt-get install -y -q docker.io </dev/null
    fi
fi
if ! docker -H "unix://$sock" info >/dev/null 2>&1; then
    log=/var/log/tern-dockerd.log
    echo "starting dockerd (log: $log)"
    nohup dockerd -H "unix://$sock" --bridge=none --iptables=false --ip-masq=false \
        >"$log" 2>&1 </dev/null &
    for _ in $(seq 1 60); do
        docker -H "unix://$sock" info >/dev/null 2>&1 && break
        sleep 1
    done
    docker -H "unix://$sock" info >/dev/null 2>&1 || { tail -20 "$log"; echo "dockerd did not start"; exit 1; }
fi
docker -H "unix://$sock" version --format 'Docker Engine {{.Server.Version}} (API {{.Server.APIVersion}})'
DOCKER_HOST="unix://$sock" bash scripts/docker-image.sh
} 1>&2
echo "$sock"
