#!/usr/bin/env bash
# The VMM-level demo (scripts/demo.sh is the agentd one): boot a sandbox (the test guest) on grove-vmm, then fork the running
# sandbox into N children that diverge, and show that each child sees only its own writes.
#   scripts/vmm-demo.sh [N]        (default N = 4)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-4}"
VMM="$PWD/target/release/grove-vmm"
[ -x "$VMM" ] || cargo build --release -p grove-vmm --quiet
GUEST="$(scripts/build-testguest.sh | tail -1)"
WORK="$(mktemp -d /tmp/grove-demo.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Waits until FILE contains PATTERN (at most ~10 s).
wait_for() {
  for _ in $(seq 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "demo: timed out waiting for '$2' in $1" >&2
  return 1
}

echo "== host" >&2
"$VMM" check-host | sed -n 1,3p

echo "== boot: the test guest says hello and resets (exit status 0)" >&2
"$VMM" run --kernel "$GUEST" --cmdline "tg.mode=hello" --mem-mib 128

echo "== boot a long-running sandbox (256 MiB, 64 MiB written) with a control socket" >&2
"$VMM" run --kernel "$GUEST" --cmdline "tg.mode=fork tg.touch_mib=64 tg.idle_us=1000" --mem-mib 256 \
  --api-sock "$WORK/parent.sock" --serial "$WORK/parent.out" 2>"$WORK/parent.err" &
PIDS+=($!)
wait_for "$WORK/parent.out" READY
grep -h boot-timer "$WORK/parent.err" >&2 || true

echo "== fork it: the parent is paused only while the dirty pages are written" >&2
"$VMM" api --api-sock "$WORK/parent.sock" "{\"cmd\":\"fork\",\"dir\":\"$WORK/fork\"}"

echo "== start $N children from the fork; each gets its own identity and writes its own page" >&2
for i in $(seq 1 "$N"); do
  "$VMM" restore --snapshot "$WORK/fork" --identity "$i" --serial "$WORK/child$i.out" \
    2>"$WORK/child$i.err" &
  PIDS+=($!)
done
for i in $(seq 1 "$N"); do
  wait_for "$WORK/child$i.out" "ID=$i "
  echo "child $i: $(grep -o "ID=$i CHECKSUM=0x[0-9a-f]*" "$WORK/child$i.out" | head -1)"
done
kill -0 "${PIDS[0]}" || { echo "demo: the parent died" >&2; exit 1; }
if grep -q 'ID=' "$WORK/parent.out"; then
  echo "demo: a child's write showed up in the parent" >&2
  exit 1
fi
echo "parent : still running, identity 0, none of the children's writes"
echo "== done: $N children diverged from one running parent" >&2
