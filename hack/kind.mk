# kind, for people with Docker (docs/install.md):
#
#   make images kind-up kind-load kind-e2e     then  make kind-down
#
# The same steps as on the embedded local cluster (images, chart, e2e suite), against a kind
# cluster through KUBECONFIG; the pytest plugin then uses that cluster instead of starting its
# own. These targets need a Docker daemon and never run on this project's build machines.

.PHONY: kind-up kind-load kind-e2e kind-down

KIND ?= kind
KIND_CLUSTER ?= kubetune
KIND_KUBECONFIG := _out/kind-$(KIND_CLUSTER).kubeconfig
# Written by `make images`: KUBETUNE_OPERATOR_IMAGE=<ref> and KUBETUNE_WORKER_IMAGE=<ref>.
IMAGES_ENV := _out/images.env
KIND_HELM ?= helm
# The e2e suite: the chart's tests and the operator end to end on the images (tests/e2e skips its
# runtime tests, which need the embedded cluster's podman node).
KIND_PYTEST_ARGS ?= tests/chart tests/e2e

# Reads $(IMAGES_ENV) into the recipe's shell, or stops with what to run first.
define kind_images
test -f $(IMAGES_ENV) || { echo "kind: $(IMAGES_ENV) is missing; run make images first" >&2; exit 1; }; \
set -a; . $(abspath $(IMAGES_ENV)); set +a
endef

kind-up:
	$(KIND) create cluster --config kind-config.yaml --name $(KIND_CLUSTER)

# kind nodes have no registry access to these tags: the images go straight into the nodes.
kind-load:
	@$(kind_images); \
	set -x; $(KIND) load docker-image --name $(KIND_CLUSTER) "$$KUBETUNE_OPERATOR_IMAGE" "$$KUBETUNE_WORKER_IMAGE"

# Installs the chart with the loaded images (pullPolicy Never: a missing image fails at once
# instead of trying ghcr.io), watching only its own namespace so that it never competes with the
# releases the e2e suite installs in its test namespaces; then runs the suite, which reads the
# images from $(IMAGES_ENV) too.
kind-e2e: venv
	@$(kind_images); set -ex; \
	mkdir -p _out; $(KIND) get kubeconfig --name $(KIND_CLUSTER) >$(KIND_KUBECONFIG); \
	export KUBECONFIG=$(CURDIR)/$(KIND_KUBECONFIG); \
	$(KIND_HELM) upgrade --install kubetune charts/kubetune --namespace kubetune-system --create-namespace \
		--set operator.image.repository="$${KUBETUNE_OPERATOR_IMAGE%:*}" \
		--set operator.image.tag="$${KUBETUNE_OPERATOR_IMAGE##*:}" \
		--set operator.image.pullPolicy=Never \
		--set worker.image.repository="$${KUBETUNE_WORKER_IMAGE%:*}" \
		--set worker.image.tag="$${KUBETUNE_WORKER_IMAGE##*:}" \
		--set worker.image.pullPolicy=Never \
		--set operator.watchNamespaces='{kubetune-system}' \
		--wait --timeout 180s; \
	kubectl --namespace kubetune-system get deployment,pods; \
	KUBETUNE_REQUIRE_IMAGES=1 $(PY) -m pytest $(KIND_PYTEST_ARGS) $(PYTEST_ARGS)

kind-down:
	$(KIND) delete cluster --name $(KIND_CLUSTER)
