#!/usr/bin/env bash
# Compares two grove-vmm binaries on grove-bench's restore and fork figures (test guest, this
# host's KVM) in one session: the same grove-bench binary drives both, invocations alternate
# A B B A A B ... so a drift in the host's load falls on both, and every invocation's JSON is
# kept. Usage:
#   scripts/bench-vmm-ab.sh OLD_VMM NEW_VMM OUTDIR [ROUNDS]
# Environment: GROVE_BENCH (default target/release/grove-bench), GROVE_BENCH_OLD (the bench
#   that drives OLD_VMM, default GROVE_BENCH: a VMM from before the typed control API
#   (a44595f) answers in the old reply shape, which only a grove-bench of its commit reads;
#   the restore and fork measurements themselves did not change), GROVE_TESTGUEST (default:
#   scripts/build-testguest.sh), AB_RESTORE_RUNS (10), AB_FORK_RUNS (5), AB_FORK_CHILDREN (1,4,16).
# Output: OUTDIR/{restore,fork}-{old,new}-N.json and OUTDIR/summary.txt (per row: the median of
# the per-invocation medians and the largest per-invocation p99, old vs new, new/old).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { echo "usage: $0 OLD_VMM NEW_VMM OUTDIR [ROUNDS]" >&2; exit 2; }
old="$(realpath "$1")"; new="$(realpath "$2")"; out="$3"; rounds="${4:-3}"
bench="${GROVE_BENCH:-target/release/grove-bench}"
bench_old="${GROVE_BENCH_OLD:-$bench}"
[ -x "$old" ] && [ -x "$new" ] && [ -x "$bench" ] && [ -x "$bench_old" ] || { echo "missing binary" >&2; exit 2; }
export GROVE_TESTGUEST="${GROVE_TESTGUEST:-$(scripts/build-testguest.sh | tail -1)}"
mkdir -p "$out"
for i in $(seq 1 "$rounds"); do
  # A B on odd rounds, B A on even ones.
  order="old new"; [ $((i % 2)) -eq 0 ] && order="new old"
  for which in $order; do
    vmm="$old"; b="$bench_old"; [ "$which" = new ] && { vmm="$new"; b="$bench"; }
    echo "round $i: restore, $which (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    GROVE_VMM="$vmm" "$b" restore --json --runs "${AB_RESTORE_RUNS:-10}" >"$out/restore-$which-$i.json"
  done
  for which in $order; do
    vmm="$old"; b="$bench_old"; [ "$which" = new ] && { vmm="$new"; b="$bench"; }
    echo "round $i: fork, $which (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    GROVE_VMM="$vmm" "$b" fork --json --runs "${AB_FORK_RUNS:-5}" \
      --children "${AB_FORK_CHILDREN:-1,4,16}" >"$out/fork-$which-$i.json"
  done
done
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import glob, json, os, statistics, sys
out = sys.argv[1]
def load(kind, which):
    return [json.load(open(f)) for f in sorted(glob.glob(os.path.join(out, f"{kind}-{which}-*.json")))]
def rows(kind, docs):
    acc = {}
    for d in docs:
        for r in d["results"]:
            if kind == "restore":
                key = f"{r['path']} [{r['mem_mode']}]"
                metrics = {"restore call -> first T (client)": r.get("client_ms")}
            else:
                key = f"{r['children']} children, {r['start']} [{r['mem_mode']}]"
                metrics = {
                    "parent pause": r.get("parent_pause_ms"),
                    "fork call": r.get("fork_call_ms"),
                    "fork call -> every child's first T": r.get("all_children_running_after_fork_call_ms"),
                    "child Pss / parent Pss (%)": r.get("child_pss_percent_of_parent"),
                }
            for m, s in metrics.items():
                if s:
                    acc.setdefault((key, m), []).append(s)
    return acc
loads = []
for kind in ["restore", "fork"]:
    o, n = load(kind, "old"), load(kind, "new")
    for d in o + n:
        c = d["conditions"]
        loads += [c.get("loadavg_start", ""), c.get("loadavg_end", "")]
    ro, rn = rows(kind, o), rows(kind, n)
    print(f"== {kind}: {len(o)} invocations each; per row: median of the invocations' medians (their p99s' max), n = samples per binary")
    for k in ro:
        if k not in rn: continue
        so, sn = ro[k], rn[k]
        mo = statistics.median(s["median"] for s in so); mn = statistics.median(s["median"] for s in sn)
        po = max(s["p99"] for s in so); pn = max(s["p99"] for s in sn)
        no = sum(s["n"] for s in so); nn = sum(s["n"] for s in sn)
        ratio = mn / mo if mo else float("nan")
        print(f"{k[0]} | {k[1]}: old {mo:.3f} (p99 {po:.3f}) | new {mn:.3f} (p99 {pn:.3f}) | new/old {ratio:.2f} | n {no}/{nn}")
print("loadavg at the invocations' starts and ends:", ", ".join(l.split(" ")[0] for l in loads if l))
PY
