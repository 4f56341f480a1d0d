#!/usr/bin/env bash
# After netd's tests: fails if anything they create is left on the host:
# namespaces and links named gt*/gb* (test and bench prefixes), BPF programs
# named grove_*, pin directories under /sys/fs/bpf/grove.
set -euo pipefail
leaks=()
while read -r ns _; do
  [[ "$ns" =~ ^g[tb][0-9a-f]{5} ]] && leaks+=("netns $ns")
done < <(ip netns list 2>/dev/null || true)
while read -r link; do
  [[ "$link" =~ ^g[tb][0-9a-f]{5} ]] && leaks+=("link $link")
done < <(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1)
if command -v bpftool >/dev/null; then
  # Programs are freed once their last holder is gone (RCU): give them a moment.
  for _ in 1 2 3 4 5; do
    progs=$(bpftool prog show 2>/dev/null | grep -cE 'name grove_' || true)
    [ "$progs" = 0 ] && break
    sleep 1
  done
  [ "$progs" = 0 ] || leaks+=("$progs BPF programs named grove_*")
else
  echo "netd-leakcheck: bpftool missing, BPF programs not checked" >&2
fi
if [ -d /sys/fs/bpf/grove ]; then
  for d in /sys/fs/bpf/grove/*; do
    [ -e "$d" ] || continue
    [[ "$(basename "$d")" =~ ^g[tb][0-9a-f]{5} ]] && leaks+=("pins $d")
  done
fi
if ((${#leaks[@]})); then
  printf 'netd-leakcheck: left behind: %s\n' "${leaks[@]}" >&2
  exit 1
fi
echo "netd-leakcheck: nothing left behind" >&2
