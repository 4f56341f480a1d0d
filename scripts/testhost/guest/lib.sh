# Shared by the guest-side probes (busybox sh, started by guest-init's grove.run=).
# Grove's ports read through /dev/port (one inb per byte; needs CONFIG_DEVPORT, which the
# minimal kernel has and Debian's cloud kernel lacks): identity 0x444, generation 0x448.
# Where the kernel has no /dev/port (Debian's cloud kernel), guest-init reads the port.
port_u8() {
  if [ -c /dev/port ]; then
    dd if=/dev/port bs=1 skip="$1" count=1 2>/dev/null | od -An -tu1 | tr -d ' '
    return
  fi
  for gi in /sbin/guest-init /init; do
    [ -x "$gi" ] || continue
    v="$("$gi" --inb "$1" 2>/tmp/inb.err)" && { echo "$v"; return; }
    # Why it failed, on the line (status, error), for the scenario's log.
    echo "?st$?:$(tr -c 'a-zA-Z0-9.:/-' _ </tmp/inb.err | head -c 60)"
    return
  done
  echo "?"
}
identity() { port_u8 1092; }
generation() { port_u8 1096; }
up() { cut -d' ' -f1 /proc/uptime; }
# The kernel log lines a scenario checks for warnings (a superset of the host side's
# pattern; the host applies the exact pattern and the allowlist), each with 12 lines of
# context, prefixed "dmesg: ". The console runs at loglevel 4 (quiet): every byte on the
# serial port costs a VM exit, which is slow in the test host, so warnings are read here.
dmesg_warnings() {
  dmesg | grep -E -A12 'WARNING|BUG|unchecked MSR|lockup|LOCKUP|unstable|rcu.*stall|rcu: INFO|blocked for|panic|general protection|Oops' \
    | sed 's/^/dmesg: /'
}
# With grove.probe_dmesg on the command line, the whole kernel log (for boot-time analysis).
dmesg_all() {
  grep -q 'grove.probe_dmesg' /proc/cmdline && dmesg | sed 's/^/dmesg: /'
  return 0
}
