#!/usr/bin/env bash
# Builds the images the repository's Dockerfiles define with buildah,
# daemonless, from the Dockerfiles as users build them with Docker: the
# controller and node images (Dockerfile) and the kind node image on the
# node image (e2e/kind/Dockerfile). Exports each as an OCI archive,
# build/images/<name>.tar, tagged docker.io/podvisor/<name>:<version> (the
# chart's appVersion).
# Prints each image's size.
#
# The registry images the Dockerfile starts FROM are local stand-ins where
# the registries cannot be reached (images/stand-ins.sh). The build's cache
# mounts are this machine's caches, outside the checkout: the crates
# cargo already fetched, the guest kernel (keyed by its inputs, shared with
# guest/kernel/build.sh), and a cargo target directory of the image
# build's own (/var/cache/podvisor/image-target).
#
# Usage: images/build.sh [OUT_DIR]   (as root; default build/images)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
out="${1:-$root/build/images}"
cache="${PODVISOR_CACHE:-/var/cache/podvisor}"
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$root/charts/podvisor/Chart.yaml")
[ -n "$version" ] || { echo "images: no appVersion in charts/podvisor/Chart.yaml" >&2; exit 1; }
export BUILDAH_ISOLATION=chroot
# buildah keeps RUN --mount=type=cache directories under $TMPDIR/buildah-cache/<id>:
# each id points at the cache it stands for.
export TMPDIR="$cache/buildah-tmp"
mounts="$TMPDIR/buildah-cache"
mkdir -p "$mounts" "$cache/kernel" "$cache/image-target" "${CARGO_HOME:-$HOME/.cargo}/registry" "$out"
link() { [ "$(readlink "$mounts/$1" 2>/dev/null)" = "$2" ] || { rm -rf "${mounts:?}/$1"; ln -s "$2" "$mounts/$1"; }; }
link podvisor-cargo-registry "${CARGO_HOME:-$HOME/.cargo}/registry"
link podvisor-kernel "$cache/kernel"
link podvisor-target "$cache/image-target"

"$here/stand-ins.sh"

# The builder's tools, tagged so that its layers are kept below.
toolchain=localhost/podvisor/toolchain:latest
buildah bud --pull=never --layers --target toolchain -t "$toolchain" -f "$root/Dockerfile" "$root" \
  > "$out/toolchain.log" 2>&1 || { tail -40 "$out/toolchain.log" >&2; echo "images: the toolchain stage failed (log: $out/toolchain.log)" >&2; exit 1; }

kept=("$toolchain")
# build NAME DOCKERFILE [BUILDAH-BUD-ARGS...]: docker.io/podvisor/NAME, as
# $out/NAME.tar.
build() {
  local name=$1 file=$2 tag="docker.io/podvisor/$1:$version" started
  shift 2
  started=$(date +%s)
  buildah bud --pull=never --layers "$@" -t "$tag" -f "$file" "$root" > "$out/$name.log" 2>&1 ||
    { tail -40 "$out/$name.log" >&2; echo "images: $name failed (log: $out/$name.log)" >&2; exit 1; }
  rm -f "$out/$name.tar"
  buildah push -q "$tag" "oci-archive:$out/$name.tar:$tag"
  kept+=("$tag")
  echo "images: $tag -> $out/$name.tar ($(du -h "$out/$name.tar" | cut -f1), built in $(( $(date +%s) - started )) s)"
}
# The guest image's initramfs holds /dev/console: mknod, as Docker's RUN may.
build controller "$root/Dockerfile" --target controller --cap-add CAP_MKNOD
build node "$root/Dockerfile" --target node --cap-add CAP_MKNOD
# kind's node with podvisor installed on it by the node image's installer.
build kind-node "$root/e2e/kind/Dockerfile" --build-arg PODVISOR_NODE="docker.io/podvisor/node:$version"

# Every other image of earlier builds goes (each build leaves a layer of
# the source and one of its results); the stand-ins, the toolchain stage and
# these images stay.
keep=$(for name in "${kept[@]}" $("$here/stand-ins.sh" --names); do
  buildah images -q --no-trunc "$name"; done | sort -u)
for id in $(buildah images -a -q --no-trunc | sort -u); do
  grep -qx "$id" <<<"$keep" || buildah rmi -f "$id" >/dev/null 2>&1 || true
done
