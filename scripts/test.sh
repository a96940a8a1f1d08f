#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs and starts what the tests need
# (PostgreSQL), checks formatting and lints, then runs every test including the
# slow ones (marked #[ignore] so a plain `cargo test` stays quick).
# Exits non-zero when anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== setup: PostgreSQL"
TERN_TEST_POSTGRES_URL=$(bash scripts/postgres-up.sh)
export TERN_TEST_POSTGRES_URL
export TERN_REQUIRE_POSTGRES=1   # store tests must not skip here

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests (including slow ones)"
cargo test --workspace --locked -- --include-ignored
echo "== all tests passed"
