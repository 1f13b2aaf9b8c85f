# The embedded local Kubernetes cluster (see docs/local-cluster.md).
#
# cluster-build compiles kube-apiserver, kube-controller-manager, kube-scheduler, etcd and
# helm from the Go module proxy into $(KUBETUNE_CACHE) (default ~/.cache/kubetune); the
# script is a no-op once they are cached, so it runs before every `make test`.
# kueue-build compiles Kueue's controller the same way, for the tests that run Kueue
# (tests/cluster/test_kueue*.py); `make test` builds it first and fails those tests, rather
# than skip them, if it is missing.

.PHONY: cluster-build kueue-build cluster-up cluster-down cluster-env

CLUSTER_NAME ?= dev
# The pinned helm, for recipes: `$(HELM) install ...` (expanded when the recipe runs, after
# cluster-build).
HELM = $$(bash hack/localcluster/build.sh --print-paths | sed -n 's/^helm=//p')

KUBETUNE_CACHE_DIR = $${KUBETUNE_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/kubetune}

# The lock is the one kubetune.localcluster.binaries takes: concurrent builds of one version
# would delete each other's finished directory.
cluster-build:
	@mkdir -p "$(KUBETUNE_CACHE_DIR)/bin" && \
		flock "$(KUBETUNE_CACHE_DIR)/bin/.build.lock" bash hack/localcluster/build.sh >/dev/null

kueue-build:
	@bash hack/localcluster/build-kueue.sh >/dev/null

cluster-up: venv cluster-build
	$(PY) -m kubetune.localcluster up --name $(CLUSTER_NAME)

cluster-down: venv
	$(PY) -m kubetune.localcluster down --name $(CLUSTER_NAME)

# eval "$(make -s cluster-env)": KUBECONFIG for the running cluster, helm and kubectl on PATH.
cluster-env: cluster-build
	@echo "export KUBECONFIG=$$($(PY) -m kubetune.localcluster status --name $(CLUSTER_NAME))"
	@echo "export PATH=$$(dirname $(HELM)):$(CURDIR)/$(VENV)/bin:\$$PATH"

TEST_PREREQS += cluster-build kueue-build
export KUBETUNE_REQUIRE_KUEUE := 1
