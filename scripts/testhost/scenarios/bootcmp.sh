#!/usr/bin/env bash
# what: boot time of each guest kernel under grove-vmm (VMM start to guest-init's ready mark), BENCH_RUNS boots each, 1 vCPU, 512 MiB, quiet; beside QEMU -M microvm -accel kvm booting the same kernel and initramfs (start to "guest-init: ready" on its serial)
# timeout: 1500
. "$GROVE_ROOT/scripts/testhost/lib.sh"
runs="${BENCH_RUNS:-3}"
: >"$GROVE_OUT/bootcmp.txt"
for kind in ${BOOTCMP_KERNELS:-min cloud generic}; do
  case "$kind" in
    min) k="${MIN_KERNEL:-}" ;; cloud) k="$CLOUD_KERNEL" ;; generic) k="${GENERIC_KERNEL:-}" ;;
  esac
  [ -n "$k" ] && [ -s "$k" ] || { log "$kind: no kernel (build it first)"; continue; }
  # Both VMMs boot the same bzImage (QEMU loads an ELF vmlinux only with a PVH note, which
  # the minimal kernel does not have).
  [ -s "$(dirname "$k")/bzImage" ] && k="$(dirname "$k")/bzImage"
  all=""
  for i in $(seq 1 "$runs"); do
    n="$kind-$i"
    GUEST_KERNEL="$k" boot_vm "$n" boot 1 512
    wait_exit "$n" 400
    [ "$VM_RC" -eq 0 ] || { show_vm "$n"; fail "$n: grove-vmm exited $VM_RC"; }
    ms="$(boot_timer_ms "$n")"
    [ -n "$ms" ] || fail "$n: no boot-timer write"
    check_warnings "$n"
    all="$all ${ms%.*}"
  done
  med="$(echo $all | tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
  echo "grove-vmm $kind: median ${med} ms of$all ms ($k)" | tee -a "$GROVE_OUT/bootcmp.txt"
  # The reference in the same test host: QEMU's microvm machine on the same KVM. It has no
  # boot-timer port, so the time is QEMU start to "guest-init: ready" on its serial (polled
  # every 20 ms; the line is printed right after the port write).
  all=""
  for i in $(seq 1 "$runs"); do
    n="qemu-$kind-$i"
    t0=$(date +%s%N)
    qemu-system-x86_64 -M microvm -accel kvm -cpu host -smp 1 -m 512 -nodefaults -no-user-config \
      -display none -no-reboot -serial "file:$GROVE_OUT/$n.serial" \
      -kernel "$k" -initrd "$GUEST_INITRD" -append "$(guest_cmdline boot)" 2>"$GROVE_OUT/$n.err" &
    qpid=$!; VM_PIDS+=("$qpid")
    ms=""
    for _ in $(seq 1 20000); do
      if grep -q 'guest-init: ready' "$GROVE_OUT/$n.serial" 2>/dev/null; then
        ms=$(( ($(date +%s%N) - t0) / 1000000 )); break
      fi
      kill -0 "$qpid" 2>/dev/null || break
      sleep 0.02
    done
    kill -0 "$qpid" 2>/dev/null && { sleep 20; kill "$qpid" 2>/dev/null || true; }
    wait "$qpid" 2>/dev/null || true
    [ -n "$ms" ] || { tail -20 "$GROVE_OUT/$n.serial"; cat "$GROVE_OUT/$n.err"; fail "$n: no ready line"; }
    all="$all $ms"
  done
  med="$(echo $all | tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
  echo "qemu-microvm $kind: median ${med} ms of$all ms" | tee -a "$GROVE_OUT/bootcmp.txt"
done
log PASS
