#!/usr/bin/env bash
# Builds the upstream binaries the tests run, each from the Go module proxy
# at the release its module here pins:
#   k8s         etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
#               kube-proxy, kubelet, kubectl (the local cluster), kubeadm
#               (kindest/node's stand-in, images/stand-ins.sh)
#   helm        helm (the chart tests)
#   containerd  containerd 2.x, ctr, containerd-shim-runc-v2 (the tests'
#               second containerd beside Debian's 1.6, and the cluster's)
#   cri-tools   critest (the CRI validation suite, `go test -c`), crictl, and
#               ginkgo (critest's parallel mode runs it)
#
# Usage: upstream/build.sh [COMPONENT...]   (default: all)
#
# Each component is built into a cache outside the checkout,
# $PODVISOR_CACHE/upstream/<component>-<key> (default /var/cache/podvisor),
# keyed by a hash of its go.mod, go.sum and this script, and linked as
# build/upstream/<component>. A key already built is not built again, so a
# fresh clone reuses it; Go's own build cache makes a changed pin cheaper.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${PODVISOR_CACHE:-/var/cache/podvisor}/upstream"
links="$here/../build/upstream"
mkdir -p "$cache" "$links"

version_of() { (cd "$here/$1" && go list -m -f "{{.Version}}" "$2"); }

build_k8s() {
  local out=$1 version major minor ldflags=""
  version="$(version_of k8s k8s.io/kubernetes)"
  # The version the components report (kubectl version, node info, the API
  # server's compatibility version), set the way upstream's build sets it.
  major="${version#v}"; major="${major%%.*}"
  minor="${version#v*.}"; minor="${minor%%.*}"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "building Kubernetes $version components (first build: about 6 min on 2 cores)"
  (cd "$here/k8s" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w $ldflags" -o "$out/" \
    ./etcd \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kube-proxy \
    k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kubectl \
    k8s.io/kubernetes/cmd/kubeadm)
}

build_helm() {
  local out=$1 version
  version="$(version_of helm helm.sh/helm/v3)"
  echo "building Helm $version"
  (cd "$here/helm" && CGO_ENABLED=0 go build -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$version" -o "$out/helm" \
    helm.sh/helm/v3/cmd/helm)
}

build_containerd() {
  local out=$1 version
  version="$(version_of containerd github.com/containerd/containerd/v2)"
  echo "building containerd $version (first build: about 2 min on 2 cores)"
  # no_btrfs: the btrfs snapshotter needs C headers and nothing here uses it.
  (cd "$here/containerd" && CGO_ENABLED=0 go build -trimpath \
    -tags "no_btrfs urfave_cli_no_docs" \
    -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$version" \
    -o "$out/" \
    github.com/containerd/containerd/v2/cmd/containerd \
    github.com/containerd/containerd/v2/cmd/ctr \
    github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2)
}

build_cri-tools() {
  local out=$1 version ldflags
  version="$(version_of cri-tools sigs.k8s.io/cri-tools)"
  ldflags="-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$version"
  echo "building critest, crictl and ginkgo $version (first build: about 2 min on 2 cores)"
  (cd "$here/cri-tools" &&
    CGO_ENABLED=0 go test -c -trimpath -ldflags "$ldflags" -o "$out/critest" \
      sigs.k8s.io/cri-tools/cmd/critest &&
    CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$out/crictl" \
      sigs.k8s.io/cri-tools/cmd/crictl &&
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/ginkgo" \
      github.com/onsi/ginkgo/v2/ginkgo)
}

components=("$@")
[ ${#components[@]} -gt 0 ] || components=(k8s helm containerd cri-tools)
for c in "${components[@]}"; do
  [ -f "$here/$c/go.mod" ] || { echo "upstream/build.sh: unknown component $c" >&2; exit 2; }
  key="$(cat "$here/$c/go.mod" "$here/$c/go.sum" "$0" | sha256sum | cut -c1-16)"
  dir="$cache/$c-$key"
  if [ ! -f "$dir/.complete" ]; then
    rm -rf "$dir.tmp"
    mkdir -p "$dir.tmp"
    GOFLAGS=-mod=readonly "build_$c" "$dir.tmp"
    touch "$dir.tmp/.complete"
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
  fi
  ln -sfn "$dir" "$links/$c"
  echo "upstream $c: $links/$c -> $dir"
done
