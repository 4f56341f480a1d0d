#!/usr/bin/env bash
# what: the host check sees a hardware-style KVM and the test guest's hello runs (exit 0)
# timeout: 300
. "$GROVE_ROOT/scripts/testhost/lib.sh"
"$GROVE_VMM" check-host | tee "$GROVE_OUT/check-host.txt"
grep -qE 'nested-hardware|hardware' "$GROVE_OUT/check-host.txt" || fail "check-host does not report a hardware-style KVM"
grep -q 'kvm_pvm' "$GROVE_OUT/check-host.txt" && fail "check-host reports kvm_pvm: not the test host's kvm_amd"
tg="$GROVE_ROOT/vmm/testguest/target/release/grove-testguest"
[ -s "$tg" ] || fail "no test guest at $tg (scripts/build-testguest.sh)"
start_vm hello run --kernel "$tg" --cmdline "tg.mode=hello" --mem-mib 128
wait_exit hello 120
[ "$VM_RC" -eq 0 ] || { show_vm hello; fail "grove-vmm exited $VM_RC"; }
grep -q . "$GROVE_OUT/hello.serial" || fail "the test guest printed nothing"
log "hello: $(head -c 200 "$GROVE_OUT/hello.serial" | tr '\n' ' ')"
log PASS
