#!/usr/bin/env bash
# The main job: boot a sandbox from the test guest (and, once snapshots land, fork it).
set -euo pipefail
cd "$(dirname "$0")/.."
VMM=target/release/grove-vmm
[ -x "$VMM" ] || cargo build --release -p grove-vmm --quiet
GUEST="$(scripts/build-testguest.sh | tail -1)"
echo "== host" >&2
"$VMM" check-host
echo "== boot the test guest (hello)" >&2
"$VMM" run --kernel "$GUEST" --cmdline "tg.mode=hello" --mem-mib 128
