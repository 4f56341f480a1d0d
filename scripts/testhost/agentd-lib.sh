# Shared by the test-host scenarios that run agentd with a Linux template (agentd*.sh):
# sourced after lib.sh. Sets BIN, W (a tmpfs work directory), DATA, SOCK; the helpers g (the
# grove CLI on this agentd) and jget; a cleanup on exit (agentd by its PID, then the VMMs it
# started, found by their pid files and checked by their command line; the work directory).
#
#   agentd_start [AGENTD_ARGS...]          starts agentd on $DATA, waits for its socket
#   agentd_linux_template PROBE [MEM_MIB]  registers template "linux" (--guest-agent) whose
#                                          root disk runs /probe/PROBE.sh (a file of
#                                          scripts/testhost/guest) after guest-init's ready
#                                          mark, and warms it; extra files for the root disk
#                                          go into $R before the call
BIN="$GROVE_ROOT/target/release"
for b in agentd grove; do [ -x "$BIN/$b" ] || fail "$BIN/$b is missing (scripts/testhost.sh builds it)"; done
GI="${GUEST_INIT_TARGET_DIR:-$GROVE_ROOT/build/target-guest-init}/x86_64-unknown-linux-gnu/release/guest-init"
[ -x "$GI" ] || fail "$GI is missing (scripts/build-guest-init.sh builds it)"
W="$(mktemp -d /tmp/grove-agentd.XXXXXX)"   # tmpfs in the test host: data dir, socket
DATA="$W/data"
SOCK="$W/agentd.sock"
R="$W/rootdir"
AGENTD_PID=""
agentd_cleanup() {
  set +e
  [ -n "$AGENTD_PID" ] && kill "$AGENTD_PID" 2>/dev/null && wait "$AGENTD_PID" 2>/dev/null
  for p in "$DATA"/vmm/*/pid; do
    [ -f "$p" ] || continue
    pid="$(cat "$p")"
    grep -qa "$DATA" "/proc/$pid/cmdline" 2>/dev/null && kill -9 "$pid"
  done
  cp "$W/agentd.log" "$GROVE_OUT/" 2>/dev/null
  rm -rf "$W"
}
trap agentd_cleanup EXIT
g() { "$BIN/grove" --endpoint "unix:$SOCK" "$@"; }
jget() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }

# The root disk's contents: busybox, guest-init (PID 1 after the switch to the disk) and the
# probes. agentd makes the directory an ext4 image (mkfs.ext4 -d) and imports it as a base layer.
mkdir -p "$R"/{bin,sbin,probe,dev,proc,sys,run,tmp,root,etc}
cp "$(command -v busybox)" "$R/bin/busybox"
for a in sh cat echo sleep dd od tr wc cmp awk sed grep mknod mount sync date head tail cut stty rm seq printf mkdir rmdir mv touch ls kill; do
  ln -sf busybox "$R/bin/$a"
done
cp "$GI" "$R/sbin/guest-init"
cp "$GROVE_ROOT/scripts/testhost/guest/lib.sh" "$R/probe/"

agentd_start() {
  "$BIN/agentd" --data-dir "$DATA" --listen "unix:$SOCK" --metrics-listen "" --vmm "$GROVE_VMM" \
    "$@" 2>"$W/agentd.log" &
  AGENTD_PID=$!
  for _ in $(seq 600); do [ -S "$SOCK" ] && break; sleep 0.1; done
  [ -S "$SOCK" ] || { cat "$W/agentd.log"; fail "agentd did not start"; }
  g node info
}

agentd_linux_template() {
  local probe="$1" mem="${2:-512}" cmdline base t0 snap
  cp "$GROVE_ROOT/scripts/testhost/guest/$probe.sh" "$R/probe/"
  # guest-init's agent listens on vsock (the template is registered with --guest-agent): the
  # vsock transport is loaded from the initramfs and guest_cmdline's grove.vsock=off dropped.
  cmdline="$(GUEST_CMDLINE_EXTRA="root=/dev/vda rw grove.modules=virtio_mmio,virtio_blk,virtio_rng,vmw_vsock_virtio_transport ${GUEST_CMDLINE_EXTRA:-}" guest_cmdline "$probe" | sed 's/ grove.vsock=off//')"
  g template add linux --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --cmdline "$cmdline" \
    --memory-mib "$mem" --rootfs-dir "$R" --disk-mib 64 --ready boot-timer --ready-timeout 900 \
    --guest-agent >/dev/null
  base="$(g --json template ls | jget 'd[0]["base_layer"]')"
  [ "$base" -gt 0 ] && [ -s "$DATA/layers/L$base.data" ] || fail "no base layer file for the root disk (layer $base)"
  log "registered: root directory -> base layer $base ($(stat -c %s "$DATA/layers/L$base.data") bytes)"
  t0=$(date +%s)
  g template warm linux 2>"$GROVE_OUT/warm.log" || { cat "$GROVE_OUT/warm.log"; tail -40 "$W/agentd.log"; fail "warm failed"; }
  snap="$(g --json template ls | jget 'd[0]["snapshot"]')"
  [ "$snap" -gt 0 ] || fail "the template has no snapshot after warm"
  [ -s "$DATA/snapshots/$snap/disk-root.idx" ] || fail "the warm snapshot has no frozen disk layer (disk-root.*)"
  log "warm in $(( $(date +%s) - t0 )) s: snapshot $snap, $(ls "$DATA/snapshots/$snap" | tr '\n' ' ')"
}
