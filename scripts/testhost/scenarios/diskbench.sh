#!/usr/bin/env bash
# what: grove-bench disk --virtio: guest-side disk throughput and 4 KiB latency on grove-vmm's virtio-blk beside the same image on QEMU's virtio-blk, in this test host (DISKBENCH_MIB, DISKBENCH_OPS); results in diskbench.json (measures, checks only that both ran)
# timeout: 1500
. "$GROVE_ROOT/scripts/testhost/lib.sh"
W="$(mktemp -d /tmp/grove-diskbench.XXXXXX)"
trap '_end_vms; rm -rf "$W"' EXIT
args=(disk --virtio --mib "${DISKBENCH_MIB:-64}" --ops "${DISKBENCH_OPS:-2000}" --dir "$W" --timeout-s 1200
      --qemu-machine "${DISKBENCH_QEMU_MACHINE:-q35}")
"$GROVE_BENCH" "${args[@]}" --json >"$GROVE_OUT/diskbench.json" || fail "grove-bench disk --virtio failed"
python3 - "$GROVE_OUT/diskbench.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c = r["conditions"]
print(f"scenario: guest {c['guest_kernel']}, host {c['host_kernel']} ({c['kvm_module']}), image {c['image_mib']} MiB on {c['image_dir_fs']}, {c['random_ops']} random ops, {c['qemu_version']}")
print(f"scenario: {'test':<15} {'metric':<11} {'grove-vmm':>10} {'qemu':>10} {'ratio':>6}")
for x in r["comparison"]:
    print(f"scenario: {x['test']:<15} {x['metric']:<11} {x['grove']:>10.1f} {x['qemu']:>10.1f} {x['ratio']:>6.2f}")
print(f"scenario: wall grove-vmm {r['grove']['wall_s']:.1f} s, qemu {r['qemu']['wall_s']:.1f} s")
PY
n="$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["comparison"]))' "$GROVE_OUT/diskbench.json")"
[ "$n" -eq 8 ] || fail "expected 8 comparisons, got $n"
log PASS
