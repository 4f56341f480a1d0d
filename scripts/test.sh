#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test tier (docs/testing.md).
# A test that needs something this host lacks fails, unless GROVE_ALLOW_SKIP names it: this
# script allows `load` and, where the kernel has no device-mapper, `dm` (the dm-thin tests
# then run in the test host tier instead). The test host tier (Linux guests under grove-vmm,
# scripts/testhost.sh) always runs; GROVE_SKIP_TESTHOST=<reason> is the explicit opt-out.
set -euo pipefail
cd "$(dirname "$0")/.."
t_start=$(date +%s)
# `load`: vmm/tests/idle.rs compares the CPU use of two guests and cannot judge when other
# work saturates the cores (this project's machines are shared); it says so in the log.
export GROVE_ALLOW_SKIP="${GROVE_ALLOW_SKIP:+$GROVE_ALLOW_SKIP,}load"
if [ ! -e /dev/mapper/control ] && ! grep -qw device-mapper /proc/misc 2>/dev/null; then
  export GROVE_ALLOW_SKIP="${GROVE_ALLOW_SKIP:+$GROVE_ALLOW_SKIP,}dm"
  echo "test: no device-mapper here: dm tests may skip (GROVE_ALLOW_SKIP=$GROVE_ALLOW_SKIP); the test host tier runs them" >&2
fi

echo "== cargo fmt --check" >&2
cargo fmt --all --check
(cd vmm/testguest && cargo fmt --check)
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== grove-vmm links no sled, devicemapper or bindgen" >&2
if cargo tree -p grove-vmm -e normal,build --prefix none | grep -E '^(sled|devicemapper|bindgen) '; then
  echo "grove-vmm must not depend on the crates above (memory layers come from grove-memory)" >&2
  exit 1
fi
echo "== fuzz crates compile (standalone workspaces; cargo +nightly fuzz run <target> runs them)" >&2
for d in vmm/fuzz storage/fuzz proto/fuzz; do
  CARGO_TARGET_DIR=target/fuzz-check cargo check --quiet --manifest-path "$d/Cargo.toml" --bins
done
echo "== test guest (unit tests of its parsing and pattern logic, then the ELF)" >&2
(cd vmm/testguest && cargo test --lib --quiet)
GROVE_TESTGUEST="$(scripts/build-testguest.sh | tail -1)"
export GROVE_TESTGUEST
echo "== guest kernel + initramfs (scripts/fetch-kernel.sh)" >&2
scripts/fetch-kernel.sh
echo "== cargo test" >&2
# --show-output: the skip reasons of tests that cannot run on this host are printed.
cargo test --workspace --release -- --show-output 2>&1 | tee /tmp/grove-cargo-test.log
echo "== netd: nothing left behind by the tests (namespaces, links, BPF programs, pins)" >&2
scripts/netd-leakcheck.sh
echo "== storage crash-consistency tests (failpoints compiled in)" >&2
cargo test --release -p grove-storage --features failpoints --test catalog_failpoints 2>&1 | tee -a /tmp/grove-cargo-test.log
echo "== agentd crash-consistency tests (kill -9 at failpoints in fork, create, delete)" >&2
cargo test --release -p grove-agentd --features failpoints --test restart -- --show-output 2>&1 | tee -a /tmp/grove-cargo-test.log
echo "== Python client (clients/python): pytest against a real agentd with the test guest" >&2
# build/pyenv is scripts/setup.sh's; the client is reinstalled from this tree first.
[ -x build/pyenv/bin/python ] || { echo "test: build/pyenv is missing (scripts/setup.sh makes it)" >&2; exit 1; }
PIP_CACHE_DIR="${GROVE_CACHE:-/var/cache/grove}/pip" build/pyenv/bin/pip install -q \
  --disable-pip-version-check ./clients/python
build/pyenv/bin/python -m pytest -q -p no:cacheprovider clients/python/tests 2>&1 | tee /tmp/grove-pytest.log
echo "== guest root image + QEMU smoke test (tcg)" >&2
scripts/build-rootfs.sh
scripts/qemu-smoke.sh
mkdir -p build
echo "== test host tier: Linux guests under grove-vmm on the test host's KVM (scripts/testhost.sh)" >&2
if [ -n "${GROVE_SKIP_TESTHOST:-}" ]; then
  echo "test: TEST HOST TIER NOT RUN: GROVE_SKIP_TESTHOST=$GROVE_SKIP_TESTHOST" >&2
else
  th_pass=0; th_fail=0
  for sc in ${GROVE_TESTHOST_SCENARIOS:-hello boot fork dmthin devices blk vsock net agentd agentd-python jail}; do
    t0=$(date +%s)
    st=0; scripts/testhost.sh "$sc" >"build/testhost-$sc.log" 2>&1 || st=$?
    # One rerun, loudly, the first log kept, for two failures that are not the scenario's
    # verdict (docs/testing.md); a second one fails the tier:
    # - status 75: the test host's own kernel died under QEMU's emulation;
    # - a guest under grove-vmm triple-faulted. Both were QEMU's nested SVM emulation handing
    #   a guest the test host's own state on a VMRUN (its KVM trace shows the guest at the
    #   test host's kvm_amd code); seen with a 2-vCPU test host, never in 14 runs with the
    #   1-vCPU default (docs/testing.md). The rule stays as a net, loudly.
    what=""
    if [ "$st" -eq 75 ]; then
      what="died"; msg="THE TEST HOST DIED"
    elif [ "$st" -ne 0 ] && grep -qs 'guest shut down (triple fault) at rip 0xfff0' "build/testhost/$sc"/*.err; then
      what="triplefault"; msg="A GUEST TRIPLE-FAULTED"
    fi
    if [ -n "$what" ]; then
      cp "build/testhost-$sc.log" "build/testhost-$sc.$what.log"
      echo "testhost $sc: $msg ($(( $(date +%s) - t0 )) s; build/testhost-$sc.$what.log); running it once more" >&2
      if [ "$what" = triplefault ]; then
        { grep -v '^\[' "build/testhost-$sc.log" || true; } | tail -15 >&2
      fi
      st=0; scripts/testhost.sh "$sc" >"build/testhost-$sc.log" 2>&1 || st=$?
    fi
    if [ "$st" -eq 0 ]; then
      th_pass=$((th_pass + 1)); echo "testhost $sc: ok ($(( $(date +%s) - t0 )) s)" >&2
    else
      th_fail=$((th_fail + 1)); echo "testhost $sc: FAILED ($(( $(date +%s) - t0 )) s); last lines of build/testhost-$sc.log:" >&2
      grep -v '^\[' "build/testhost-$sc.log" | tail -40 >&2
    fi
  done
  echo "testhost: $th_pass passed, $th_fail failed" >&2
  [ "$th_fail" -eq 0 ] || exit 1
fi
echo "test: all tiers done in $(( $(date +%s) - t_start )) s" >&2
