//go:build tools

// Package tools pins cri-tools: critest (the CRI validation suite, built
// with `go test -c`), crictl, and the ginkgo runner critest's parallel mode
// drives, at the version critest links.
package tools

import (
	_ "github.com/onsi/ginkgo/v2"
	_ "github.com/onsi/ginkgo/v2/ginkgo"
	_ "github.com/onsi/gomega"
	_ "sigs.k8s.io/cri-tools/cmd/crictl"
	_ "sigs.k8s.io/cri-tools/pkg/benchmark"
	_ "sigs.k8s.io/cri-tools/pkg/validate"
)
