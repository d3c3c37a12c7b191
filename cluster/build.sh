#!/usr/bin/env bash
# Builds the local test cluster's Kubernetes components (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kube-proxy, kubelet, kubectl) from
# the Go module proxy at the release cluster/k8s/go.mod pins, and Helm at the
# release cluster/helm/go.mod pins, into $1 (default build/cluster/bin). A
# stamp of the go.mod + go.sum files skips the build when nothing changed;
# Go's own cache makes a changed pin cheaper.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../build/cluster/bin}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$here/k8s"

version="$(go list -m -f "{{.Version}}" k8s.io/kubernetes)"
helm_version="$(cd ../helm && go list -m -f "{{.Version}}" helm.sh/helm/v3)"
stamp="$(cat go.mod go.sum ../helm/go.mod ../helm/go.sum | sha256sum | cut -d' ' -f1)"
bins=(etcd kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet kubectl helm)
if [ "$(cat "$out/.stamp" 2>/dev/null)" = "$stamp" ] &&
   for b in "${bins[@]}"; do [ -x "$out/$b" ] || exit 1; done; then
  echo "cluster components $version up to date in $out"
  exit 0
fi

# The version the components report (kubectl version, node info, the API
# server's compatibility version) is set the way upstream's build sets it.
major="${version#v}"; major="${major%%.*}"
minor="${version#v*.}"; minor="${minor%%.*}"
ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

echo "building Kubernetes $version components into $out (first build: about 6 min on 2 cores)"
CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath -ldflags "-s -w $ldflags" -o "$out/" \
  ./etcd \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kube-proxy \
  k8s.io/kubernetes/cmd/kubelet \
  k8s.io/kubernetes/cmd/kubectl
echo "building Helm $helm_version into $out"
(cd ../helm && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version" -o "$out/helm" \
  helm.sh/helm/v3/cmd/helm)
echo "$stamp" > "$out/.stamp"
