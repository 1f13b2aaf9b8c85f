"""kubetune's embedded local Kubernetes cluster, for tests, ``make demo`` and CI.

The real control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, built
from the Go module proxy by ``hack/localcluster/build.sh``) plus a node agent that stands in
for kubelet and runs pods as local processes in their own network and mount namespaces.

* :mod:`.controlplane` - :class:`~.controlplane.LocalCluster`, start/stop.
* :mod:`.nodeagent` - the kubelet stand-in.
* :mod:`.testing`, :mod:`.pytest_plugin` - fixtures and wait helpers for tests.
* :mod:`.cli` - ``kubetune cluster up/down`` (also ``python -m kubetune.localcluster``).

Nothing heavy is imported here.
"""
