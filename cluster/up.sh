#!/usr/bin/env bash
# Brings up a single-node Kubernetes cluster on this machine, without Docker:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy
# (iptables; Services, such as the API server's own for in-cluster clients)
# and kubelet, a private containerd 2.x with the CRI plugin (all built by
# upstream/build.sh), runc as the default runtime and podvisor registered as
# the `podvisor` handler, and Debian's CNI plugins on a bridge of its own.
#
# podvisor itself must be installed the way a node gets it (`make install`:
# /opt/podvisor, /etc/podvisor/config.toml); the Makefile's cluster-up does
# that first. With PODVISOR_CLUSTER_BARE=1 the node is one podvisor was
# never put on: containerd knows no podvisor runtime, and nothing of
# podvisor is needed (the chart's installer DaemonSet puts it there).
# containerd runs under a supervisor that starts it again when it exits, as
# systemd would: the installer restarts it through its pid file. Everything else lives under $PODVISOR_CLUSTER_DIR (default
# build/cluster): run/ (PKI, kubeconfigs, data), logs/ (one log per
# component, and pods/ with the containers' logs). cluster/down.sh stops it and removes run/.
#
# Usage: cluster/up.sh   (as root; prints the kubeconfig path at the end)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=cluster/env.sh
. "$here/env.sh"

[ "$(id -u)" = 0 ] || { echo "cluster/up.sh: run as root (kubelet, containerd, CNI)" >&2; exit 1; }
for b in "$BIN"/{etcd,kube-apiserver,kube-controller-manager,kube-scheduler,kube-proxy,kubelet,kubectl} \
         "$CONTAINERD_BIN"/{containerd,ctr,containerd-shim-runc-v2}; do
  [ -x "$b" ] || { echo "cluster/up.sh: $b missing (upstream/build.sh)" >&2; exit 1; }
done
bare="${PODVISOR_CLUSTER_BARE:-0}"
[ "$bare" = 1 ] || [ -x /usr/local/bin/containerd-shim-podvisor-v2 ] ||
  { echo "cluster/up.sh: podvisor is not installed (make install)" >&2; exit 1; }
if [ -d "$RUN" ]; then
  echo "cluster/up.sh: $RUN exists; a cluster is up or was not torn down (cluster/down.sh)" >&2
  exit 1
fi

# The node's address: the first global IPv4 address of the default route's
# interface (any global one where there is no default route).
dev="$(ip -4 route show default | awk '{for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}')"
node_ip="$(ip -4 -o addr show ${dev:+dev "$dev"} scope global | awk '{sub("/.*", "", $4); print $4; exit}')"
[ -n "$node_ip" ] || { echo "cluster/up.sh: no global IPv4 address for the node" >&2; exit 1; }

mkdir -p "$RUN"/{pki,pids,etcd,kubelet,cni,containerd} "$LOGS"
rm -rf "$LOGS"/*.log "$LOGS/pods"
trap 'echo "cluster/up.sh failed; logs in $LOGS" >&2' ERR

# --- PKI: one CA; serving and client certificates signed by it. ---
pki="$RUN/pki"
openssl ecparam -name prime256v1 -genkey -noout -out "$pki/ca.key" 2>/dev/null
openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=podvisor-e2e-ca" -days 30 \
  -out "$pki/ca.crt" 2>/dev/null
# cert NAME SUBJECT EXTENDED-KEY-USAGE [SUBJECT-ALT-NAMES]
cert() {
  openssl ecparam -name prime256v1 -genkey -noout -out "$pki/$1.key" 2>/dev/null
  openssl req -new -key "$pki/$1.key" -subj "$2" -out "$pki/$1.csr" 2>/dev/null
  {
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$3"
    [ -z "${4:-}" ] || echo "subjectAltName=$4"
  } > "$pki/$1.ext"
  openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 30 -extfile "$pki/$1.ext" -out "$pki/$1.crt" 2>/dev/null
  rm -f "$pki/$1.csr" "$pki/$1.ext"
}
cert apiserver "/CN=kube-apiserver" serverAuth \
  "IP:127.0.0.1,IP:$node_ip,IP:$SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
cert admin "/O=system:masters/CN=podvisor-e2e-admin" clientAuth
cert kubelet "/O=system:nodes/CN=system:node:$NODE" clientAuth
cert controller-manager "/CN=system:kube-controller-manager" clientAuth
cert scheduler "/CN=system:kube-scheduler" clientAuth
cert kube-proxy "/CN=system:kube-proxy" clientAuth
openssl ecparam -name prime256v1 -genkey -noout -out "$pki/sa.key" 2>/dev/null
openssl ec -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null

kubeconfig() { # NAME CERT
  local f="$RUN/$1.kubeconfig"
  "$BIN/kubectl" --kubeconfig "$f" config set-cluster e2e --server "https://127.0.0.1:$APISERVER_PORT" \
    --certificate-authority "$pki/ca.crt" --embed-certs >/dev/null
  "$BIN/kubectl" --kubeconfig "$f" config set-credentials "$2" \
    --client-certificate "$pki/$2.crt" --client-key "$pki/$2.key" --embed-certs >/dev/null
  "$BIN/kubectl" --kubeconfig "$f" config set-context e2e --cluster e2e --user "$2" >/dev/null
  "$BIN/kubectl" --kubeconfig "$f" config use-context e2e >/dev/null
}
kubeconfig admin admin
kubeconfig kubelet kubelet
kubeconfig controller-manager controller-manager
kubeconfig scheduler scheduler
kubeconfig kube-proxy kube-proxy

# start NAME COMMAND...: runs a component in the background, its output in
# logs/NAME.log, its pid in run/pids/NAME.
start() {
  local name="$1"; shift
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! > "$RUN/pids/$name"
}
# wait_for WHAT SECONDS COMMAND...
wait_for() {
  local what="$1" secs="$2"; shift 2
  for _ in $(seq $((secs * 2))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "cluster/up.sh: $what did not come up within ${secs}s; logs in $LOGS" >&2
  return 1
}

start etcd "$BIN/etcd" --name e2e --data-dir "$RUN/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "e2e=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync
wait_for etcd 30 curl -sf "http://127.0.0.1:$ETCD_PORT/health"

start kube-apiserver "$BIN/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --secure-port "$APISERVER_PORT" --advertise-address "$node_ip" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" \
  --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
  --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
  --kubelet-preferred-address-types InternalIP,Hostname \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
  --allow-privileged=true
wait_for kube-apiserver 90 "$BIN/kubectl" --kubeconfig "$KUBECONFIG" get --raw /readyz

start kube-controller-manager "$BIN/kube-controller-manager" \
  --kubeconfig "$RUN/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$RUN/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$RUN/controller-manager.kubeconfig" \
  --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
  --use-service-account-credentials --leader-elect=false --bind-address 127.0.0.1
start kube-scheduler "$BIN/kube-scheduler" \
  --kubeconfig "$RUN/scheduler.kubeconfig" \
  --authentication-kubeconfig "$RUN/scheduler.kubeconfig" \
  --authorization-kubeconfig "$RUN/scheduler.kubeconfig" \
  --leader-elect=false --bind-address 127.0.0.1

# --- containerd 2.x: CRI with runc (default) and podvisor, CNI on a bridge.
# Its config is in the version 2 format, which containerd 2.x converts, as
# kind's node images have it. ---
cat > "$RUN/cni/10-podvisor-e2e.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "podvisor-e2e", "plugins": [
  {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$RUN/cni/ipam"}},
  {"type": "loopback"}]}
EOF
# Where root may not lower OOM scores (no CAP_SYS_RESOURCE, as in some
# sandboxed CI machines), runc fails the pause container's oomScoreAdj -998
# ("can't get final child's PID from pipe"); containerd can clamp it instead.
restrict_oom=false
sh -c 'echo -998 > /proc/self/oom_score_adj' 2>/dev/null || restrict_oom=true
cat > "$RUN/containerd/config.toml" <<EOF
version = 2
root = "$RUN/containerd/root"
state = "$RUN/containerd/state"
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  restrict_oom_score_adj = $restrict_oom
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
$([ "$bare" = 1 ] || cat "$here/containerd-podvisor.toml")
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$RUN/cni"
EOF
# Its own runc shim first on PATH; podvisor's is in /usr/local/bin. Its
# supervisor starts it again whenever it exits (after a second), writing
# its pid to $CONTAINERD_PID_FILE; SIGTERM to the supervisor stops both.
start containerd env PATH="$CONTAINERD_BIN:$PATH" bash -c '
  trap "kill \$pid 2>/dev/null; wait \$pid; exit 0" TERM
  while :; do
    "$0" --config "$1" & pid=$!
    echo $pid > "$2.tmp" && mv "$2.tmp" "$2"
    wait $pid; echo "supervisor: containerd exited ($?); starting it again" >&2
    sleep 1
  done' "$CONTAINERD_BIN/containerd" "$RUN/containerd/config.toml" "$CONTAINERD_PID_FILE"
wait_for containerd 30 "$CONTAINERD_BIN/ctr" --address "$CONTAINERD_SOCK" version

# The test images: busybox (with the suite's static UDP echo, as
# /bin/udp-echo), and the pod sandbox (pause) image, both built locally from
# Debian's busybox-static (no registry is reached), and any the tests built
# into images/ (make test-controller: the chart's). make cluster-tools
# builds the tools.
tools="${PODVISOR_TOOLS:-$here/../target/release/podvisor-tools}"
udp_echo="${PODVISOR_UDP_ECHO:-$here/../target/x86_64-unknown-linux-musl/release/podvisor-udp-echo}"
"$tools" image "$RUN/busybox.tar" "$BUSYBOX_IMAGE" --add "$udp_echo:/bin/udp-echo" sh
"$tools" image "$RUN/pause.tar" "$PAUSE_IMAGE" --pause
for archive in "$RUN/busybox.tar" "$RUN/pause.tar" "$CLUSTER_DIR"/images/*.tar; do
  [ -f "$archive" ] || continue
  "$CONTAINERD_BIN/ctr" --address "$CONTAINERD_SOCK" -n k8s.io images import "$archive" >/dev/null
done

# --- kube-proxy: Services through iptables. It sets no sysctls (conntrack
# limits, localhost node ports), so it also runs where those are read-only. ---
cat > "$RUN/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: $RUN/kube-proxy.kubeconfig}
hostnameOverride: $NODE
clusterCIDR: $POD_CIDR
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT
metricsBindAddress: 127.0.0.1:$KUBE_PROXY_METRICS_PORT
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
iptables: {localhostNodePorts: false}
EOF
start kube-proxy "$BIN/kube-proxy" --config "$RUN/kube-proxy.yaml"

# --- kubelet ---
cat > "$RUN/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: AlwaysAllow}
address: $node_ip
healthzBindAddress: 127.0.0.1
resolvConf: /etc/resolv.conf
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# No memory eviction ("0%" turns a threshold off): this node shares its
# memory with builds whose page cache the kubelet counts as in use, and a
# memory-pressure taint keeps the suites' BestEffort pods from scheduling.
evictionHard: {memory.available: "0%", nodefs.available: 1%, imagefs.available: 1%}
serializeImagePulls: false
podLogsDirectory: $LOGS/pods
EOF
start kubelet "$BIN/kubelet" --config "$RUN/kubelet/config.yaml" \
  --kubeconfig "$RUN/kubelet.kubeconfig" --root-dir "$RUN/kubelet/root" \
  --cert-dir "$RUN/kubelet/pki" --hostname-override "$NODE" --node-ip "$node_ip"
wait_for "node $NODE Ready" 120 \
  "$BIN/kubectl" --kubeconfig "$KUBECONFIG" wait --for=condition=Ready "node/$NODE" --timeout=1s
if [ "$bare" != 1 ]; then
  # What the node installer does on a real node: mark it as able to run podvisor.
  "$BIN/kubectl" --kubeconfig "$KUBECONFIG" label node "$NODE" podvisor.io/runtime=true --overwrite >/dev/null
  # What the chart applies cluster-wide: the RuntimeClass.
  "$BIN/kubectl" --kubeconfig "$KUBECONFIG" apply -f "$here/../deploy/runtimeclass.yaml" >/dev/null
fi
wait_for "default service account" 60 \
  "$BIN/kubectl" --kubeconfig "$KUBECONFIG" get serviceaccount default

trap - ERR
echo "cluster up: node $NODE ($node_ip), Kubernetes $("$BIN/kubectl" version --client -o json | sed -n 's/.*"gitVersion": "\(.*\)".*/\1/p' | head -1)"
echo "export KUBECONFIG=$KUBECONFIG"
