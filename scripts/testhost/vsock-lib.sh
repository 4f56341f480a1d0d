# Helpers for the vsock scenarios (sourced after lib.sh): a Linux guest with a virtio-vsock
# device, driven from the test host through guest-ctl over the VM's vsock socket.
CTL="$GROVE_ROOT/build/target-guest-init/x86_64-unknown-linux-gnu/release/guest-ctl"
[ -x "$CTL" ] || fail "no guest-ctl at $CTL (scripts/build-guest-init.sh)"
VS_DIR="${VS_DIR:-/tmp/grove-vsock}"
rm -rf "$VS_DIR"; mkdir -p "$VS_DIR"

# The guest command line: serial console, i8042 reset, virtio-mmio and the vsock transport
# loaded from the initramfs (guest-init listens on vsock port 1024); VSOCK_MODULES replaces
# the module list (e.g. with virtio_blk for a root disk).
vsock_cmdline() {
  echo "console=ttyS0 reboot=k panic=-1 grove.modules=${VSOCK_MODULES:-virtio_mmio,vmw_vsock_virtio_transport} ${GUEST_CMDLINE_EXTRA:-}"
}

# vsock_boot NAME VCPUS MEM_MIB [grove-vmm run flags...]: a Linux guest with its vsock socket
# at $VS_DIR/NAME.vsock and its control socket at $VS_DIR/NAME.api.
vsock_boot() {
  local name="$1" vcpus="$2" mem="$3"; shift 3
  start_vm "$name" run --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" \
    --cmdline "$(vsock_cmdline)" --vcpus "$vcpus" --mem-mib "$mem" \
    --vsock-uds "$VS_DIR/$name.vsock" --api-sock "$VS_DIR/$name.api" "$@"
}

# ctl NAME ARGS...: guest-ctl against NAME's guest-init (each call bounded by CTL_LIMIT s).
ctl() {
  local name="$1"; shift
  timeout "${CTL_LIMIT:-300}" "$CTL" --connect "vsock-uds:$VS_DIR/$name.vsock:1024" "$@"
}

# vsock_status NAME: the vsock part of NAME's status reply (connections, counters).
vsock_status() {
  api "$1" '{"cmd":"status"}' | sed -n 's/.*"vsock":\({[^}]*}[^}]*}\).*/\1/p'
}

# vsock_fail NAME MESSAGE: fails with NAME's vsock state and logs.
vsock_fail() {
  echo "---- $1: vsock: $(vsock_status "$1")"
  show_vm "$1"
  fail "$2"
}

# api NAME JSON: one control request to NAME's grove-vmm; the reply line on stdout.
api() {
  "$GROVE_VMM" api --api-sock "$VS_DIR/$1.api" "$2"
}
