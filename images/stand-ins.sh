#!/usr/bin/env bash
# Local stand-ins for the registry images podvisor's Dockerfiles start FROM,
# made where those registries cannot be reached (no Docker Hub or gcr.io
# here), and tagged with the names the Dockerfiles use, so that the
# Dockerfiles stay what users build with Docker:
#
#   docker.io/library/debian:bookworm-slim    debootstrap (minbase) of bookworm
#   docker.io/library/rust:1-bookworm         that, with the build tools the
#                                             official image has, plus this
#                                             machine's rustup and stable
#                                             toolchain (no docs) under
#                                             /usr/local/{cargo,rustup}
#   gcr.io/distroless/static-debian12:nonroot no shell, no libc: passwd and
#                                             group (nonroot 65532), CA
#                                             certificates, /tmp
#   docker.io/kindest/node:v1.34.0            kind v0.30.0's own node base
#                                             (the base stage of its
#                                             images/base/Dockerfile, from
#                                             the Go module upstream/kind
#                                             pins), then what kind's build
#                                             stages and `kind build
#                                             node-image` add, from what
#                                             this machine builds or has
#                                             instead of GitHub clones (see
#                                             below)
#
# Each trusts what this machine trusts: the CA certificates added to it
# (/usr/local/share/ca-certificates, such as a proxy's), which Debian's
# ca-certificates adds to the bundle when an image installs it.
#
# Each is kept in buildah's storage with a label holding a key of its inputs
# (this script, the suite, the toolchain's version); an image whose key
# matches is not made again.
#
# Usage: images/stand-ins.sh           (as root)
#        images/stand-ins.sh --names   the names it makes, one a line
set -euo pipefail
names=(docker.io/library/debian:bookworm-slim docker.io/library/rust:1-bookworm
       gcr.io/distroless/static-debian12:nonroot docker.io/kindest/node:v1.34.0)
if [ "${1:-}" = --names ]; then printf '%s\n' "${names[@]}"; exit 0; fi
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
suite=bookworm
mirror=http://deb.debian.org/debian
label=io.podvisor.stand-in
export BUILDAH_ISOLATION=chroot

die() { echo "stand-ins: $*" >&2; exit 1; }
key() { { cat "$here/stand-ins.sh"; echo "$@"; } | sha256sum | cut -c1-16; }
# Whether image NAME exists with key KEY.
have() {
  [ "$(buildah inspect --type image --format "{{index .OCIv1.Config.Labels \"$label\"}}" "$1" \
        2>/dev/null)" = "$2" ]
}
# Commits working container C as NAME with key KEY.
commit() {
  buildah config --label "$label=$3" "$1"
  buildah commit -q --rm "$1" "$2" >/dev/null
  echo "stand-ins: $2 made ($(buildah images --format '{{.Size}}' "$2"))"
}

# --- debian:bookworm-slim ---
slim=${names[0]}
local_cas=/usr/local/share/ca-certificates
slim_key=$(key "$suite $mirror" "$(cat "$local_cas"/*.crt 2>/dev/null | sha256sum)")
if ! have "$slim" "$slim_key"; then
  command -v debootstrap >/dev/null || die "debootstrap missing (make deps)"
  work=$(mktemp -d /var/tmp/podvisor-debootstrap.XXXXXX)
  trap 'rm -rf "$work"' EXIT
  debootstrap --variant=minbase "$suite" "$work/root" "$mirror" >"$work/log" 2>&1 ||
    { tail -20 "$work/log" >&2; die "debootstrap $suite failed"; }
  cat > "$work/root/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb http://deb.debian.org/debian-security $suite-security main
EOF
  mkdir -p "$work/root$local_cas"
  cp "$local_cas"/*.crt "$work/root$local_cas/" 2>/dev/null || true
  rm -rf "$work"/root/var/cache/apt/archives/*.deb "$work"/root/var/lib/apt/lists/* \
    "$work"/root/var/log/* "$work/root/dev"/*
  c=$(buildah from --pull=never scratch)
  tar -C "$work/root" -c . | tar -C "$(buildah mount "$c")" -x
  buildah umount "$c" >/dev/null
  buildah config --cmd bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --os linux --arch amd64 "$c"
  commit "$c" "$slim" "$slim_key"
  rm -rf "$work"
  trap - EXIT
fi

# --- rust:1-bookworm ---
rust=${names[1]}
toolchain=$(rustup default | awk '{print $1}')
rust_version=$(rustc --version | awk '{print $2}')
rust_key=$(key "$slim_key $toolchain $rust_version")
if ! have "$rust" "$rust_key"; then
  rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
  cargo_home=${CARGO_HOME:-$HOME/.cargo}
  [ -d "$rustup_home/toolchains/$toolchain" ] || die "no toolchain $toolchain in $rustup_home"
  c=$(buildah from --pull=never "$slim")
  # What the official image's base (buildpack-deps) brings for builds.
  buildah run "$c" -- sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends ca-certificates curl wget git gcc g++ \
      libc6-dev make pkg-config xz-utils bzip2 patch file procps >/dev/null \
    && rm -rf /var/lib/apt/lists/*'
  mnt=$(buildah mount "$c")
  mkdir -p "$mnt/usr/local/cargo/bin" "$mnt/usr/local/rustup/toolchains"
  install -m 0755 "$cargo_home/bin/rustup" "$mnt/usr/local/cargo/bin/rustup"
  for proxy in cargo rustc rustdoc rustfmt cargo-fmt cargo-clippy clippy-driver rust-gdb rust-lldb; do
    ln -sf rustup "$mnt/usr/local/cargo/bin/$proxy"
  done
  tar -C "$rustup_home/toolchains" --exclude="$toolchain/share/doc" -c "$toolchain" |
    tar -C "$mnt/usr/local/rustup/toolchains" -x
  printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\n' "$toolchain" \
    > "$mnt/usr/local/rustup/settings.toml"
  buildah umount "$c" >/dev/null
  buildah config --env RUSTUP_HOME=/usr/local/rustup --env CARGO_HOME=/usr/local/cargo \
    --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env RUST_VERSION="$rust_version" "$c"
  commit "$c" "$rust" "$rust_key"
fi

# --- distroless/static-debian12:nonroot ---
static=${names[2]}
static_key=$(key "static" "$(sha256sum < /etc/ssl/certs/ca-certificates.crt)")
if ! have "$static" "$static_key"; then
  [ -f /etc/ssl/certs/ca-certificates.crt ] || die "no CA bundle (ca-certificates)"
  c=$(buildah from --pull=never scratch)
  mnt=$(buildah mount "$c")
  mkdir -p "$mnt"/{etc/ssl/certs,home/nonroot,tmp,root}
  chmod 1777 "$mnt/tmp"
  chmod 0700 "$mnt/root"
  chown 65532:65532 "$mnt/home/nonroot"
  cp /etc/ssl/certs/ca-certificates.crt "$mnt/etc/ssl/certs/"
  printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
    'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' > "$mnt/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' > "$mnt/etc/group"
  buildah umount "$c" >/dev/null
  buildah config --user 65532 --workingdir /home/nonroot \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt --os linux --arch amd64 "$c"
  commit "$c" "$static" "$static_key"
fi

# --- kindest/node:v1.34.0 ---
# kind's base stage runs as kind releases it. Its build stages clone
# containerd, runc, crictl and the CNI plugins from GitHub, and `kind build
# node-image` adds Kubernetes' binaries; in their place: containerd 2.x,
# crictl and kubelet, kubeadm, kubectl from upstream/build.sh (the Go module
# proxy; Kubernetes at upstream/k8s's patch release, not exactly v1.34.0),
# runc and the CNI plugins from Debian. Left out: the control-plane and
# kindnet images kind preloads, its default CNI and storage manifests, and
# the rootless-only fuse-overlayfs snapshotter, so this node is a base to
# build on and inspect here, not one `kind create cluster` could run.
kind=${names[3]}
"$root/upstream/build.sh" k8s containerd cri-tools >/dev/null
up="$root/build/upstream"
kind_dir=$(cd "$root/upstream/kind" && GOFLAGS=-mod=readonly go mod download -json sigs.k8s.io/kind |
  sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
[ -d "$kind_dir/images/base" ] || die "kind's module has no images/base (upstream/kind)"
kind_key=$(key "$slim_key $kind_dir" "$(readlink -f "$up/k8s" "$up/containerd" "$up/cri-tools")" \
  "$(dpkg-query -W runc containernetworking-plugins)")
if ! have "$kind" "$kind_key"; then
  for bin in /usr/sbin/runc /usr/lib/cni/host-local; do
    [ -x "$bin" ] || die "$bin missing (make deps)"
  done
  base=localhost/podvisor/kind-base:latest
  log=$(mktemp /var/tmp/podvisor-kind-base.XXXXXX)
  buildah bud --pull=never --target base --build-arg BASE_IMAGE="$slim" -t "$base" \
    -f "$kind_dir/images/base/Dockerfile" "$kind_dir/images/base" >"$log" 2>&1 ||
    { tail -30 "$log" >&2; die "kind's base stage failed (log: $log)"; }
  rm -f "$log"
  c=$(buildah from --pull=never "$base")
  mnt=$(buildah mount "$c")
  install -m 0755 -t "$mnt/usr/local/bin" "$up/containerd/containerd" "$up/containerd/ctr" \
    "$up/containerd/containerd-shim-runc-v2" "$up/cri-tools/crictl"
  install -m 0755 /usr/sbin/runc "$mnt/usr/local/sbin/runc"
  install -d "$mnt/opt/cni/bin"
  install -m 0755 -t "$mnt/opt/cni/bin" /usr/lib/cni/{host-local,loopback,ptp,portmap}
  install -m 0755 -t "$mnt/usr/bin" "$up/k8s/kubeadm" "$up/k8s/kubelet" "$up/k8s/kubectl"
  "$up/k8s/kubelet" --version | awk '{print $2}' > "$mnt/kind/version"
  buildah umount "$c" >/dev/null
  # As kind's build stage: the runtime spec its containerd config names.
  buildah run "$c" -- sh -c 'ctr oci spec \
      | jq ".hooks.createContainer[.hooks.createContainer| length] |= . + {\"path\": \"/kind/bin/mount-product-files.sh\"}" \
      | jq "del(.process.rlimits)" > /etc/containerd/cri-base.json \
    && containerd --version >/dev/null && runc --version >/dev/null'
  buildah config --cmd '' "$c"
  buildah config --env container=docker --stop-signal SIGRTMIN+3 \
    --entrypoint '["/usr/local/bin/entrypoint", "/sbin/init"]' "$c"
  commit "$c" "$kind" "$kind_key"
  buildah rmi "$base" >/dev/null 2>&1 || true
fi
