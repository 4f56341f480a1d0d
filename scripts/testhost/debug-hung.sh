# A look at a test host whose guest stopped making progress. Not run by any scenario: copy
# it to the running scenario's output directory as debug.sh
#   cp scripts/testhost/debug-hung.sh build/testhost/NAME/debug.sh
# and the test host's init runs it (within 2 s) as root inside; its output is debug.out there.
# It prints, twice 5 s apart: each grove-vmm's threads (state, CPU ticks, kernel stack), each
# VM's KVM counters (debugfs) and each VM's `status` reply (virtio queues and interrupts);
# then copies KVM's trace (trace-hung.txt) and takes a full snapshot of every VM with a
# control socket into the test host's /tmp/hung-NAME (its memory, for a later debug.sh to
# read) and copies its state file (the vCPU registers) out as hung-NAME.vmstate; a VM is
# paused only for its snapshot.
eval "$(grep '^export ' /testhost-out/job.sh)"
mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
mount -t debugfs nodev /sys/kernel/debug 2>/dev/null
VMM="${GROVE_VMM:-$GROVE_ROOT/target/release/grove-vmm}"
snap() {
  date +%T.%N
  for p in $(pgrep -x grove-vmm); do
    echo "== grove-vmm $p: $(tr '\0' ' ' </proc/"$p"/cmdline | cut -c1-200)"
    for t in /proc/"$p"/task/*; do
      echo "  $(cat "$t"/comm) $(cut -d' ' -f3,14,15 "$t"/stat) wchan=$(cat "$t"/wchan)"
      sed 's/^/     /' "$t"/stack 2>/dev/null | head -6
    done
  done
  for d in /sys/kernel/debug/kvm/*-*/; do
    printf '== %s ' "$d"
    for f in exits halt_exits irq_injections irq_exits io_exits mmio_exits irq_window_exits pf_taken pf_guest; do
      printf '%s=%s ' "$f" "$(cat "$d/$f" 2>/dev/null)"
    done
    echo
  done
  for s in /tmp/grove-*/*.sock /tmp/grove-*/*/*.sock; do
    [ -S "$s" ] && echo "== $s: $(timeout 5 "$VMM" api --api-sock "$s" '{"cmd":"status"}' 2>&1 | cut -c1-2000)"
  done
}
snap; sleep 5; snap
cat /sys/kernel/tracing/trace >"$GROVE_OUT/trace-hung.txt" 2>/dev/null
for s in /tmp/grove-*/*.sock /tmp/grove-*/*/*.sock; do
  [ -S "$s" ] || continue
  n="$(basename "$s" .sock)"
  echo "== snapshot of $n: $(timeout 120 "$VMM" api --api-sock "$s" '{"cmd":"snapshot","kind":"full","dir":"/tmp/hung-'"$n"'"}' 2>&1 | cut -c1-300)"
  cp "/tmp/hung-$n/vmstate" "$GROVE_OUT/hung-$n.vmstate" 2>/dev/null
done
echo done
