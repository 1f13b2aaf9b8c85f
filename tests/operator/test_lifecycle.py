"""Lifecycles under ``kubetune operator`` on the local cluster.

Aspects:
- phases move forward only through a real run (Pending, Running, Succeeded), and once the run has
  succeeded, ``ttlSecondsAfterFinished`` deletes the Job for good: new generations (spec.suspend
  flipped both ways) are reconciled without re-creating it, the FineTuneJob stays Succeeded with
  its result, and the artifact is not rewritten;
- an AdapterDeployment created before the FineTuneJob it serves loads the adapter when the run
  succeeds, woken by the FineTuneJob's event (there is no resync timer), and then scales through
  /scale with the new replica loading it too;
- a Job with the FineTuneJob's name but not its uid (left by an earlier object) is not adopted:
  the Running condition says ChildConflict and the Job is left untouched; once it is gone, the
  operator creates its own;
- an AdapterDeployment whose Service name is taken by someone else's Service applies none of its
  children (no Deployment starts) and says ChildConflict;
- a queued Job (Kueue labels on the pod template) carries the labels on the Job too, and a
  suspend flip made by its queue is not reverted;
- an idle (suspended) FineTuneJob costs the operator no API request, and a spec.suspend flip still
  reaches its Job at once, through a watch event, under the operator's own suspend field manager.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import v1alpha1
from kubetune.localcluster.testing import ClusterHandle, wait_for
from tests.fixtures import create_finetunejob, finetunejob, get_finetunejob, phase_is

pytestmark = [pytest.mark.cluster]

PHASE_ORDER = ("Pending", "Running", "Succeeded")
QUEUE_LABELS = {"kueue.x-k8s.io/queue-name": "team-a", "kueue.x-k8s.io/priority-class": "low"}


def _objects(cluster: ClusterHandle) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(cluster.api_client())


def _batch(cluster: ClusterHandle) -> Any:
    from kubernetes import client

    return client.BatchV1Api(cluster.api_client())


def _set_suspend(cluster: ClusterHandle, namespace: str, name: str, suspend: bool) -> int:
    """Flip spec.suspend; returns the new generation."""
    patched = _objects(cluster).patch_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "finetunejobs", name, {"spec": {"suspend": suspend}}
    )
    return int(patched["metadata"]["generation"])


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition["type"] == kind:
            return dict(condition)
    return {}


def _observed(cluster: ClusterHandle, namespace: str, name: str, generation: int) -> dict[str, Any] | None:
    obj = get_finetunejob(cluster, namespace, name)
    return obj if (obj.get("status") or {}).get("observedGeneration") == generation else None


def _read_job(cluster: ClusterHandle, namespace: str, name: str) -> Any:
    from kubernetes.client.rest import ApiException

    try:
        return _batch(cluster).read_namespaced_job(name, namespace)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


class PhaseRecorder:
    """Every distinct phase a FineTuneJob's status passes through, from a watch (no polling gaps)."""

    def __init__(self, cluster: ClusterHandle, namespace: str, name: str) -> None:
        from kubernetes import watch

        self.phases: list[str] = []
        self.error: BaseException | None = None
        self._stopped = False
        self._watch = watch.Watch()
        self._thread = threading.Thread(
            target=self._run, args=(cluster, namespace, name), name="phases", daemon=True
        )
        self._thread.start()

    def _run(self, cluster: ClusterHandle, namespace: str, name: str) -> None:
        stream = self._watch.stream(
            _objects(cluster).list_namespaced_custom_object,
            v1alpha1.GROUP,
            v1alpha1.VERSION,
            namespace,
            "finetunejobs",
            field_selector=f"metadata.name={name}",
            timeout_seconds=900,
        )
        try:
            for event in stream:
                phase = (event["object"].get("status") or {}).get("phase")
                if phase and (not self.phases or self.phases[-1] != phase):
                    self.phases.append(phase)
        except Exception as error:  # the stream outlives the test until the cluster stops
            if not self._stopped:
                self.error = error

    def stop(self) -> list[str]:
        self._stopped = True
        self._watch.stop()
        assert self.error is None, f"the phase watch broke: {self.error!r}"
        return self.phases


#: A request by the reconcilers (urllib3's debug line) or by kopf itself (its patches).
_REQUEST = re.compile(r'urllib3\.connectionpool: .* "(GET|POST|PUT|PATCH|DELETE) |-patching the \w+ with')


def _requests_logged(log: Path) -> int:
    return len(_REQUEST.findall(log.read_text()))


@pytest.mark.torch
def test_phases_move_forward_and_ttl_deletes_the_job_for_good(
    cluster: ClusterHandle, namespace: str, operator: Path, claim_dir: Path
) -> None:
    from kubetune.worker.testing import make_tiny_model, task_records, write_records

    make_tiny_model(claim_dir / "model")
    write_records(claim_dir / "train.jsonl", task_records(80, fmt="completion"))
    recorder = PhaseRecorder(cluster, namespace, "ttl-lora")
    create_finetunejob(cluster, namespace, finetunejob("ttl-lora", ttlSecondsAfterFinished=1))

    done = wait_for(
        lambda: phase_is(cluster, namespace, "ttl-lora", "Succeeded", "Failed"),
        300,
        interval=1,
        description=lambda: (
            f"ttl-lora to finish: {json.dumps(get_finetunejob(cluster, namespace, 'ttl-lora').get('status'))}"
        ),
    )
    assert done["status"]["phase"] == "Succeeded", done["status"]
    manifest = claim_dir / "out" / "ttl-lora" / "kubetune.json"
    written = manifest.stat().st_mtime_ns
    sha256 = hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert done["status"]["result"]["sha256"] == sha256

    # The TTL controller deletes the Job; new generations are reconciled and do not bring it back.
    wait_for(lambda: _read_job(cluster, namespace, "ttl-lora-train") is None, 120, description="TTL deletion")
    for suspend in (True, False):
        generation = _set_suspend(cluster, namespace, "ttl-lora", suspend)
        wait_for(
            lambda: _observed(cluster, namespace, "ttl-lora", generation),  # noqa: B023
            60,
            description=f"generation {generation} observed",
        )
    assert _read_job(cluster, namespace, "ttl-lora-train") is None
    assert not _batch(cluster).list_namespaced_job(namespace).items
    after = get_finetunejob(cluster, namespace, "ttl-lora")["status"]
    assert after["phase"] == "Succeeded" and after["result"] == done["status"]["result"]
    assert after["jobName"] == "ttl-lora-train" and after["progress"] == done["status"]["progress"]
    assert manifest.stat().st_mtime_ns == written

    phases = recorder.stop()
    assert phases[-1] == "Succeeded" and "Running" in phases, phases
    ranks = [PHASE_ORDER.index(p) for p in phases]
    assert ranks == sorted(ranks), f"phases went backwards: {phases}"


def _adep_status(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    obj = _objects(cluster).get_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "adapterdeployments", name
    )
    return dict(obj.get("status") or {})


@pytest.mark.torch
def test_serving_wakes_when_the_run_it_serves_succeeds(
    cluster: ClusterHandle, namespace: str, operator: Path, claim_dir: Path
) -> None:
    from kubetune.worker.testing import make_tiny_model, task_records, write_records

    make_tiny_model(claim_dir / "model")
    write_records(claim_dir / "train.jsonl", task_records(80, fmt="completion"))
    adep = {
        "apiVersion": v1alpha1.API_VERSION,
        "kind": "AdapterDeployment",
        "metadata": {"name": "later"},
        "spec": {
            "model": {"uri": "pvc://data/model"},
            "adapters": [{"name": "later-v1", "fineTuneJob": "later-lora"}],
            "resources": {"cpu": "1", "memory": "2Gi"},
        },
    }
    _objects(cluster).create_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "adapterdeployments", adep
    )

    def serving(replicas: int, adapters: str, state: str) -> dict[str, Any] | None:
        status = _adep_status(cluster, namespace, "later")
        ready = status.get("readyReplicas") == replicas and status.get("adaptersReady") == adapters
        return status if ready and status["adapters"][0]["state"] == state else None

    waiting = wait_for(
        lambda: serving(1, "0/1", "Pending"),
        240,
        interval=1,
        description=lambda: f"the base served: {json.dumps(_adep_status(cluster, namespace, 'later'))}",
    )
    assert "later-lora" in waiting["adapters"][0]["message"]

    create_finetunejob(cluster, namespace, finetunejob("later-lora"))
    status = wait_for(
        lambda: serving(1, "1/1", "Loaded"),
        400,
        interval=1,
        description=lambda: (
            f"the adapter loaded: {json.dumps(_adep_status(cluster, namespace, 'later'))}; "
            f"run: {json.dumps(get_finetunejob(cluster, namespace, 'later-lora').get('status'))}"
        ),
    )
    assert status["adapters"][0]["source"] == "pvc://data/out/later-lora"

    # Scaling is an update of the AdapterDeployment; the new pod's readiness is an event too.
    _objects(cluster).patch_namespaced_custom_object_scale(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "adapterdeployments", "later", {"spec": {"replicas": 2}}
    )
    status = wait_for(
        lambda: serving(2, "1/1", "Loaded"),
        240,
        interval=1,
        description=lambda: f"2 replicas: {json.dumps(_adep_status(cluster, namespace, 'later'))}",
    )
    assert status["adapters"][0]["loadedReplicas"] == 2


def test_a_child_of_another_owner_is_not_adopted(
    cluster: ClusterHandle, namespace: str, operator: Path
) -> None:
    leftover = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "orphan-train", "labels": {"kubetune.dev/finetunejob": "orphan"}},
        "spec": {
            "suspend": True,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "worker", "image": "busybox", "command": ["true"]}],
                }
            },
        },
    }
    batch = _batch(cluster)
    batch.create_namespaced_job(namespace, leftover)
    uid = create_finetunejob(cluster, namespace, finetunejob("orphan", suspend=True))["metadata"]["uid"]

    blocked = wait_for(
        lambda: (
            _condition(get_finetunejob(cluster, namespace, "orphan"), "Running").get("reason")
            == "ChildConflict"
            and get_finetunejob(cluster, namespace, "orphan")
        ),
        60,
        description=lambda: (
            f"ChildConflict: {json.dumps(get_finetunejob(cluster, namespace, 'orphan').get('status'))}"
        ),
    )
    message = _condition(blocked, "Running")["message"]
    assert "orphan-train" in message and "has no controller" in message, message
    job = batch.read_namespaced_job("orphan-train", namespace)
    # Untouched: the Job controller writes its status, the operator nothing at all.
    assert {entry.manager for entry in job.metadata.managed_fields}.isdisjoint(
        {"kubetune", "kubetune-suspend"}
    )
    assert not job.metadata.owner_references and not (job.metadata.annotations or {})

    # Once the stray Job is gone (its deletion is an event the operator watches), ours is created.
    batch.delete_namespaced_job("orphan-train", namespace, propagation_policy="Background")

    def ours() -> Any:
        job = _read_job(cluster, namespace, "orphan-train")
        owners = (job and job.metadata.owner_references) or []
        return job if [o.uid for o in owners] == [uid] else None

    assert wait_for(ours, 60, description="the FineTuneJob's own Job").spec.suspend is True
    wait_for(lambda: phase_is(cluster, namespace, "orphan", "Suspended"), 60, description="Suspended")


def test_serving_children_of_another_owner_are_not_touched(
    cluster: ClusterHandle, namespace: str, operator: Path
) -> None:
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())
    theirs = core.create_namespaced_service(
        namespace, {"metadata": {"name": "support"}, "spec": {"ports": [{"port": 80}]}}
    )
    adep = {
        "apiVersion": v1alpha1.API_VERSION,
        "kind": "AdapterDeployment",
        "metadata": {"name": "support"},
        "spec": {"model": {"uri": "pvc://data/model"}, "adapters": [{"name": "a", "uri": "pvc://data/a"}]},
    }
    _objects(cluster).create_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "adapterdeployments", adep
    )

    def conflict() -> dict[str, Any] | None:
        obj = _objects(cluster).get_namespaced_custom_object(
            v1alpha1.GROUP, v1alpha1.VERSION, namespace, "adapterdeployments", "support"
        )
        degraded = _condition(obj, "Degraded")
        return degraded if degraded.get("reason") == "ChildConflict" else None

    degraded = wait_for(conflict, 60, description="ChildConflict on the AdapterDeployment")
    assert "Service support" in degraded["message"], degraded
    assert core.read_namespaced_service("support", namespace).metadata.resource_version == (
        theirs.metadata.resource_version
    )
    assert not client.AppsV1Api(cluster.api_client()).list_namespaced_deployment(namespace).items
    assert not [
        c for c in core.list_namespaced_config_map(namespace).items if c.metadata.name == "support-serving"
    ]


def test_queued_job_carries_the_labels_and_its_queue_owns_suspend(
    cluster: ClusterHandle, namespace: str, operator: Path
) -> None:
    create_finetunejob(
        cluster, namespace, finetunejob("queued", suspend=True, podTemplate={"labels": QUEUE_LABELS})
    )
    wait_for(lambda: phase_is(cluster, namespace, "queued", "Suspended"), 60, description="Suspended")
    job = _read_job(cluster, namespace, "queued-train")
    assert QUEUE_LABELS.items() <= job.metadata.labels.items()
    assert job.spec.suspend is True

    # Kueue admits the Job although the FineTuneJob's spec.suspend is still true.
    _batch(cluster).patch_namespaced_job(
        "queued-train", namespace, {"spec": {"suspend": False}}, field_manager="kueue-admission"
    )
    wait_for(
        lambda: (
            _condition(get_finetunejob(cluster, namespace, "queued"), "Suspended").get("status") == "False"
        ),
        60,
        description="the FineTuneJob to see the admission",
    )
    job = _read_job(cluster, namespace, "queued-train")
    assert job.spec.suspend is False
    assert "kubetune-suspend" not in {entry.manager for entry in job.metadata.managed_fields}


def test_idle_costs_nothing_and_suspend_flips_reach_the_job(
    cluster: ClusterHandle, namespace: str, operator: Path
) -> None:
    create_finetunejob(cluster, namespace, finetunejob("held", suspend=True))
    wait_for(lambda: phase_is(cluster, namespace, "held", "Suspended"), 60, description="Suspended")

    # Quiet first (kopf's own bookkeeping patches follow the first pass), then a window of several
    # former resync periods (5 s) without a single request.
    counts: list[int] = []

    def quiet() -> bool:
        counts.append(_requests_logged(operator))
        return len(counts) > 1 and counts[-1] == counts[-2]

    wait_for(quiet, 60, interval=3, description="the operator to go quiet")
    before = _requests_logged(operator)
    time.sleep(15)  # an observation window: there is no event to wait for when nothing may happen
    assert _requests_logged(operator) == before, operator.read_text()[-3000:]

    generation = _set_suspend(cluster, namespace, "held", False)
    job = wait_for(
        lambda: (job := _read_job(cluster, namespace, "held-train")) and job.spec.suspend is False and job,
        60,
        description="the Job to be resumed",
    )
    assert "kubetune-suspend" in {entry.manager for entry in job.metadata.managed_fields}
    wait_for(lambda: _observed(cluster, namespace, "held", generation), 60, description="observed")
