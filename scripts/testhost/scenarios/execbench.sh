#!/usr/bin/env bash
# what: grove-bench exec: the guest-agent path over grove-vmm's virtio-vsock (cold boot and restore to the first exec answered, exec round trips, 64 MiB file write/read); results in execbench.txt (measures; checks only that the bench completed)
# timeout: 2400
. "$GROVE_ROOT/scripts/testhost/lib.sh"
args=(exec --boots "${BENCH_BOOTS:-3}" --restores "${BENCH_RESTORES:-10}" --execs "${BENCH_EXECS:-100}"
  --files "${BENCH_FILES:-3}" --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD")
"$GROVE_BENCH" "${args[@]}" >"$GROVE_OUT/execbench.txt" || { cat "$GROVE_OUT/execbench.txt"; fail "grove-bench exec failed"; }
sed 's/^/scenario: /' "$GROVE_OUT/execbench.txt"
log PASS
