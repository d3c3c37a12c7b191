#!/usr/bin/env bash
# Runs COMMAND against a fresh local cluster: tears down what a previous run
# left, cluster/up.sh, COMMAND (with KUBECONFIG set and the cluster's kubectl
# first on PATH), then cluster/down.sh whatever happened. Exits with
# COMMAND's status. Usage: cluster/with.sh COMMAND [ARGS...]
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=cluster/env.sh
. "$here/env.sh"
"$here/down.sh" >/dev/null
"$here/up.sh" || { "$here/down.sh"; exit 1; }
# Helm for the chart tests; crictl is how the suite sees the node.
PATH="$BIN:$HELM_BIN:$CRI_TOOLS_BIN:$PATH" "$@"
rc=$?
"$here/down.sh"
exit $rc
