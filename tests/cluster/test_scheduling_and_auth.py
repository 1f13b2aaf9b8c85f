"""Scheduling of extended resources and in-cluster credentials.

Aspects tested:
- a pod requesting ``nvidia.com/gpu`` stays Pending with PodScheduled=False/Unschedulable
  while no node advertises GPUs, and is bound and runs once a node with one GPU joins;
- the projected ServiceAccount token (with ca.crt and namespace) mounted at the standard
  path plus ``KUBERNETES_SERVICE_HOST/PORT`` let the official client's in-cluster config
  authenticate, and RBAC allows what the pod's Role grants and denies what it does not.
"""

from __future__ import annotations

import pytest
from kubernetes import client

from kubetune.localcluster.testing import ClusterHandle, wait_for
from tests.cluster import manifests

pytestmark = pytest.mark.cluster


def test_gpu_pod_waits_for_a_gpu_node(cluster: ClusterHandle, namespace: str) -> None:
    if not cluster.is_local:
        pytest.skip("adds a node agent with a fake GPU")
    core = client.CoreV1Api(cluster.api_client())
    container = manifests.python_container(
        "train", "print('got a gpu')", resources={"limits": {"nvidia.com/gpu": "1"}}
    )
    core.create_namespaced_pod(namespace, manifests.pod("gpu", container))

    def unschedulable() -> bool:
        pod = core.read_namespaced_pod("gpu", namespace)
        return any(
            c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
            for c in pod.status.conditions or []
        )

    wait_for(unschedulable, 30, description="PodScheduled=False/Unschedulable")
    assert core.read_namespaced_pod("gpu", namespace).status.phase == "Pending"
    with cluster.add_node("gpu-node", gpus=1):
        wait_for(
            lambda: core.read_namespaced_pod("gpu", namespace).status.phase == "Succeeded",
            60,
            description=lambda: f"gpu pod to run: {core.read_namespaced_pod('gpu', namespace).status}",
        )
        pod = core.read_namespaced_pod("gpu", namespace)
        assert pod.spec.node_name == "gpu-node"
        assert cluster.read_log(namespace, "gpu").strip() == "got a gpu"


IN_CLUSTER_CHECK = """
from kubernetes import client, config
from kubernetes.client.rest import ApiException
config.load_incluster_config()
core = client.CoreV1Api()
ns = open('/var/run/secrets/kubernetes.io/serviceaccount/namespace').read()
print('pods:', len(core.list_namespaced_pod(ns).items))
try:
    core.list_namespaced_secret(ns)
    print('secrets: allowed')
except ApiException as exc:
    print('secrets:', exc.status)
"""


def test_service_account_token_authenticates_and_rbac_denies(cluster: ClusterHandle, namespace: str) -> None:
    api = cluster.api_client()
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    pod = manifests.pod(
        "whoami", manifests.python_container("main", IN_CLUSTER_CHECK), serviceAccountName="reader"
    )
    core.create_namespaced_pod(namespace, pod)

    def finished() -> str | None:
        phase: str = core.read_namespaced_pod("whoami", namespace).status.phase
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_for(finished, 60, description="pod whoami to finish")
    log = cluster.read_log(namespace, "whoami")
    assert phase == "Succeeded", log
    assert "pods: 1" in log and "secrets: 403" in log, log
