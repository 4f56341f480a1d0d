#!/usr/bin/env bash
# what: Linux's root on virtio-blk (Debian's stock kernel, devices through ACPI): a file written and synced, O_DIRECT I/O of several sizes, discard and write-zeroes; the VM forked into 2 children (each its own disk layer), one child snapshotted and restored: every VM's files and blocks read back by checksum, nobody sees a sibling's writes, the frozen layer is never written, all reboot with status 0
# timeout: 1500
# needs: rootfs
. "$GROVE_ROOT/scripts/testhost/lib.sh"
[ -s "${GUEST_ROOTFS:-}" ] || fail "no GUEST_ROOTFS (scripts/testhost.sh builds it for '# needs: rootfs')"
W="$(mktemp -d /tmp/grove-blk.XXXXXX)"   # tmpfs in the test host: layers, snapshots, sockets
trap '_end_vms; rm -rf "$W"' EXIT
export GUEST_CMDLINE_EXTRA="root=/dev/vda rw grove.modules=virtio_mmio,virtio_blk ${GUEST_CMDLINE_EXTRA:-}"
api() { "$GROVE_VMM" api --api-sock "$W/$1.sock" "$2"; }
step() { printf '%s' "$1" | dd of="$W/mbox" bs=1 seek=0 conv=notrunc status=none; }
# disks NAME RW_DIR: the three disks; writable layers in RW_DIR.
disks() {
  echo "--disk $GUEST_ROOTFS,layer=$1/root,id=root --disk $W/scratch.img,layer=$1/scratch,id=scratch --disk $W/mbox,ro,id=mbox"
}
probe_lines() { tr -d '\r' <"$GROVE_OUT/$1.serial" | grep '^probe: '; }

truncate -s 64M "$W/scratch.img"
head -c 4096 /dev/zero >"$W/mbox"
mkdir -p "$W/p" "$W/c1" "$W/c2" "$W/c1b"
# The root image is the host's file (read through 9p, never written): only layers change.
img_before="$(stat -c '%s %Y' "$GUEST_ROOTFS")"

# shellcheck disable=SC2046
boot_vm parent blk 1 512 $(disks "$W/p") --api-sock "$W/parent.sock"
wait_serial parent '^probe: fork-point' 900
probe_lines parent | grep -q 'FAIL' && { show_vm parent; fail "parent: a step 0 check failed"; }
log "parent: $(probe_lines parent | grep -c ' ok$') step 0 checks ok; $(probe_lines parent | grep '^probe: disks')"

api parent '{"cmd":"fork","dir":"'"$W"'/s1"}' | tee "$GROVE_OUT/fork-reply.json"
grep -q '"ok":true' "$GROVE_OUT/fork-reply.json" || fail "fork refused"
for f in disk-root.data disk-root.idx disk-scratch.data disk-scratch.idx; do
  [ -s "$W/s1/$f" ] || fail "the fork directory has no $f"
done
[ -e "$W/s1/disk-mbox.data" ] && fail "a read-only disk has no layer to freeze"
frozen_before="$(cd "$W/s1" && sha256sum disk-*)"
for i in 1 2; do
  start_vm "child$i" restore --snapshot "$W/s1" --identity "$i" --disk-dir "$W/c$i" --api-sock "$W/child$i.sock"
done
step 1
for v in parent child1 child2; do
  wait_serial "$v" '^probe: after-fork ' 600
done
mine() { probe_lines "$1" | sed -n 's/^probe: after-fork id=[0-9]* mine=\([0-9a-f]*\) .*/\1/p' | tail -1; }
common() { probe_lines "$1" | sed -n 's/^probe: after-fork .* common=\([0-9a-f]*\)$/\1/p' | tail -1; }
for v in parent child1 child2; do
  [ -n "$(mine "$v")" ] || { show_vm "$v"; fail "$v: no checksum of its own file"; }
  [ "$(common "$v")" = "$(common parent)" ] || fail "$v: the common file differs from the parent's"
done
[ "$(mine parent)" != "$(mine child1)" ] && [ "$(mine child1)" != "$(mine child2)" ] \
  && [ "$(mine parent)" != "$(mine child2)" ] || fail "two VMs wrote the same file contents"
for i in 1 2; do
  probe_lines "child$i" | grep -q "step 1 id=$i gen=1" || { show_vm "child$i"; fail "child$i: identity/generation"; }
done

# A child is snapshotted and restored: the restored VM reads what the child wrote.
api child1 '{"cmd":"snapshot","kind":"diff","dir":"'"$W"'/s2"}' | tee "$GROVE_OUT/snap-reply.json"
grep -q '"ok":true' "$GROVE_OUT/snap-reply.json" || fail "snapshot of child1 refused"
start_vm child1b restore --snapshot "$W/s2" --identity 1 --disk-dir "$W/c1b"
step 2
for v in parent child1 child2 child1b; do
  wait_exit "$v" 600
  [ "$VM_RC" -eq 0 ] || { show_vm "$v"; fail "$v: grove-vmm exited $VM_RC (a reboot exits 0)"; }
  probe_lines "$v" | grep -q '^probe: done id=' || { show_vm "$v"; fail "$v: the probe did not finish"; }
  if probe_lines "$v" | grep 'FAIL'; then show_vm "$v"; fail "$v: a check failed"; fi
  check_warnings "$v"
done
probe_lines child1b | grep -q "step 2 id=1 gen=2" || fail "child1b: not the restored child1 (generation 2)"
[ "$(probe_lines child1b | grep -c ' ok$')" -ge 4 ] || fail "child1b: too few checks"
[ "$(cd "$W/s1" && sha256sum disk-*)" = "$frozen_before" ] || fail "the fork's frozen layers changed"
[ "$(stat -c '%s %Y' "$GUEST_ROOTFS")" = "$img_before" ] || fail "the root image changed"
for v in parent child1 child2 child1b; do
  log "$v: $(probe_lines "$v" | grep -c ' ok$') checks ok, $(probe_lines "$v" | grep '^probe: done')"
done
log "frozen layers unchanged; each child wrote its own layer: $(ls "$W"/c1 "$W"/c2 | tr '\n' ' ')"
log PASS
