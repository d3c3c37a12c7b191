//go:build tools

// Package tools pins kind: its release's node base (images/base: the
// Dockerfile's base stage, the entrypoint, systemd units and containerd
// config) is what images/stand-ins.sh builds kindest/node's stand-in from.
package tools

import (
	_ "sigs.k8s.io/kind"
)
