//go:build tools

// Package tools pins Helm, which the chart tests (make test-controller) use
// to lint, render and install charts/podvisor. A module of its own: Helm
// follows newer Kubernetes client libraries than the cluster's release.
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
