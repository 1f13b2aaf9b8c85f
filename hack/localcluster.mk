# The embedded local Kubernetes cluster (see docs/local-cluster.md).
#
# cluster-build compiles kube-apiserver, kube-controller-manager, kube-scheduler, etcd and
# helm from the Go module proxy into $(KUBETUNE_CACHE) (default ~/.cache/kubetune); the
# script is a no-op once they are cached, so it runs before every `make test`.

.PHONY: cluster-build cluster-up cluster-down

CLUSTER_NAME ?= dev

cluster-build:
	@bash hack/localcluster/build.sh >/dev/null

cluster-up: venv cluster-build
	$(PY) -m kubetune.localcluster up --name $(CLUSTER_NAME)

cluster-down: venv
	$(PY) -m kubetune.localcluster down --name $(CLUSTER_NAME)

TEST_PREREQS += cluster-build
