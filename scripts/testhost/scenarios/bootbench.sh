#!/usr/bin/env bash
# what: grove-bench boot --linux: VMM start to guest-init ready for the guest kernel under grove-vmm beside QEMU -M microvm -accel kvm booting the same kernel and initramfs, alternating, BENCH_RUNS each (default 5), 1 vCPU, 512 MiB, quiet; results in bootbench.{txt,json} (measures, checks only that both booted every run)
# timeout: 2400
. "$GROVE_ROOT/scripts/testhost/lib.sh"
k="$GUEST_KERNEL"
# Both VMMs boot the same bzImage (QEMU loads an ELF vmlinux only with a PVH note).
[ -s "$(dirname "$k")/bzImage" ] && k="$(dirname "$k")/bzImage"
runs="${BENCH_RUNS:-5}"
args=(boot --linux --runs "$runs" --vcpus 1 --mem-mib 512 --kernel "$k" --initrd "$GUEST_INITRD")
"$GROVE_BENCH" "${args[@]}" --json >"$GROVE_OUT/bootbench.json" || fail "grove-bench boot --linux failed"
python3 - "$GROVE_OUT/bootbench.json" "$runs" <<'PY' | tee "$GROVE_OUT/bootbench.txt"
import json, sys
r = json.load(open(sys.argv[1])); runs = int(sys.argv[2]); c = r["conditions"]
print(f"scenario: {c['guest_kernel']} ({c['vcpus']} vCPU, {c['mem_mib']} MiB); host {c['kvm']}, {c['host_cpu']}, kernel {c['host_kernel']}; load {c['loadavg_before']} -> {c['loadavg_after']}")
print(f"scenario: reference {c['qemu']}")
for what, key in [("grove-vmm spawn -> ready", "grove_spawn_to_ready_ms"), ("grove-vmm boot-timer", "grove_boot_timer_ms"), ("qemu microvm spawn -> ready", "qemu_spawn_to_ready_ms")]:
    s = r[key]
    print(f"scenario: {what:<28} median {s['median']:.0f} ms  p99 {s['p99']:.0f} ms  (n={s['n']})")
print(f"scenario: samples grove-vmm {[round(x) for x in r['grove_samples_ms']]} ms, qemu {[round(x) for x in r['qemu_samples_ms']]} ms")
print(f"scenario: grove-vmm / qemu (medians) {r['ratio_of_medians']:.2f}x")
if len(r["grove_samples_ms"]) != runs or len(r["qemu_samples_ms"]) != runs:
    sys.exit("scenario: FAIL: not every run booted under both VMMs")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "incomplete results"
log PASS
