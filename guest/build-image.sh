#!/usr/bin/env bash
# Builds the podvisor guest image from registry packages only.
#
# GUEST_KERNEL=podvisor (default): podvisor's own kernel (guest/kernel/,
# `make guest-kernel`), everything built in:
#   kernel     its bzImage (QEMU)
#   vmlinux    its uncompressed ELF (podvisor-vmm)
#   initramfs  the agent as /init, uncompressed (no modules, nothing to
#              decompress)
# GUEST_KERNEL=debian: Debian's linux-image-cloud-amd64, the stock distro
# kernel:
#   kernel     its vmlinuz (both backends)
#   initramfs  the agent as /init, the kernel modules of guest/modules
#              (loaded at boot) and guest/modules-on-demand (loaded when the
#              kernel asks) with their dependencies, and the modules.dep and
#              modules.alias depmod made for them; zstd
# Both: cpio newc, every timestamp and owner fixed so the same inputs give
# the same bytes; a manifest with the kernel's source, version, release,
# checksums (and for podvisor's kernel its resolved config, one
# `kernel_config CONFIG_...` line per option set).
#
# Usage: guest/build-image.sh AGENT_BINARY OUT_DIR
# Env:   GUEST_KERNEL=podvisor|debian; podvisor: KERNEL_DIR (default
#        build/kernel, what guest/kernel/build.sh made); debian:
#        KERNEL_PACKAGE=linux-image-6.1.0-NN-cloud-amd64 (default: what the
#        linux-image-cloud-amd64 metapackage points at), KERNEL_VERSION
#        (default: the candidate apt sees), CACHE_DIR (default: build/cache).
set -euo pipefail

agent=${1:?usage: build-image.sh AGENT_BINARY OUT_DIR}
out=${2:?usage: build-image.sh AGENT_BINARY OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
cache=${CACHE_DIR:-build/cache}
epoch=${SOURCE_DATE_EPOCH:-1700000000}

die() { echo "build-image: $*" >&2; exit 1; }
[ -x "$agent" ] || die "agent binary $agent missing (build it for x86_64-unknown-linux-musl)"
file -b "$agent" | grep -q 'static' || die "$agent is not statically linked"
for tool in cpio sha256sum; do
  command -v "$tool" >/dev/null || die "$tool not found (make deps)"
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{proc,sys,dev,run,tmp,etc/podvisor} "$out"
rm -f "$out/vmlinux"

# The initramfs of $root on stdout: cpio newc, reproducible.
initramfs() {
  install -m 0755 "$agent" "$root/init"
  mknod -m 600 "$root/dev/console" c 5 1
  find "$root" -exec touch -h -d "@$epoch" {} +
  (cd "$root" && find . -print0 | LC_ALL=C sort -z \
    | cpio --quiet --null -o -H newc --reproducible -R 0:0)
}

podvisor_kernel() {
  local kdir=${KERNEL_DIR:-build/kernel}
  [ -f "$kdir/bzImage" ] && [ -f "$kdir/vmlinux" ] \
    || die "no kernel in $kdir (make guest-kernel)"
  initramfs > "$out/initramfs.tmp"
  mv "$out/initramfs.tmp" "$out/initramfs"
  cp "$kdir/bzImage" "$out/kernel"
  cp "$kdir/vmlinux" "$out/vmlinux"
  {
    echo "kernel podvisor"
    echo "kernel_source $(cat "$kdir/source")"
    echo "kernel_release $(cat "$kdir/release")"
    (cd "$out" && sha256sum kernel vmlinux initramfs)
    grep '^CONFIG_' "$kdir/config" | sed 's/^/kernel_config /'
  } > "$out/manifest"
}

debian_kernel() {
  for tool in apt-cache apt-get dpkg-deb depmod modprobe zstd; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install kmod zstd)"
  done
  local pkg ver deb krel mods on_demand m ko rel
  pkg=${KERNEL_PACKAGE:-$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')}
  [ -n "$pkg" ] || die "cannot resolve linux-image-cloud-amd64 (run apt-get update)"
  ver=${KERNEL_VERSION:-$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')}
  [ -n "$ver" ] && [ "$ver" != "(none)" ] || die "no version of $pkg available"

  mkdir -p "$cache"
  deb="$cache/${pkg}_${ver}_amd64.deb"
  if [ ! -f "$deb" ]; then
    echo "build-image: downloading $pkg $ver"
    (cd "$cache" && apt-get download -q "$pkg=$ver" 2>&1 | grep -v 'unsandboxed' || true)
    [ -f "$deb" ] || die "download of $pkg=$ver failed"
  fi
  dpkg-deb -x "$deb" "$work/pkg"
  krel=$(ls "$work/pkg/lib/modules")
  [ -n "$krel" ] || die "no modules in $deb"
  depmod -b "$work/pkg" "$krel"

  # The modules and everything they depend on.
  mods=$(grep -v '^\s*\(#\|$\)' "$here/modules")
  on_demand=$(grep -v '^\s*\(#\|$\)' "$here/modules-on-demand")
  mkdir -p "$root/lib/modules/$krel"
  for m in $mods $on_demand; do
    modprobe -d "$work/pkg" -S "$krel" --show-depends "$m" \
      || die "module $m not found in $pkg"
  done | awk '$1 == "insmod" {print $2}' | sort -u | while read -r ko; do
    rel=${ko#"$work/pkg/lib/modules/$krel/"}
    mkdir -p "$root/lib/modules/$krel/$(dirname "$rel")"
    cp "$ko" "$root/lib/modules/$krel/$rel"
  done
  cp "$work/pkg/lib/modules/$krel"/modules.{builtin,builtin.modinfo,order} \
    "$root/lib/modules/$krel/"
  depmod -b "$root" "$krel"
  # The agent reads modules.dep, modules.alias and modules.builtin only.
  find "$root/lib/modules/$krel" -maxdepth 1 -name 'modules.*' \
    ! -name modules.dep ! -name modules.alias ! -name modules.builtin -delete
  printf '%s\n' $mods > "$root/etc/podvisor/modules"

  initramfs | zstd -q -19 -T1 > "$out/initramfs.tmp"
  mv "$out/initramfs.tmp" "$out/initramfs"
  cp "$work/pkg/boot/vmlinuz-$krel" "$out/kernel"
  {
    echo "kernel debian"
    echo "kernel_source $pkg $ver"
    echo "kernel_release $krel"
    echo "modules $(echo $mods)"
    echo "modules_on_demand $(echo $on_demand)"
    (cd "$out" && sha256sum kernel initramfs)
  } > "$out/manifest"
}

case ${GUEST_KERNEL:-podvisor} in
  podvisor) podvisor_kernel ;;
  debian) debian_kernel ;;
  *) die "GUEST_KERNEL=${GUEST_KERNEL} is neither podvisor nor debian" ;;
esac
echo "build-image: $out: $(awk '$1 == "kernel" || $1 == "kernel_release" {printf "%s ", $2}' "$out/manifest")kernel $(stat -c %s "$out/kernel") bytes, initramfs $(stat -c %s "$out/initramfs") bytes"
