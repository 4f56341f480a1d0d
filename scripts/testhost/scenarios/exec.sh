#!/usr/bin/env bash
# what: runs its arguments as a command inside the test host (debugging: scripts/testhost.sh exec -- CMD...)
# timeout: 600
. "$GROVE_ROOT/scripts/testhost/lib.sh"
[ "${1:-}" = "--" ] && shift
[ $# -ge 1 ] || fail "usage: scripts/testhost.sh exec -- CMD [ARGS...]"
"$@"
