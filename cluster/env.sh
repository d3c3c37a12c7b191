# The local test cluster's names, paths and ports, shared by cluster/up.sh,
# cluster/down.sh and `make test-e2e`. Sourced, not run.
CLUSTER_DIR="${PODVISOR_CLUSTER_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/build/cluster}"
# The upstream binaries (upstream/build.sh): Kubernetes, Helm, containerd
# 2.x, crictl.
UPSTREAM="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/build/upstream"
BIN="$UPSTREAM/k8s"
HELM_BIN="$UPSTREAM/helm"
CONTAINERD_BIN="$UPSTREAM/containerd"
CRI_TOOLS_BIN="$UPSTREAM/cri-tools"
RUN="$CLUSTER_DIR/run"
LOGS="$CLUSTER_DIR/logs"
export KUBECONFIG="$RUN/admin.kubeconfig"
export CONTAINER_RUNTIME_ENDPOINT="unix://$RUN/containerd/containerd.sock"
CONTAINERD_SOCK="$RUN/containerd/containerd.sock"
# containerd's own pid (its supervisor's is in $RUN/pids/containerd).
CONTAINERD_PID_FILE="$RUN/containerd/containerd.pid"
NODE=podvisor-e2e
ETCD_PORT=23790
ETCD_PEER_PORT=23800
APISERVER_PORT=6443
KUBE_PROXY_HEALTHZ_PORT=10256
KUBE_PROXY_METRICS_PORT=10249
SERVICE_CIDR=10.96.0.0/24
SERVICE_IP=10.96.0.1
# A bridge and subnet of the cluster's own (the containerd tests use pvtest0).
BRIDGE=pvcluster0
POD_CIDR=10.88.78.0/24
BUSYBOX_IMAGE=docker.io/podvisor/busybox:latest
PAUSE_IMAGE=docker.io/podvisor/pause:latest
