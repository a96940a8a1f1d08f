#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs and starts what the tests need
# (PostgreSQL, a guest kernel), checks formatting and lints, then runs every test including the
# slow ones (marked #[ignore] so a plain `cargo test` stays quick).
# Exits non-zero when anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."

# Disk is the scarce thing on CI machines: no incremental caches, and a line per stage
# saying how much is left so a full disk is diagnosed from the log.
export CARGO_INCREMENTAL=0
disk() { echo "   (disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free, target $(du -sh target 2>/dev/null | cut -f1))"; }

# Setup is mostly downloads, dpkg and daemons starting: it runs in the background
# while fmt, clippy and the test build use the CPUs, and its log is printed when
# the tests need what it made. Each stage line says the minutes since the start.
t0=$SECONDS
stage() { echo "== $* (at $(( (SECONDS - t0) / 60 )) min $(( (SECONDS - t0) % 60 )) s)"; }
setup_env=$(mktemp)
setup_log=$(mktemp)
setup() {
    set -euo pipefail
    echo "== setup: PostgreSQL"
    local v
    v=$(bash scripts/postgres-up.sh); echo "TERN_TEST_POSTGRES_URL=$v" >>"$setup_env"
    echo "== setup: guest kernel and initramfs (Debian's linux-image-amd64, busybox-static)"
    local kernel initrd
    read -r kernel initrd < <(bash scripts/guest-kernel.sh)
    [ -n "$kernel" ] && [ -n "$initrd" ]
    echo "TERN_GUEST_KERNEL=$kernel" >>"$setup_env"
    echo "TERN_GUEST_INITRD=$initrd" >>"$setup_env"
    echo "== setup: QEMU (qemu-system-x86) for the qemu driver's Linux guests"
    bash scripts/qemu-setup.sh
    echo "== setup: Docker Engine (docker.io) and tern's container image, for the docker driver"
    v=$(bash scripts/docker-up.sh); echo "TERN_DOCKER_SOCKET=$v" >>"$setup_env"
    echo "== setup: CRIU (one that passes criu check; built from the vendored 4.2 source otherwise) and the workload rootfs"
    v=$(bash scripts/criu-setup.sh); echo "TERN_CRIU=$v" >>"$setup_env"
    v=$(bash scripts/workload-rootfs.sh); echo "TERN_WORKLOAD_ROOTFS=$v" >>"$setup_env"
    echo "== setup: the C example actors (clang --target=wasm32, lld)"
    bash scripts/build-actors.sh "$PWD/target/actors"
    echo "TERN_ACTORS_WASM_DIR=$PWD/target/actors" >>"$setup_env"
    # (A failing command substitution stops the setup only as an assignment, hence v.)
    # A container's new host announces its address with gratuitous ARP.
    command -v arping >/dev/null || { apt-get update -qq && apt-get install -y -qq iputils-arping >/dev/null; }
    echo "== setup: cargo-fuzz"
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked -q
    echo "== setup: done"
}
disk
stage "setup starts in the background (log follows before the tests)"
( setup ) >"$setup_log" 2>&1 </dev/null &
setup_pid=$!

stage "fmt"
cargo fmt --all -- --check
stage "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
disk
stage "test build"
cargo test --workspace --locked --no-run
disk
stage "waiting for setup"
if ! wait "$setup_pid"; then
    cat "$setup_log"; echo "setup failed"; exit 1
fi
cat "$setup_log"
set -a
# shellcheck disable=SC1090
source "$setup_env"
set +a
rm -f "$setup_env" "$setup_log"
export TERN_REQUIRE_POSTGRES=1      # store tests must not skip here
export TERN_REQUIRE_GUEST_KERNEL=1  # the loader tests must not skip here
export TERN_REQUIRE_QEMU=1          # the qemu driver tests must not skip here
export TERN_REQUIRE_DOCKER=1        # the docker driver tests must not skip here
export TERN_REQUIRE_CRIU=1          # the checkpoint/restore tests must not skip here
export TERN_REQUIRE_C_ACTORS=1      # the C actor tests must not skip here
stage "tests (including slow ones)"
cargo test --workspace --locked --no-fail-fast -- --include-ignored
disk
stage "container move figures (short: one run per side)"
# Downtime of a container writing 50 MiB/s over 512 MiB, moved by tern
# (precopy, and postcopy's lazy dump) against a plain CRIU dump + copy +
# restore in the same run; the full benchmark takes --runs 5.
cargo build --locked -q -p tern-bench
target/debug/tern-bench migrate-container --runs 1 2>&1 | grep -v " INFO \| WARN "
disk
# The fuzz build is a second tree (~1 GB); on a nearly full disk the test build
# makes room for it.
if [ "$(df --output=avail -k . | tail -1)" -lt 4000000 ]; then
    echo "   (under 4 GB free: removing target/debug before the fuzz build)"
    rm -rf target/debug
fi
stage "fuzz: every decoder of network input, ${TERN_FUZZ_SECONDS:-25} s each"
# Stable toolchain only here: RUSTC_BOOTSTRAP lets cargo-fuzz pass its -Z flags
# (cargo-fuzz itself was installed by the setup).
# Build every target first: a target that does not compile fails the run here
# (the run loop below only filters the fuzzer's output).
# (Not a pipeline into grep: under `set -e -o pipefail` a grep that finds no
# error would itself fail the run.)
fuzz_log=$(mktemp)
# Built with cargo-fuzz's defaults (optimised, with debug assertions and
# overflow checks), as `cargo fuzz run` builds: with `-O` here every run
# rebuilt the whole tree once more (about 10 minutes of CI).
if ! (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build >"$fuzz_log" 2>&1); then
    grep -E "^(error|Error)" -A8 "$fuzz_log" || tail -40 "$fuzz_log"
    echo "fuzz targets do not build"; exit 1
fi
rm -f "$fuzz_log"
for target in page_frame transport_wire snapshot_state migrate_protocol \
    api_bodies control_socket journal_replay configs guest_output boot_image memory_file transport_receiver \
    checkpoint_archive actor_checkpoint actor_protocol; do
    corpus=$(mktemp -d)
    (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "$corpus" "seeds/$target" -- \
        -max_total_time="${TERN_FUZZ_SECONDS:-25}" -print_final_stats=1 2>&1 | grep -E "^(Done|stat::number_of_executed_units)|SUMMARY|panicked|ERROR" || true)
    # cargo fuzz exits non-zero on a crash; re-check for artifacts to fail loudly.
    if ls fuzz/artifacts/"$target"/crash-* >/dev/null 2>&1; then
        echo "fuzz target $target found a crash: fuzz/artifacts/$target"; exit 1
    fi
    rm -rf "$corpus"
done
disk
stage "all tests passed"
