#!/usr/bin/env bash
# The short tour of Grove through its node agent: start agentd, register the test guest as
# a template and warm it, create a sandbox, fork it into 4 children (each with its own
# identity), list them, delete everything, stop agentd.
#   scripts/demo.sh            (as root, or as a user with sudo)
# agentd runs as root (KVM, its data directory); its data directory and socket are
# temporary and removed at the end. scripts/vmm-demo.sh is the same story one level down,
# driving grove-vmm's control socket directly.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "demo: run as root, or install sudo" >&2; exit 1; }
  SUDO=sudo
fi
BIN="$PWD/target/release"
for b in agentd grove grove-vmm; do
  [ -x "$BIN/$b" ] || { cargo build --release -p grove-agentd -p grove-vmm --quiet; break; }
done
GUEST="$(scripts/build-testguest.sh | tail -1)"
WORK="$(mktemp -d /tmp/grove-demo.XXXXXX)"
chmod 755 "$WORK"
SOCK="$WORK/agentd.sock"
DATA="$WORK/data"
G=($SUDO "$BIN/grove" --endpoint "unix:$SOCK")

cleanup() {
  set +e
  if [ -f "$WORK/agentd.pid" ]; then $SUDO kill "$(cat "$WORK/agentd.pid")" 2>/dev/null; sleep 0.2; fi
  # VMMs outlive agentd by design (a restart adopts them): the demo stops its own.
  for p in "$DATA"/vmm/*/pid; do
    [ -f "$p" ] || continue
    pid="$(cat "$p")"
    if $SUDO grep -qa "$DATA" "/proc/$pid/cmdline" 2>/dev/null; then $SUDO kill -9 "$pid"; fi
  done
  $SUDO rm -rf "$WORK"
}
trap cleanup EXIT

echo "== start agentd (data in $DATA)" >&2
$SUDO sh -c "echo \$\$ > '$WORK/agentd.pid'; exec '$BIN/agentd' --data-dir '$DATA' --listen 'unix:$SOCK' \
  --metrics-listen '' --vmm '$BIN/grove-vmm' --pool-size 4 2>'$WORK/agentd.log'" &
for _ in $(seq 200); do [ -S "$SOCK" ] && break; sleep 0.05; done
[ -S "$SOCK" ] || { echo "demo: agentd did not start:" >&2; $SUDO cat "$WORK/agentd.log" >&2; exit 1; }
"${G[@]}" node info

echo "== register the test guest as a template and warm it (boot, wait for READY, snapshot)" >&2
"${G[@]}" template add demo --kernel "$GUEST" --cmdline "tg.mode=fork tg.touch_mib=64 tg.idle_us=1000" \
  --memory-mib 256 --ready serial:READY >/dev/null
"${G[@]}" template warm demo
"${G[@]}" template ls

echo "== create a sandbox from it (a restore into a standby VMM)" >&2
ID="$("${G[@]}" create --template demo --label demo=parent)"
echo "$ID"

echo "== fork it into 4 children" >&2
"${G[@]}" fork "$ID" --count 4 --label demo=child

echo "== list" >&2
"${G[@]}" ls

echo "== each child prints its own identity; the parent only its own" >&2
for row in $("${G[@]}" ls --json | python3 -c 'import json,sys; [print(s["id"], s["identity"], s["vmm_pid"], sep=":") for s in json.load(sys.stdin)]'); do
  IFS=: read -r sid ident pid <<<"$row"
  dir="$($SUDO grep -l "^$pid\$" "$DATA"/vmm/*/pid | head -1 | xargs dirname)"
  for _ in $(seq 100); do $SUDO grep -q "ID=$ident " "$dir/serial.log" && break; sleep 0.05; done
  echo "$sid: $($SUDO grep -ao "ID=$ident CHECKSUM=0x[0-9a-f]*" "$dir/serial.log" | head -1)"
done

echo "== delete everything" >&2
for sid in $("${G[@]}" ls --json | python3 -c 'import json,sys; print(" ".join(s["id"] for s in json.load(sys.stdin)))'); do
  "${G[@]}" rm "$sid"
done
"${G[@]}" ls
"${G[@]}" template rm demo
echo "== done" >&2
