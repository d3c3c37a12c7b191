#!/usr/bin/env bash
# Stops the local test cluster (cluster/up.sh) and removes what it made:
# every pod and its VM (through containerd, as kubelet would), the
# components, kube-proxy's iptables rules, mounts under run/, the CNI bridge
# and kubelet's cgroups.
# Logs stay in logs/ until the next cluster/up.sh. Safe to run twice.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=cluster/env.sh
. "$here/env.sh"

stop() { # NAME: SIGTERM, then SIGKILL after 15 s
  local f="$RUN/pids/$1" pid
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  kill "$pid" 2>/dev/null
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null
  rm -f "$f"
}

# kubelet first, so that it does not restart what is removed below.
stop kubelet
if [ -S "$CONTAINERD_SOCK" ]; then
  crictl="$CRI_TOOLS_BIN/crictl"
  [ -x "$crictl" ] || crictl="$(command -v crictl)"
  for pod in $("$crictl" pods -q 2>/dev/null); do
    "$crictl" stopp "$pod" >/dev/null 2>&1
    "$crictl" rmp -f "$pod" >/dev/null 2>&1
  done
fi
for c in kube-proxy containerd kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$c"; done
# containerd itself, should its supervisor have been killed before it.
if [ -f "$CONTAINERD_PID_FILE" ]; then
  pid="$(cat "$CONTAINERD_PID_FILE")"
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = containerd ] && kill -9 "$pid"
  rm -f "$CONTAINERD_PID_FILE"
fi
# kube-proxy's iptables rules.
[ -x "$BIN/kube-proxy" ] && "$BIN/kube-proxy" --cleanup >/dev/null 2>&1

# kubelet's volume mounts and containerd's snapshots, deepest first.
if [ -d "$RUN" ]; then
  awk -v run="$RUN/" 'index($2, run) == 1 {print $2}' /proc/self/mounts | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null; done
fi
ip link del "$BRIDGE" 2>/dev/null
# kubelet's cgroups (cgroupfs driver): leaf first.
for h in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
  [ -d "$h" ] && find "$h" -depth -type d -exec rmdir {} \; 2>/dev/null
done
rm -rf "$RUN"
echo "cluster down; logs in $LOGS"
