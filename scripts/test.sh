#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test tier this
# host can run (tests that need something the host lacks print why they skip).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check" >&2
cargo fmt --all --check
(cd vmm/testguest && cargo fmt --check)
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== test guest (unit tests of its parsing and pattern logic, then the ELF)" >&2
(cd vmm/testguest && cargo test --lib --quiet)
GROVE_TESTGUEST="$(scripts/build-testguest.sh | tail -1)"
export GROVE_TESTGUEST
echo "== guest kernel + initramfs (scripts/fetch-kernel.sh)" >&2
scripts/fetch-kernel.sh
echo "== cargo test" >&2
# --show-output: the skip reasons of tests that cannot run on this host are printed.
cargo test --workspace --release -- --show-output 2>&1 | tee /tmp/grove-cargo-test.log
echo "== storage crash-consistency tests (failpoints compiled in)" >&2
cargo test --release -p grove-storage --features failpoints --test catalog_failpoints 2>&1 | tee -a /tmp/grove-cargo-test.log
echo "== guest root image + QEMU smoke test (tcg)" >&2
scripts/build-rootfs.sh
scripts/qemu-smoke.sh
