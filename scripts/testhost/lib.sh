# Helpers for test-host scenarios (sourced; bash). Run inside the test host (or directly with
# GROVE_TESTHOST=direct); scripts/testhost.sh sets GROVE_ROOT, GROVE_OUT, GROVE_VMM,
# GUEST_KERNEL, GUEST_INITRD.
set -euo pipefail
: "${GROVE_OUT:?run scenarios through scripts/testhost.sh}"
ALLOWLIST="$GROVE_ROOT/scripts/testhost/allowlist.txt"
VM_PIDS=()

log() { echo "scenario: $*"; }
fail() {
  echo "scenario: FAIL: $*"
  exit 1
}

# Ends every grove-vmm this scenario started (by PID) when it exits, pass or fail.
_end_vms() {
  local p
  for p in "${VM_PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap _end_vms EXIT

# The guest command line: serial console at loglevel 4 (`quiet`: every serial byte is a VM
# exit, ~1.5 ms each in the test host; the probes read warnings from dmesg instead; set
# GUEST_VERBOSE=1 for the whole log), i8042 reset for reboot, no agent listener (no vsock
# device yet), and the probe guest-init starts after its ready mark.
guest_cmdline() {
  local q=quiet
  [ -n "${GUEST_VERBOSE:-}" ] && q=""
  echo "console=ttyS0 $q reboot=k panic=-1 grove.vsock=off grove.run=/probe/$1.sh ${GUEST_CMDLINE_EXTRA:-}"
}

# start_vm NAME ARGS...: grove-vmm ARGS in the background; serial to $GROVE_OUT/NAME.serial,
# stderr to NAME.err; the PID goes to VM_PID (and the cleanup list).
start_vm() {
  local name="$1"; shift
  "$GROVE_VMM" "$@" --serial "$GROVE_OUT/$name.serial" 2>"$GROVE_OUT/$name.err" &
  VM_PID=$!
  VM_PIDS+=("$VM_PID")
  echo "$VM_PID" >"$GROVE_OUT/$name.pid"
}

# stop_vm NAME: ends NAME's grove-vmm (started by start_vm) and reaps it, so the cleanup
# list no longer names its PID.
stop_vm() {
  local pid p keep=()
  pid="$(cat "$GROVE_OUT/$1.pid")"
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for p in "${VM_PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
  VM_PIDS=("${keep[@]}")
}

# boot_vm NAME PROBE VCPUS MEM_MIB [grove-vmm run flags...]: start_vm with the guest kernel.
boot_vm() {
  local name="$1" probe="$2" vcpus="$3" mem="$4"; shift 4
  start_vm "$name" run --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" \
    --cmdline "$(guest_cmdline "$probe")" --vcpus "$vcpus" --mem-mib "$mem" "$@"
}

# wait_serial NAME PATTERN SECONDS [COUNT]: waits until NAME's serial log has COUNT (default 1)
# lines matching the extended regex PATTERN; fails if the VM exits first or time runs out.
wait_serial() {
  local name="$1" pat="$2" secs="$3" count="${4:-1}" pid end
  pid="$(cat "$GROVE_OUT/$name.pid")"
  end=$(( $(date +%s) + secs ))
  while [ "$(tr -d '\r' 2>/dev/null <"$GROVE_OUT/$name.serial" | grep -cE "$pat" || true)" -lt "$count" ]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      show_vm "$name"
      fail "$name exited before its serial showed '$pat'"
    fi
    if [ "$(date +%s)" -ge "$end" ]; then
      show_vm "$name"
      fail "$name: no '$pat' on its serial within ${secs} s"
    fi
    sleep 0.2
  done
}

# wait_exit NAME SECONDS: waits for NAME's grove-vmm to exit; sets VM_RC. Fails on timeout.
wait_exit() {
  local name="$1" secs="$2" pid end
  pid="$(cat "$GROVE_OUT/$name.pid")"
  end=$(( $(date +%s) + secs ))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$end" ]; then
      show_vm "$name"
      fail "$name did not exit within ${secs} s"
    fi
    sleep 0.2
  done
  VM_RC=0
  wait "$pid" || VM_RC=$?
}

show_vm() {
  echo "---- $1: serial (last 60 lines) ----"
  tail -60 "$GROVE_OUT/$1.serial" 2>/dev/null || true
  echo "---- $1: grove-vmm stderr ----"
  cat "$GROVE_OUT/$1.err" 2>/dev/null || true
  echo "----"
}

# Lines of a guest serial log that count as kernel warnings: WARN/BUG, unchecked MSR accesses,
# soft/hard lockups, an unstable clocksource, RCU stalls, hung tasks, call traces, panics.
WARN_RE='WARNING:|BUG:|BUG |unchecked MSR|soft lockup|hard LOCKUP|clocksource.*unstable|Marking clocksource|rcu_sched self-detected|rcu: INFO|blocked for more than|Kernel panic|general protection|Oops'

# check_warnings NAME: fails if NAME's serial has a warning line not in the allowlist
# (scripts/testhost/allowlist.txt: one exact text per line, after its reason in a comment).
check_warnings() {
  local name="$1" f="$GROVE_OUT/$1.serial" bad
  bad="$({ grep -E "$WARN_RE" "$f" || true; } | sed 's/^dmesg: //; s/^\[ *[0-9.]*\] //' | while IFS= read -r l; do
    allowed "$l" || echo "$l"
  done)"
  if [ -n "$bad" ]; then
    echo "---- $name: kernel warnings ----"
    echo "$bad"
    grep -nE -A12 "$WARN_RE" "$f" | head -80
    fail "$name: kernel warnings in the guest log"
  fi
}

allowed() {
  local a
  while IFS= read -r a; do
    case "$a" in ''|'#'*) continue ;; esac
    [[ "$1" == *"$a"* ]] && return 0
  done <"$ALLOWLIST"
  return 1
}

# The guest's dmesg-style timestamp (seconds) of the first serial line matching PATTERN.
guest_ts() {
  grep -m1 -E "$2" "$GROVE_OUT/$1.serial" | sed -n 's/^\[ *\([0-9.]*\)\].*/\1/p'
}

# ms from VMM start to the guest's boot-timer write, from grove-vmm's stderr.
boot_timer_ms() {
  sed -n 's/^boot-timer: guest ready \([0-9.]*\) ms.*/\1/p' "$GROVE_OUT/$1.err" | head -1
}
