# Helpers for the network scenarios (sourced after lib.sh): what netd needs in the test host,
# netd's test bed as a process, and guests on virtio-net in its slots.

# net_prepare: bpffs, and the modules Debian's kernel has as modules (tun, veth, clsact in
# sch_ingress, cls_bpf, conntrack and its netlink interface for the slot scrub).
net_prepare() {
  mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || fail "cannot mount bpffs"
  local m err
  # crc32c_generic first: nf_conntrack needs libcrc32c, whose request for "crc32c" the
  # kernel cannot satisfy by itself here (as in the dmthin scenario).
  for m in crc32c_generic tun veth sch_ingress cls_bpf nf_conntrack nf_conntrack_netlink; do
    err="$(busybox modprobe "$m" 2>&1)" || grep -qw "$m" /proc/modules \
      || [ -d "/sys/module/$m" ] || fail "modprobe $m failed: $err"
  done
  [ -c /dev/net/tun ] || fail "no /dev/net/tun after loading tun"
  log "net: bpffs mounted, modules loaded ($(uname -r))"
}

# testbed_start ARGS...: grove-netd-testbed ARGS --env $GROVE_OUT/testbed.env in the
# background (output in testbed.log); waits for it and sources the env file.
TESTBED_PID=""
testbed_start() {
  "$GROVE_NETD_TESTBED" "$@" --env "$GROVE_OUT/testbed.env" >"$GROVE_OUT/testbed.log" 2>&1 &
  TESTBED_PID=$!
  local i
  for i in $(seq 1 600); do
    grep -q '^testbed: ready' "$GROVE_OUT/testbed.log" && break
    kill -0 "$TESTBED_PID" 2>/dev/null || { cat "$GROVE_OUT/testbed.log"; fail "the test bed exited"; }
    sleep 0.2
  done
  grep -q '^testbed: ready' "$GROVE_OUT/testbed.log" || fail "the test bed did not come up"
  # shellcheck disable=SC1091
  . "$GROVE_OUT/testbed.env"
  log "net: $(grep '^testbed: ready' "$GROVE_OUT/testbed.log")"
}

# testbed_stop: ends the test bed (it prints counters and denials, then removes its
# namespaces, links and pins); fails if it did not finish cleanly.
testbed_stop() {
  [ -n "$TESTBED_PID" ] || return 0
  kill -TERM "$TESTBED_PID" 2>/dev/null || true
  local rc=0
  wait "$TESTBED_PID" || rc=$?
  TESTBED_PID=""
  grep -q '^testbed: removed' "$GROVE_OUT/testbed.log" || { cat "$GROVE_OUT/testbed.log"; fail "the test bed did not clean up (status $rc)"; }
}

# net_leftovers: fails if anything of the test bed's prefix is left (namespaces, links, pins,
# programs).
net_leftovers() {
  local left
  left="$( { ip netns list | grep "^$TESTBED_PREFIX"; ip -o link | grep "$TESTBED_PREFIX"; \
             ls /sys/fs/bpf/grove 2>/dev/null | grep "^$TESTBED_PREFIX"; \
             bpftool prog show 2>/dev/null | grep -E 'name grove_'; } || true)"
  [ -z "$left" ] || { echo "$left"; fail "left behind after the test bed ended"; }
}

# The guest's kernel command line for a probe on virtio-net with the test bed's addressing.
net_cmdline() {
  echo "$(guest_cmdline "$1") grove.modules=virtio_mmio,virtio_net \
ip=$GUEST_IP::$GATEWAY:$NETMASK:grove:eth0:off probe.server=$SERVER probe.server2=$SERVER2 \
probe.whoami=$WHOAMI_PORT probe.barrier=$BARRIER_PORT probe.sink=$SINK_PORT"
}
