"""FineTuneJobs queued by real Kueue (its controller and webhooks on the local cluster).

Aspects:
- a ClusterQueue with CPU quota for one worker and two FineTuneJobs whose pod template carries
  ``kueue.x-k8s.io/queue-name``: the operator puts the label on each worker Job, Kueue admits the
  first (it trains) and holds the second suspended, with no pod;
- the waiting FineTuneJob says so: ``Suspended=True`` with reason ``Queued`` and phase ``Suspended``,
  and the condition's message carries Kueue's own reason from the Job's Workload (no quota left);
- the operator never overrides Kueue's ``spec.suspend``: the held Job stays suspended, and no field
  manager of the operator's other than the creating apply ever wrote it;
- once the first FineTuneJob Succeeds, Kueue admits the second, which runs (its Job starts no earlier
  than the first completed) and Succeeds.

Skips, as tests/cluster/test_kueue.py does, while Kueue is not built (``make kueue-build``), or fails
under ``make test`` (``KUBETUNE_REQUIRE_KUEUE=1``), which builds it first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kubetune.localcluster.testing import ClusterHandle, wait_for
from tests.cluster.test_kueue import GROUP, QUEUE_LABEL, VERSION, kueue_object
from tests.fixtures import create_finetunejob, finetunejob, get_finetunejob, phase_is

# One xdist worker starts the Kueue cluster for both Kueue test modules.
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.torch,
    pytest.mark.xdist_group("kueue-cluster"),
]


@pytest.fixture(scope="module")
def cluster(kueue_cluster: ClusterHandle) -> Iterator[ClusterHandle]:
    """The operator, namespace and claim fixtures of this module run on the Kueue cluster."""
    yield kueue_cluster


def cluster_queue(name: str, flavor: str) -> dict[str, Any]:
    """Quota for one worker (1 CPU, 2Gi) and not two: Kueue needs quota for every resource a pod requests."""
    quota = [{"name": "cpu", "nominalQuota": "1"}, {"name": "memory", "nominalQuota": "3Gi"}]
    group = {"coveredResources": ["cpu", "memory"], "flavors": [{"name": flavor, "resources": quota}]}
    return kueue_object("ClusterQueue", name, {"namespaceSelector": {}, "resourceGroups": [group]})


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def test_second_finetunejob_waits_in_the_queue_then_runs(
    cluster: ClusterHandle, namespace: str, operator: Path, claim_dir: Path
) -> None:
    from kubetune.worker.testing import make_tiny_model, task_records, write_records

    api = cluster.api_client()
    custom = client.CustomObjectsApi(api)
    batch = client.BatchV1Api(api)
    core = client.CoreV1Api(api)
    flavor, queue_name = f"flavor-{namespace}", f"cq-{namespace}"
    custom.create_cluster_custom_object(
        GROUP, VERSION, "resourceflavors", kueue_object("ResourceFlavor", flavor, {})
    )
    custom.create_cluster_custom_object(GROUP, VERSION, "clusterqueues", cluster_queue(queue_name, flavor))
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, "localqueues",
        kueue_object("LocalQueue", "team", {"clusterQueue": queue_name}, namespace),
    )  # fmt: skip

    make_tiny_model(claim_dir / "model")
    write_records(claim_dir / "train.jsonl", task_records(80, fmt="completion"))
    for name in ("first", "second"):
        body = finetunejob(name, podTemplate={"labels": {QUEUE_LABEL: "team"}})
        body["spec"]["training"].update(maxSteps=20)
        body["spec"]["resources"].update(cpu="1", memory="2Gi")
        create_finetunejob(cluster, namespace, body)

    def job(name: str) -> Any:
        return batch.read_namespaced_job(f"{name}-train", namespace)

    def queued(name: str) -> dict[str, Any] | None:
        obj = get_finetunejob(cluster, namespace, name)
        held = _conditions(obj).get("Suspended") or {}
        return obj if held.get("status") == "True" and held.get("reason") == "Queued" else None

    def admitted_and_held() -> tuple[str, str, dict[str, Any]] | None:
        # Kueue admits whichever Workload it sees first; on a quiet machine that can be "second".
        for running, waiting in (("first", "second"), ("second", "first")):
            held = queued(waiting)
            if held is not None and phase_is(cluster, namespace, running, "Running", "Succeeded"):
                return running, waiting, held
        return None

    found = wait_for(
        admitted_and_held,
        180,
        description=lambda: (
            "one Running and the other Queued: "
            + str({n: get_finetunejob(cluster, namespace, n).get("status") for n in ("first", "second")})
        ),
    )
    running, waiting_name, waiting = found
    assert waiting["status"]["phase"] == "Suspended"

    # Kueue's own reason, from the Workload (it changes without any event on the Job).
    def held_message() -> str:
        return str(_conditions(get_finetunejob(cluster, namespace, waiting_name))["Suspended"]["message"])

    def kueue_reason_shown() -> str | None:
        message = held_message()
        return message if "quota" in message else None

    message = wait_for(
        kueue_reason_shown,
        60,
        description=lambda: f"Kueue's reason in the Suspended condition: {held_message()!r}",
    )
    assert message.startswith("the worker Job waits for admission by its queue: "), message
    held = job(waiting_name)
    assert held.metadata.labels[QUEUE_LABEL] == "team" and held.spec.suspend is True
    assert not core.list_namespaced_pod(
        namespace, label_selector=f"batch.kubernetes.io/job-name={waiting_name}-train"
    ).items
    assert job(running).spec.suspend is False

    done = wait_for(
        lambda: phase_is(cluster, namespace, running, "Succeeded", "Failed"),
        600,
        interval=1,
        description=lambda: f"{running} to end: {get_finetunejob(cluster, namespace, running).get('status')}",
    )
    assert done["status"]["phase"] == "Succeeded", done["status"]
    # Until Kueue admits it, the held Job has stayed suspended: never resumed by the operator.
    assert queued(waiting_name) is not None or job(waiting_name).status.start_time is not None
    finished = wait_for(
        lambda: phase_is(cluster, namespace, waiting_name, "Succeeded", "Failed"),
        600,
        interval=1,
        description=lambda: (
            f"{waiting_name} to end: {get_finetunejob(cluster, namespace, waiting_name).get('status')}"
        ),
    )
    assert finished["status"]["phase"] == "Succeeded", finished["status"]
    first_done = batch.read_namespaced_job_status(f"{running}-train", namespace).status.completion_time
    assert job(waiting_name).status.start_time >= first_done
    # Only Kueue (its webhook and controller) changed spec.suspend after the operator's creating apply.
    writers = {
        entry.manager
        for entry in job(waiting_name).metadata.managed_fields or []
        if "f:suspend" in str((entry.fields_v1 or {}).get("f:spec", {}))
    }
    assert "kubetune-suspend" not in writers, writers
    custom.delete_cluster_custom_object(GROUP, VERSION, "clusterqueues", queue_name)
    custom.delete_cluster_custom_object(GROUP, VERSION, "resourceflavors", flavor)
