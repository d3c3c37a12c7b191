#!/usr/bin/env bash
# The e2e suite on kind (needs Docker, kind and kubectl): builds the podvisor
# node image, creates a one-node cluster from it, applies the RuntimeClass
# as the local cluster does, imports the test image, runs the suite with
# `docker exec` as its way onto the node, and deletes the cluster.
set -euo pipefail
cd "$(dirname "$0")/../.."
name="${KIND_CLUSTER:-podvisor-e2e}"
image="${PODVISOR_KIND_IMAGE:-podvisor/kind-node:dev}"
node="$name-control-plane"

docker build -f e2e/kind/Dockerfile -t "$image" .
kind create cluster --name "$name" --image "$image" --config e2e/kind/cluster.yaml --wait 180s
trap 'kind delete cluster --name "$name"' EXIT
export KUBECONFIG="$PWD/build/kind/kubeconfig"
mkdir -p build/kind
kind get kubeconfig --name "$name" > "$KUBECONFIG"

docker exec "$node" ctr -n k8s.io images import /opt/podvisor-e2e/busybox.tar
kubectl apply -f deploy/runtimeclass.yaml
PODVISOR_E2E_NODE_EXEC="docker exec $node" cargo test -p podvisor-e2e --test e2e
