#!/usr/bin/env bash
# Builds podvisor's guest kernel from Debian's linux-source-6.12 (a registry
# package; no other source): `make allnoconfig`, podvisor.config merged in,
# `olddefconfig`, a check that every fragment option survived
# (check-config.sh), patches/podvisor/ applied (see each patch), then
# `vmlinux` (uncompressed ELF, podvisor-vmm) and `bzImage` (QEMU).
# Everything is built in; there are no modules.
#
# Then, in the same tree (so only what changes is rebuilt), the test-only
# variant `emulated/`: emulated.config merged in and patches/emulated/
# applied, for a KVM that emulates guest kernel code and rejects a few
# instructions that no CPUID bit hides (make test-vmm-linux; see each
# patch).
#
# The result is cached outside the checkout, in
# $PODVISOR_CACHE/kernel/<key> (default /var/cache/podvisor), keyed by the
# source package's version and a hash of the fragment, the patches and these
# scripts, and linked as OUT_DIR. A key already built is not built again; a
# build holds a lock, so two runs do not build it twice.
#
# Outputs (OUT_DIR and OUT_DIR/emulated): vmlinux, bzImage, config (the
# resolved .config), release (`uname -r` in the guest); source (package and
# version) and build-seconds (the cold build's time) in OUT_DIR.
#
# Usage: guest/kernel/build.sh OUT_DIR
# Env:   PODVISOR_CACHE, JOBS (default: nproc)
set -euo pipefail

out=${1:?usage: build.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
cache="${PODVISOR_CACHE:-/var/cache/podvisor}/kernel"
pkg=linux-source-6.12
die() { echo "guest-kernel: $*" >&2; exit 1; }

fragment="$here/podvisor.config"
emulated="$here/emulated.config"
patches() { find "$here/patches/$1" -name '*.patch' | LC_ALL=C sort; }
mapfile -t own < <(patches podvisor)
mapfile -t test_only < <(patches emulated)

version=$(dpkg-query -W -f '${Version}' "$pkg" 2>/dev/null) \
  || die "$pkg is not installed (make deps, or apt-get install $pkg)"
tarball=/usr/src/$pkg.tar.xz
[ -f "$tarball" ] || die "$tarball missing: reinstall $pkg"
for tool in make gcc flex bison bc; do
  command -v "$tool" >/dev/null || die "$tool not found (make deps)"
done

key=$( { echo "$pkg $version"; cat "$fragment" "$emulated" "${own[@]}" "${test_only[@]}" \
  "$here/build.sh" "$here/check-config.sh"; } | sha256sum | cut -c1-16)
dir="$cache/$key"
mkdir -p "$cache" "$(dirname "$out")"

exec 9>"$cache/.lock"
flock 9
if [ ! -f "$dir/emulated/bzImage" ]; then
  work="$cache/.work-$key"
  rm -rf "$work"
  mkdir -p "$work/out/emulated"
  trap 'rm -rf "$work"' EXIT
  echo "guest-kernel: building from $pkg $version (first build: about 30 min on 2 cores)"
  start=$(date +%s)
  tar -C "$work" -xf "$tarball"
  src="$work/$pkg"
  # Reproducible: the same inputs give the same kernel.
  kmake=(make -C "$src" -s O="$work/build" KBUILD_BUILD_TIMESTAMP=@1700000000
    KBUILD_BUILD_USER=podvisor KBUILD_BUILD_HOST=podvisor KBUILD_BUILD_VERSION=1)
  # The kernel of fragments $2..., its resolved config checked, into
  # $work/out/$1.
  build() {
    local to=$1
    shift
    "$src/scripts/kconfig/merge_config.sh" -m -O "$work/build" "$work/build/.config" \
      "$@" >/dev/null
    "${kmake[@]}" olddefconfig
    "$here/check-config.sh" "$work/build/.config" "$@"
    "${kmake[@]}" -j"${JOBS:-$(nproc)}" vmlinux bzImage
    cp "$work/build/vmlinux" "$work/out/$to/vmlinux"
    strip --strip-debug "$work/out/$to/vmlinux"
    cp "$work/build/arch/x86/boot/bzImage" "$work/out/$to/bzImage"
    cp "$work/build/.config" "$work/out/$to/config"
    "${kmake[@]}" kernelrelease > "$work/out/$to/release"
  }
  apply() {
    for p in "$@"; do
      patch -d "$src" -p1 --quiet --forward < "$p" || die "patch $p does not apply to $pkg $version"
    done
  }
  apply "${own[@]}"
  "${kmake[@]}" allnoconfig
  build . "$fragment"
  apply "${test_only[@]}"
  build emulated "$fragment" "$emulated"
  echo "$pkg $version" > "$work/out/source"
  echo "$(( $(date +%s) - start ))" > "$work/out/build-seconds"
  rm -rf "$dir"
  mv "$work/out" "$dir"
fi
flock -u 9
ln -sfn "$dir" "$out"
echo "guest-kernel: $out -> $dir ($(cat "$dir/release"), built in $(cat "$dir/build-seconds") s)"
