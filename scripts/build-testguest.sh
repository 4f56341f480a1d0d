#!/usr/bin/env bash
# Builds the freestanding test guest (vmm/testguest, release) and prints the
# absolute path of its ELF as the LAST line of stdout; everything else goes to
# stderr. Usage: GROVE_TESTGUEST="$(scripts/build-testguest.sh | tail -1)"
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/vmm/testguest"

# The guest has its own target dir and its own rustflags (.cargo/config.toml):
# a caller's CARGO_TARGET_DIR or RUSTFLAGS must not leak into it.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_BUILD_TARGET
export CARGO_TARGET_DIR="$dir/target"

(cd "$dir" && cargo build --release --quiet) >&2
elf="$CARGO_TARGET_DIR/release/grove-testguest"
if [ ! -f "$elf" ]; then
  echo "build-testguest: $elf was not produced" >&2
  exit 1
fi
echo "$elf"
