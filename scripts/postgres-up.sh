#!/usr/bin/env bash
# Starts the local PostgreSQL 15 cluster (installing it if missing) and makes a
# `tern` superuser role with password `tern` for the test suite and benchmarks.
# Idempotent. Prints the admin URL tests use (TERN_TEST_POSTGRES_URL).
set -euo pipefail
# Everything but the final URL goes to stderr, so `URL=$(bash postgres-up.sh)` is clean
# (pg_ctlcluster prints notes such as "Removed stale pid file." on stdout).
exec 3>&1 1>&2
if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null || { apt-get -y --fix-broken install >/dev/null; apt-get install -y -qq postgresql >/dev/null; }
fi
ver=$(ls /usr/lib/postgresql | sort -V | tail -1)
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -q "^$ver main$"; then
    pg_createcluster "$ver" main >/dev/null
fi
if ! pg_lsclusters -h | awk '$1=="'"$ver"'" && $2=="main" {print $4}' | grep -q online; then
    # The server outlives this script: it must not inherit the caller's pipes (fd 3 is the
    # `$(...)` capture, which would otherwise never close and hang the caller forever).
    log=/var/log/postgresql/tern-start.log
    pg_ctlcluster "$ver" main start </dev/null >"$log" 2>&1 3>&- || { cat "$log"; exit 1; }
fi
port=$(pg_lsclusters -h | awk '$1=="'"$ver"'" && $2=="main" {print $3}')
for _ in $(seq 1 50); do
    su postgres -c "psql -p $port -tAc 'select 1'" >/dev/null 2>&1 && break
    sleep 0.2
done
su postgres -c "psql -p $port -tAc \"select 1 from pg_roles where rolname='tern'\"" | grep -q 1 ||
    su postgres -c "psql -p $port -qc \"create role tern login superuser password 'tern'\""
su postgres -c "psql -p $port -tAc \"select 1 from pg_database where datname='tern'\"" | grep -q 1 ||
    su postgres -c "psql -p $port -qc 'create database tern owner tern'"
echo "postgres://tern:tern@127.0.0.1:$port/tern" >&3
