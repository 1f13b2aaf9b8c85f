// Command etcd is upstream etcd's server entry point, built from the module proxy.
//
// `go install go.etcd.io/etcd/server/v3@...` is refused (its go.mod carries replace
// directives), and mixing etcd's server into the Kubernetes wrapper module drags the
// two projects' otel/grpc pins into one build list, so etcd gets its own module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
