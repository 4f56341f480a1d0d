#!/usr/bin/env bash
# Fetches Debian's cloud kernel (linux-image-cloud-amd64) and produces, under build/kernel/:
#   bzImage             the compressed kernel as Debian ships it (vmlinuz)
#   vmlinux             the uncompressed ELF, extracted from the bzImage (extract-vmlinux logic)
#   config              the kernel's .config
#   initramfs.cpio.gz   guest-init as /init + the modules the guest needs (with their deps)
# Outputs are cached: the .deb is downloaded once; the initramfs is rebuilt when guest-init
# changes. Set KERNEL_PACKAGE to pin another package (default: linux-image-cloud-amd64).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="$ROOT/build/kernel"
CACHE="$ROOT/build/cache"
mkdir -p "$OUT" "$CACHE"

# Modules the guest may need; their dependencies are added automatically. Built-in ones
# (ext4, crc32c here) are skipped.
MODULES=(virtio virtio_ring virtio_pci virtio_mmio virtio_blk virtio_net virtio_console
         virtio_rng vsock vmw_vsock_virtio_transport)

meta="${KERNEL_PACKAGE:-linux-image-cloud-amd64}"
# Resolve the metapackage to the versioned image package.
resolve_pkg() { apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
pkg="$(resolve_pkg)"
if [ -z "$pkg" ] && [ "$(id -u)" -eq 0 ]; then
  echo "fetch-kernel: $meta unknown to apt; running apt-get update" >&2
  apt-get update -qq >&2 || true
  pkg="$(resolve_pkg)"
fi
if [ -z "$pkg" ]; then
  if apt-cache show "$meta" >/dev/null 2>&1; then pkg="$meta"; else
    echo "fetch-kernel: cannot resolve $meta (run apt-get update?)" >&2; exit 1
  fi
fi
kver="${pkg#linux-image-}"
deb="$(ls "$CACHE"/"${pkg}"_*.deb 2>/dev/null | head -1 || true)"
if [ -z "$deb" ]; then
  echo "fetch-kernel: downloading $pkg" >&2
  for attempt in 1 2; do
    (cd "$CACHE" && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
    ls "$CACHE"/"${pkg}"_*.deb >/dev/null 2>&1 && break
    echo "fetch-kernel: download attempt $attempt failed" >&2
  done
  deb="$(ls "$CACHE"/"${pkg}"_*.deb 2>/dev/null | head -1 || true)"
  [ -n "$deb" ] || { echo "fetch-kernel: apt-get download $pkg failed" >&2; exit 1; }
fi

x="$CACHE/$pkg"
if [ ! -f "$x/boot/vmlinuz-$kver" ]; then
  rm -rf "$x"
  dpkg-deb -x "$deb" "$x"
fi
cp -p "$x/boot/vmlinuz-$kver" "$OUT/bzImage"
cp -p "$x/boot/config-$kver" "$OUT/config"

# --- vmlinux: the kernel tree's scripts/extract-vmlinux, reimplemented -------------------
# The bzImage header (boot protocol >= 2.08) says where the compressed payload is:
# setup_sects at 0x1f1, payload_offset (u32) at 0x248 and payload_length (u32) at 0x24c,
# relative to the protected-mode code at (setup_sects + 1) * 512. The payload's magic
# names the compressor; the decompressed result must be an ELF file.
u8_at() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
u32_at() { od -An -tu4 -j "$2" -N4 --endian=little "$1" | tr -d ' '; }
extract_vmlinux() {
  local img="$1" out="$2"
  local tmp="$2.tmp" setup off len magic cmd
  [ "$(od -An -c -j 0x202 -N4 "$img" | tr -d ' ')" = "HdrS" ] || { echo "fetch-kernel: $img is not a bzImage" >&2; return 1; }
  setup="$(u8_at "$img" $((0x1f1)))"; [ "$setup" -eq 0 ] && setup=4
  off=$(( (setup + 1) * 512 + $(u32_at "$img" $((0x248))) ))
  len="$(u32_at "$img" $((0x24c)))"
  magic="$(od -An -tx1 -j "$off" -N4 "$img" | tr -d ' ')"
  case "$magic" in
    1f8b*) cmd="gzip -dc" ;;
    fd377a58) cmd="xz -dc" ;;
    425a68*) cmd="bzip2 -dc" ;;
    5d0000*) cmd="xz -dc --format=lzma" ;;
    894c5a*) cmd="lzop -dc" ;;
    02214c18) cmd="lz4 -dc" ;;
    28b52ffd) cmd="zstd -dc" ;;
    *) echo "fetch-kernel: unknown payload magic $magic" >&2; return 1 ;;
  esac
  tail -c+"$((off + 1))" "$img" | head -c "$len" | $cmd >"$tmp" 2>/dev/null || true
  if [ "$(od -An -tx1 -N4 "$tmp" | tr -d ' ')" != "7f454c46" ]; then
    rm -f "$tmp"; echo "fetch-kernel: ${cmd%% *} payload did not decompress to an ELF" >&2; return 1
  fi
  mv "$tmp" "$out"
  echo "fetch-kernel: vmlinux extracted (${cmd%% *} payload at offset $off, $len bytes)" >&2
}
if [ ! -s "$OUT/vmlinux" ] || [ "$OUT/bzImage" -nt "$OUT/vmlinux" ]; then
  extract_vmlinux "$OUT/bzImage" "$OUT/vmlinux" || { echo "fetch-kernel: could not extract vmlinux" >&2; exit 1; }
fi

# --- initramfs -----------------------------------------------------------------------------
GI="$(scripts/build-guest-init.sh | tail -1)"
mods="$x/lib/modules/$kver"
# Dependencies come from each module's .modinfo "depends=" field (no depmod needed).
declare -A seen=()
order=()
builtin_has() { grep -q "/$1\.ko\$" "$mods/modules.builtin" 2>/dev/null; }
find_ko() { find "$mods/kernel" -name "$1.ko" -o -name "$(echo "$1" | tr _ -).ko" | head -1; }
add_mod() {
  local m="${1//-/_}" ko deps d
  [ -n "${seen[$m]:-}" ] && return 0
  seen[$m]=1
  builtin_has "$m" && return 0
  builtin_has "${m//_/-}" && return 0
  ko="$(find_ko "$m")"
  [ -n "$ko" ] || { echo "fetch-kernel: module $m not found in $kver" >&2; return 1; }
  deps="$(tr '\0' '\n' <"$ko" | LC_ALL=C grep -a '^depends=' | head -1 | cut -d= -f2 | tr ',' ' ')"
  for d in $deps; do add_mod "$d"; done
  order+=("$m:$ko:$deps")
}
for m in "${MODULES[@]}"; do add_mod "$m"; done

stamp="$OUT/.initramfs.stamp"
want="$(sha256sum "$GI" | cut -c1-64) $kver ${MODULES[*]}"
if [ ! -s "$OUT/initramfs.cpio.gz" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  ir="$(mktemp -d)"
  trap 'rm -rf "$ir"' EXIT
  mkdir -p "$ir"/{dev,proc,sys,run,tmp,newroot,lib/modules}
  install -m 0755 "$GI" "$ir/init"
  # modules.dep in guest-init's own format: "name: dep dep" per line, files as <name>.ko.
  : >"$ir/lib/modules/modules.dep"
  for e in "${order[@]}"; do
    IFS=: read -r m ko deps <<<"$e"
    cp "$ko" "$ir/lib/modules/$m.ko"
    echo "$m: ${deps//-/_}" >>"$ir/lib/modules/modules.dep"
  done
  echo "$kver" >"$ir/lib/modules/version"
  (cd "$ir" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -6 >"$OUT/initramfs.cpio.gz.tmp")
  mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
  echo "$want" >"$stamp"
fi

echo "kernel version: $kver" >&2
echo "$OUT/bzImage"
echo "$OUT/vmlinux"
echo "$OUT/initramfs.cpio.gz"
