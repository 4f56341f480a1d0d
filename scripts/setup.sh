#!/usr/bin/env bash
# Sets up a fresh Debian host of the project's kind (root) for building and
# testing Grove: Debian packages, Rust components, then a release build of the
# workspace and the test guest. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential pkg-config
  clang libclang-dev          # bindgen (devicemapper-sys), BPF programs
  libbpf-dev bpftool          # netd's BPF programs (<bpf/bpf_helpers.h>), inspecting them
  libdevmapper-dev            # devicemapper crate (dm-thin backend)
  e2fsprogs                   # mkfs.ext4 -d for root images, debugfs for the test host's probe image, block-store tests
  debootstrap cpio zstd xz-utils lz4 busybox-static   # guest images
  bc flex bison libelf-dev libssl-dev   # scripts/build-kernel.sh (the minimal guest kernel)
  iproute2                    # netns/veth/tap for network tests
  nftables                    # netd test: a ct rule makes the host namespace track connections (conntrack scrub)
  python3                     # scripts/demo.sh reads grove --json output
  python3-venv                # build/pyenv: the Python client (clients/python) and pytest
  tmux                        # the test host's agentd scenario runs grove exec -t in a terminal
)

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# QEMU runs the test host (scripts/testhost.sh). Its emulation of nested SVM corrupts a
# guest's state now and then (docs/testing.md, "the test host's known failures"); the
# tier is measured with QEMU 10, which on bookworm comes from bookworm-backports (the same
# source as this kind of machine's qemu-utils). Elsewhere the distribution's own.
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n '1s/^QEMU emulator version \([0-9]*\)\..*/\1/p'; }
qemu="$(qemu_major || true)"
if [ -z "$qemu" ] || [ "$qemu" -lt 10 ]; then
  target=()
  if grep -qx 'VERSION_CODENAME=bookworm' /etc/os-release; then
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      echo "setup: adding bookworm-backports (for QEMU 10)" >&2
      printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
        'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
        | $SUDO tee /etc/apt/sources.list.d/grove-bookworm-backports.sources >/dev/null
    fi
    target=(-t bookworm-backports)
  fi
  echo "setup: installing qemu-system-x86 ${target[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${target[@]}" qemu-system-x86 >/dev/null
  echo "setup: $(qemu-system-x86_64 --version | head -1)" >&2
fi

rustup component add clippy rustfmt >/dev/null 2>&1 || true

echo "setup: building the workspace (release)" >&2
cargo build --release --workspace --quiet
echo "setup: building the test guest" >&2
scripts/build-testguest.sh >/dev/null
# The Python client (clients/python) and pytest in a venv: scripts/test.sh runs its tests,
# the test host's agentd-python scenario its example (the venv is visible inside). pip's
# downloads are cached outside the clone.
echo "setup: Python client venv (build/pyenv)" >&2
[ -x build/pyenv/bin/python ] || python3 -m venv build/pyenv
PIP_CACHE_DIR="${GROVE_CACHE:-/var/cache/grove}/pip" build/pyenv/bin/pip install -q \
  --disable-pip-version-check ./clients/python pytest
echo "setup: done" >&2
