#!/usr/bin/env bash
# The e2e suite on kind (needs Docker, kind and kubectl): builds the node
# image and the kind node image on it (e2e/kind/Dockerfile), creates a
# one-node cluster from it, applies the RuntimeClass as the local cluster
# does, imports the suite's busybox image (built here, as for the local
# cluster), runs the suite with `docker exec` as its way onto the node, and
# deletes the cluster.
set -euo pipefail
cd "$(dirname "$0")/../.."
name="${KIND_CLUSTER:-podvisor-e2e}"
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/podvisor/Chart.yaml)
node_image="docker.io/podvisor/node:$version"
image="${PODVISOR_KIND_IMAGE:-docker.io/podvisor/kind-node:$version}"
node="$name-control-plane"

docker build --target node -t "$node_image" .
docker build -f e2e/kind/Dockerfile --build-arg PODVISOR_NODE="$node_image" -t "$image" .
make cluster-tools
mkdir -p build/kind
target/release/podvisor-tools image build/kind/busybox.tar docker.io/podvisor/busybox:latest \
  --add target/x86_64-unknown-linux-musl/release/podvisor-udp-echo:/bin/udp-echo sh

kind create cluster --name "$name" --image "$image" --config e2e/kind/cluster.yaml --wait 180s
trap 'kind delete cluster --name "$name"' EXIT
export KUBECONFIG="$PWD/build/kind/kubeconfig"
kind get kubeconfig --name "$name" > "$KUBECONFIG"

docker exec -i "$node" ctr -n k8s.io images import - < build/kind/busybox.tar
kubectl apply -f deploy/runtimeclass.yaml
PODVISOR_E2E_NODE_EXEC="docker exec $node" cargo test -p podvisor-e2e --test e2e
