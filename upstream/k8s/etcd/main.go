// Command etcd is upstream etcd's server, at the version the pinned
// Kubernetes release is tested with (go.mod).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
