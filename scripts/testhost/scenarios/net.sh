#!/usr/bin/env bash
# what: netd's programs pass Debian 6.1's verifier (netd's BPF tests there); a Linux guest on virtio-net in a netd slot gets its address (ip=), reaches a server in another namespace through the NAT, is refused where the policy denies; two fork children in two more slots reach the server at the same time with the same in-guest address
# timeout: 900
. "$GROVE_ROOT/scripts/testhost/lib.sh"
. "$GROVE_ROOT/scripts/testhost/netlib.sh"
W="$(mktemp -d /tmp/grove-net.XXXXXX)"   # tmpfs in the test host: sockets and snapshots
trap '_end_vms; testbed_stop || true; rm -rf "$W"' EXIT
api() { "$GROVE_VMM" api --api-sock "$W/parent.sock" "$1"; }
line() { grep -m1 -E "$2" "$GROVE_OUT/$1.serial" | tr -d '\r'; }

net_prepare
# 1. The programs on this kernel: netd's BPF_PROG_TEST_RUN tests (every program loaded by the
#    verifier, the NAT, policy, rate and parsing logic on crafted packets, and a program the
#    verifier must refuse with its reason).
[ -x "$NETD_BPF_TEST" ] || fail "no netd bpf test binary ($NETD_BPF_TEST)"
"$NETD_BPF_TEST" --test-threads=1 >"$GROVE_OUT/netd-bpf.log" 2>&1 || { cat "$GROVE_OUT/netd-bpf.log"; fail "netd's BPF tests failed on $(uname -r)"; }
log "netd bpf tests on $(uname -r): $(grep '^test result' "$GROVE_OUT/netd-bpf.log")"

# 2. A test bed: three slots, 10.250.0.3 (SERVER2) denied.
testbed_start --slots 3 --deny 10.250.0.3/32 --barrier 2
bpftool prog show 2>/dev/null | grep -A1 -E 'name grove_' | sed 's/^/  /' >"$GROVE_OUT/progs.txt" || true
log "net: programs attached on $(uname -r): $(grep -c 'name grove_' "$GROVE_OUT/progs.txt") ($(grep -oE 'name grove_[a-z]+' "$GROVE_OUT/progs.txt" | sort | uniq -c | tr -s ' ' | tr '\n' ';'))"

# 3. The parent in slot 0.
start_vm parent run --kernel "$GUEST_KERNEL" --initrd "$GUEST_INITRD" --cmdline "$(net_cmdline net)" \
  --vcpus 1 --mem-mib 512 --net "tap=$SLOT0_TAP,netns=$SLOT0_NETNS,mac=$GUEST_MAC" \
  --api-sock "$W/parent.sock"
wait_serial parent '^probe: phase1 done' 400
eth="$(line parent '^probe: eth0 ')"
log "parent: $eth; $(line parent '^probe: route')"
echo "$eth" | grep -q " $GUEST_IP/30 mac=$GUEST_MAC operstate=up" || { show_vm parent; fail "parent: eth0 is not $GUEST_IP/30 with $GUEST_MAC and up"; }
who="$(line parent '^probe: whoami ')"
echo "$who" | grep -q "from $SLOT0_IP:" || { show_vm parent; fail "parent: the server does not see the slot address $SLOT0_IP ($who)"; }
log "parent: $who (the guest is $GUEST_IP inside)"
line parent '^probe: denied address .* unreachable' >/dev/null || { show_vm parent; fail "parent: the denied address answered"; }
log "parent: $(line parent '^probe: denied address')"
check_warnings parent

# 4. Fork; the parent pauses (it would otherwise go on asking whoami from slot 0); two
#    children in slots 1 and 2.
api '{"cmd":"fork","dir":"'"$W"'/fork"}' >"$GROVE_OUT/fork-reply.json"
grep -q '"ok":true' "$GROVE_OUT/fork-reply.json" || { cat "$GROVE_OUT/fork-reply.json"; fail "fork refused"; }
api '{"cmd":"pause"}' >/dev/null || fail "pause refused"
start_vm child1 restore --snapshot "$W/fork" --identity 1 --net "tap=$SLOT1_TAP,netns=$SLOT1_NETNS"
start_vm child2 restore --snapshot "$W/fork" --identity 2 --net "tap=$SLOT2_TAP,netns=$SLOT2_NETNS,mac=$GUEST_MAC"
peers="$(printf '%s\n' "$SLOT1_IP" "$SLOT2_IP" | sort -t. -k1,1n -k2,2n -k3,3n -k4,4n | tr '\n' ',' | sed 's/,$//')"
for i in 1 2; do
  c="child$i"
  wait_serial "$c" '^probe: (barrier|done)' 300
  ip_var="SLOT${i}_IP"
  who="$(line "$c" '^probe: restored: whoami ')"
  echo "$who" | grep -q "from ${!ip_var}:" || { show_vm "$c"; fail "$c: not seen from its slot address ${!ip_var} ($who)"; }
  eth="$(line "$c" '^probe: eth0 ')"
  echo "$eth" | grep -q " $GUEST_IP/30 mac=$GUEST_MAC operstate=up" || { show_vm "$c"; fail "$c: eth0 changed or down after restore ($eth)"; }
  bar="$(line "$c" '^probe: barrier')"
  echo "$bar" | grep -q "^probe: barrier ok peers=$peers you=${!ip_var}:" \
    || { show_vm "$c"; fail "$c: the two children were not at the server at once ($bar)"; }
  check_warnings "$c"
  log "$c: $who; $eth; $bar"
done

# 5. The test bed's view: the denied packets were logged for slot 0; everything goes away.
_end_vms
testbed_stop
grep -E '^testbed: (denial|counters|barrier|whoami: 10.201.0.2:)' "$GROVE_OUT/testbed.log" | head -20
grep -q "denial .*\"remote\":\"$SERVER2\"" "$GROVE_OUT/testbed.log" || fail "no denial logged for $SERVER2"
net_leftovers
log PASS
