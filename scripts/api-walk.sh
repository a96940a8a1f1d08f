#!/usr/bin/env bash
# The API walk: starts `tern up` with the mock driver in a scratch data dir and walks
# through the API with curl: create, get, list, configure, another tenant's 404,
# a missing token's 401, a restart that keeps the VM, delete, and the metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in curl jq; do
    command -v $tool >/dev/null || { apt-get update -qq && apt-get install -y -qq $tool >/dev/null; }
done
cargo build --release --locked -q -p tern
TERN=$PWD/target/release/tern
DATA=$(mktemp -d /tmp/tern-demo.XXXXXX)
export TERN_DATA=$DATA TERN_LOG=warn TERN_POOL_SIZE=2
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

start() {
    "$TERN" up --driver mock --listen 127.0.0.1:0 > "$DATA/up.out" &
    PID=$!
    for _ in $(seq 1 100); do grep -q listening "$DATA/up.out" 2>/dev/null && break; sleep 0.1; done
    BASE=$(sed -n 's/^tern: API listening on //p' "$DATA/up.out")
    echo "tern up (pid $PID) serving $BASE, data in $DATA"
}
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
call() { # METHOD PATH TOKEN [BODY]
    local args=(-s -o /tmp/tern-demo-body -w '%{http_code}' -X "$1" "$BASE$2")
    [ -n "$3" ] && args+=(-H "Authorization: Bearer $3")
    [ $# -ge 4 ] && args+=(-H 'Content-Type: application/json' -d "$4")
    local code; code=$(curl "${args[@]}")
    echo "HTTP $code"; [ -s /tmp/tern-demo-body ] && jq . /tmp/tern-demo-body 2>/dev/null || cat /tmp/tern-demo-body; echo
}

start
ALICE=$("$TERN" token --tenant alice --permissions vms:read,vms:write)
BOB=$("$TERN" token --tenant bob --permissions vms:read,vms:write)
sleep 0.5   # let the reconciler fill the warm pool

step "alice creates a VM (claimed from the warm pool)"
call POST /api/v1/vms "$ALICE" '{"config":{"settings":{"MODE":"demo"},"allowed_tools":["git"]}}'
ID=$(jq -r .id /tmp/tern-demo-body)
step "alice gets it";               call GET "/api/v1/vms/$ID" "$ALICE"
step "alice lists her VMs";         call GET /api/v1/vms "$ALICE"
step "alice configures it";         call POST "/api/v1/vms/$ID/configure" "$ALICE" '{"allowed_tools":["git","curl"]}'
step "bob cannot see it (404)";     call GET "/api/v1/vms/$ID" "$BOB"
step "no token (401)";              call GET /api/v1/vms ""
step "restart tern up";             kill "$PID"; wait "$PID" || true; start
step "the VM is still there";       call GET "/api/v1/vms/$ID" "$ALICE"
step "alice deletes it (204)";      call DELETE "/api/v1/vms/$ID" "$ALICE"
step "gone (404)";                  call GET "/api/v1/vms/$ID" "$ALICE"
step "metrics (excerpt)"
curl -s -H "Authorization: Bearer $(cat "$DATA/metrics-token")" "$BASE/metrics" | grep -E '^tern_(warm_pool|provisions|vms\{)' || true
echo; echo "demo finished"
