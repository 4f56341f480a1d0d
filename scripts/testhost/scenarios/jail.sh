#!/usr/bin/env bash
# what: grove-jailer on a pure cgroup v2 host (Debian 12's kernel, no v1 hierarchy): grove-vmm's jail tests (a jailed VMM boots the test guest, fork-snapshots, its child restores in a jail of its own; uid 65534, no capabilities, own mount and PID namespaces, a v2 group with memory.max, cpu.max and pids.max as asked; removed on SIGTERM)
# timeout: 600
. "$GROVE_ROOT/scripts/testhost/lib.sh"
[ -x "${VMM_JAIL_TEST:-}" ] || fail "no jail test binary (scripts/testhost.sh builds it)"
# The test host's init mounts no cgroup file system: mount the unified (v2) hierarchy only,
# as a systemd host with cgroup v2 would have it, so the jailer must take its v2 path.
CG=/sys/fs/cgroup
mountpoint -q "$CG" || mount -t cgroup2 cgroup2 "$CG" || fail "cannot mount cgroup2 at $CG"
[ "$(stat -fc %T "$CG")" = cgroup2fs ] || fail "$CG is not cgroup2 ($(stat -fc %T "$CG"))"
for c in memory cpu pids; do
  grep -qw "$c" "$CG/cgroup.controllers" || fail "cgroup v2 root lacks the $c controller: $(cat "$CG/cgroup.controllers")"
done
grep -q ' cgroup ' /proc/mounts && fail "a cgroup v1 hierarchy is mounted: not a pure v2 host"
log "cgroup v2 at $CG, controllers: $(cat "$CG/cgroup.controllers")"
# The test guest scripts/testhost.sh built (there is no cargo in the test host).
export GROVE_TESTGUEST="$GROVE_ROOT/vmm/testguest/target/release/grove-testguest"
[ -s "$GROVE_TESTGUEST" ] || fail "no test guest at $GROVE_TESTGUEST"
cd "$GROVE_ROOT/vmm"
rc=0
"$VMM_JAIL_TEST" --test-threads=1 >"$GROVE_OUT/jail-test.log" 2>&1 || rc=$?
grep -v "^T*$" "$GROVE_OUT/jail-test.log" | cut -c1-300 | tail -30
grep -q '^test result: ok' "$GROVE_OUT/jail-test.log" || fail "the jail tests failed (status $rc)"
grep -qi 'skip' "$GROVE_OUT/jail-test.log" && fail "a jail test skipped in the test host"
# With no v1 hierarchy mounted, the limits the tests read (memory.max, cpu.max, pids.max of
# the group named in /proc/PID/cgroup) were the v2 group's; and nothing is left of them.
if [ -d "$CG/grove-test" ]; then
  left="$(find "$CG/grove-test" -mindepth 1 -maxdepth 1 -type d | wc -l)"
  [ "$left" -eq 0 ] || fail "$left jail cgroups left under $CG/grove-test"
fi
log PASS
