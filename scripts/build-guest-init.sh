#!/usr/bin/env bash
# Builds guest-init as a static binary (glibc, crt-static) for x86_64-unknown-linux-gnu
# with its own target dir, so its RUSTFLAGS never invalidate the workspace build.
# Also builds guest-ctl (the shell client, static too) next to it.
# Prints guest-init's path on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${GUEST_INIT_TARGET_DIR:-$PWD/build/target-guest-init}"
CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --quiet -p guest-init --bins --target x86_64-unknown-linux-gnu
bin="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/guest-init"
if readelf -l "$bin" | grep -q 'Requesting program interpreter'; then
  echo "build-guest-init: $bin is not static" >&2
  exit 1
fi
echo "$bin"
