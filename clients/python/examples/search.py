#!/usr/bin/env python3
"""A search loop over forks: fork a running sandbox into N children, run a different
candidate in each, keep the child whose output scores best, delete the others.

    python3 examples/search.py --endpoint unix:/run/grove/agentd.sock --template linux
    python3 examples/search.py --sandbox sb-0123456789abcdef     # fork an existing one

Each child gets its candidate (an arithmetic expression) in its environment and in a file,
and runs its own command, which prints ``score=N``; the fork and every child's output come
back on one stream (SandboxService.ForkRun). The winner is kept with SandboxService.Keep,
which deletes its siblings in the same call; the parent stays. Needs a template whose guest
runs guest-init's agent (``grove template add --guest-agent``). ``--json`` ends with a
one-line summary for scripts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import List, Optional

from grove_client import Child, Client, GroveError, Output, Sandbox

CANDIDATES = ["3 * 7", "2 + 2", "6 * 9", "5 * 5"]


def score_of(stdout: bytes) -> Optional[int]:
    m = re.search(rb"^score=(-?\d+)$", stdout, re.M)
    return int(m.group(1)) if m else None


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", default="unix:/run/grove/agentd.sock")
    ap.add_argument("--template", default="linux", help="create the parent from this template")
    ap.add_argument("--sandbox", help="fork this running sandbox instead of creating one")
    ap.add_argument("--candidates", nargs="+", default=CANDIDATES, metavar="EXPR",
                    help="one child per expression (shell arithmetic)")  # fmt: skip
    ap.add_argument("--json", action="store_true", help="print a JSON summary last")
    args = ap.parse_args(argv)

    with Client(args.endpoint) as client:
        if args.sandbox:
            parent = Sandbox.get(client, args.sandbox)
            print(f"parent {parent.id} ({parent.state})")
        else:
            parent = Sandbox.create(client, template=args.template, labels={"job": "search"})
            print(f"parent {parent.id} created from template {args.template}")

        # One child per candidate: its own command, environment and file.
        children = [
            Child(
                cmd=f'echo "candidate $CANDIDATE ($(cat /run/candidate))"; echo "score=$(( {expr} ))"',
                env={"CANDIDATE": str(i)},
                files={"/run/candidate": expr.encode()},
                labels={"candidate": str(i)},
            )
            for i, expr in enumerate(args.candidates)
        ]

        def show(index: int, out: Output) -> None:
            for line in out.data.decode(errors="replace").splitlines():
                print(f"  [{index}] {line}")

        print(f"forking {parent.id} into {len(children)} children")
        results = parent.fork_run(children, labels={"job": "search"}, on_output=show)

        scored = []
        for r in results:
            s = score_of(r.stdout)
            status = r.error or f"exit {r.exit_code}"
            print(f"child {r.index} {r.sandbox.id}: {args.candidates[r.index]!r} -> "
                  f"score {s if s is not None else '-'} ({status})")  # fmt: skip
            if r.ok and s is not None:
                scored.append((s, r))
        if not scored:
            print("no child produced a score; deleting them all", file=sys.stderr)
            for r in results:
                r.sandbox.delete(subtree=True)
            return 1

        best_score, best = max(scored, key=lambda x: x[0])
        deleted = parent.keep(best.sandbox)
        print(f"winner: child {best.index} {best.sandbox.id} (score {best_score})")
        print(f"kept it; deleted {len(deleted)} siblings: {' '.join(deleted)}")
        check = best.sandbox.run("cat /run/candidate")
        print(f"the winner runs on: /run/candidate = {check.stdout.decode()!r}")
        if args.json:
            print(json.dumps({
                "parent": parent.id,
                "winner": {"index": best.index, "id": best.sandbox.id, "score": best_score},
                "deleted": deleted,
                "children": [r.sandbox.id for r in results],
            }))  # fmt: skip
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GroveError as e:
        print(f"search: {e}", file=sys.stderr)
        sys.exit(1)
