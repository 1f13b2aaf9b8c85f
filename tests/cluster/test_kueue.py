"""Real Kueue (built from sigs.k8s.io/kueue, its own CRDs and webhooks) queueing batch Jobs.

Aspects tested:
- Kueue's webhooks are live: its mutating webhook suspends a queued Job created unsuspended, and
  its validating webhook refuses moving a running Job to another queue;
- with a ClusterQueue whose quota fits one Job and a LocalQueue, two suspended Jobs labelled
  ``kueue.x-k8s.io/queue-name``: Kueue admits the first (its Workload ``Admitted``, the Job
  unsuspended, its pod runs); the second stays suspended with no pod, its Workload's
  ``QuotaReserved`` condition ``False``/``Pending`` saying why it waits; once the first
  finishes the second is admitted and runs, starting no earlier than the first completed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kubetune.localcluster.pytest_plugin import fresh_namespace
from kubetune.localcluster.testing import ClusterHandle, condition_status, wait_for
from tests.cluster import manifests

# One xdist worker starts the Kueue cluster for both Kueue test modules.
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.xdist_group("kueue-cluster")]

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


@pytest.fixture
def kueue_namespace(kueue_cluster: ClusterHandle, request: pytest.FixtureRequest) -> Iterator[str]:
    yield from fresh_namespace(kueue_cluster, request.node.name)


def kueue_object(kind: str, name: str, spec: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
    metadata = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": metadata, "spec": spec}


def cluster_queue(name: str, flavor: str, cpu: str) -> dict[str, Any]:
    quota = [{"name": "cpu", "nominalQuota": cpu}]
    group = {"coveredResources": ["cpu"], "flavors": [{"name": flavor, "resources": quota}]}
    return kueue_object("ClusterQueue", name, {"namespaceSelector": {}, "resourceGroups": [group]})


def queued_job(name: str, queue: str, code: str, *, suspend: bool) -> dict[str, Any]:
    job = manifests.job(name, manifests.python_container("main", code, resources={"requests": {"cpu": "1"}}))
    job["metadata"]["labels"] = {QUEUE_LABEL: queue}
    job["spec"]["suspend"] = suspend
    return job


def test_second_job_waits_for_quota(
    kueue_cluster: ClusterHandle, kueue_namespace: str, tmp_path: Path
) -> None:
    namespace = kueue_namespace
    api = kueue_cluster.api_client()
    custom = client.CustomObjectsApi(api)
    batch = client.BatchV1Api(api)
    core = client.CoreV1Api(api)
    flavor, queue_name = f"flavor-{namespace}", f"cq-{namespace}"
    custom.create_cluster_custom_object(
        GROUP, VERSION, "resourceflavors", kueue_object("ResourceFlavor", flavor, {})
    )
    custom.create_cluster_custom_object(
        GROUP, VERSION, "clusterqueues", cluster_queue(queue_name, flavor, "1")
    )
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, "localqueues",
        kueue_object("LocalQueue", "team", {"clusterQueue": queue_name}, namespace),
    )  # fmt: skip

    gate = tmp_path / "release"
    # Host processes see the test's files: the first Job holds its quota until the test says so.
    hold = f"import pathlib, time\nwhile not pathlib.Path({str(gate)!r}).exists(): time.sleep(0.2)"
    # Created suspended, as the operator does: Kueue decides when it runs.
    batch.create_namespaced_job(namespace, queued_job("first", "team", hold, suspend=True))

    def workload(job: str) -> dict[str, Any] | None:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "workloads")["items"]
        owned = [w for w in items if any(o["name"] == job for o in w["metadata"].get("ownerReferences", []))]
        return owned[0] if owned else None

    def running(job: str) -> bool:
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
        return any(p.status.phase == "Running" for p in pods)

    wait_for(
        lambda: (w := workload("first")) is not None and condition_status(w, "Admitted") == "True",
        60,
        description=lambda: f"first's Workload admitted: {workload('first')}",
    )
    wait_for(lambda: running("first"), 60, description="first's pod running")
    assert batch.read_namespaced_job("first", namespace).spec.suspend is False
    with pytest.raises(ApiException) as refused:
        batch.patch_namespaced_job("first", namespace, {"metadata": {"labels": {QUEUE_LABEL: "other"}}})
    assert refused.value.status in (400, 403, 422) and "vjob.kb.io" in refused.value.body, refused.value.body

    # Created unsuspended: Kueue's mutating webhook suspends it before the Job controller sees it.
    second = queued_job("second", "team", "print('second ran')", suspend=False)
    assert batch.create_namespaced_job(namespace, second).spec.suspend is True

    def pending() -> dict[str, Any] | None:
        w = workload("second")
        if w is None:
            return None
        reserved = [c for c in w.get("status", {}).get("conditions", []) if c["type"] == "QuotaReserved"]
        return reserved[0] if reserved and reserved[0]["status"] == "False" else None

    waiting = wait_for(pending, 60, description=lambda: f"second's Workload pending: {workload('second')}")
    assert waiting["reason"] == "Pending"
    assert "insufficient unused quota for cpu" in waiting["message"], waiting
    assert batch.read_namespaced_job("second", namespace).spec.suspend is True
    assert not core.list_namespaced_pod(namespace, label_selector="job-name=second").items

    gate.touch()

    def complete(job: str) -> bool:
        return condition_status(batch.read_namespaced_job_status(job, namespace), "Complete") == "True"

    wait_for(lambda: complete("first"), 60, description="first to complete")
    wait_for(
        lambda: complete("second"),
        90,
        description=lambda: f"second to run and complete: {workload('second')}",
    )
    first, second = (batch.read_namespaced_job_status(j, namespace).status for j in ("first", "second"))
    assert second.start_time >= first.completion_time
    assert condition_status(workload("second") or {}, "Admitted") == "True"
    (pod,) = core.list_namespaced_pod(namespace, label_selector="job-name=second").items
    assert kueue_cluster.read_log(namespace, pod.metadata.name).strip() == "second ran"
    custom.delete_cluster_custom_object(GROUP, VERSION, "clusterqueues", queue_name)
    custom.delete_cluster_custom_object(GROUP, VERSION, "resourceflavors", flavor)
