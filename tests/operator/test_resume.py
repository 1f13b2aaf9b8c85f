"""Resume for an output that is not on a claim, on the local cluster.

Aspects:
- a FineTuneJob publishing to ``file://`` gets a work claim it owns, mounted as the worker's work
  directory (checkpoints);
- its worker pod deleted mid-run is replaced by the Job, and the new pod resumes from the last
  checkpoint on that claim: the artifact's manifest says ``resumed_from_step`` > 0 and the run
  ends at its full step count;
- exactly one worker Job ran, the FineTuneJob Succeeds, and its result names the manifest's sha256.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.localcluster.testing import ClusterHandle, wait_for
from tests.fixtures import create_finetunejob, finetunejob, get_finetunejob, phase_is

pytestmark = [pytest.mark.cluster, pytest.mark.torch]

STEPS = 80


def _core(cluster: ClusterHandle) -> Any:
    from kubernetes import client

    return client.CoreV1Api(cluster.api_client())


def _step(cluster: ClusterHandle, namespace: str, name: str) -> int:
    return int(
        ((get_finetunejob(cluster, namespace, name).get("status") or {}).get("progress") or {}).get("step", 0)
    )


def test_worker_pod_deleted_mid_run_resumes_from_the_work_claim(
    cluster: ClusterHandle, namespace: str, operator: Path, claim_dir: Path
) -> None:
    from kubernetes import client

    from kubetune.worker.testing import make_tiny_model, task_records, write_records

    make_tiny_model(claim_dir / "model")
    write_records(claim_dir / "train.jsonl", task_records(80, fmt="completion"))
    output = claim_dir / "file-out" / "resume-lora"
    body = finetunejob("resume-lora", output={"uri": f"file://{output}"})
    body["spec"]["training"].update(maxSteps=STEPS, checkpointEverySteps=5)
    created = create_finetunejob(cluster, namespace, body)

    claim = wait_for(
        lambda: _core(cluster).read_namespaced_persistent_volume_claim("resume-lora-work", namespace),
        60,
        description="the work claim",
        ignore=(client.ApiException,),
    )
    assert claim.metadata.owner_references[0].uid == created["metadata"]["uid"]

    # Past the first checkpoints, well before the end: delete the pod.
    wait_for(
        lambda: 10 <= _step(cluster, namespace, "resume-lora") < STEPS - 20,
        300,
        interval=0.5,
        description=lambda: (
            f"training past step 10: {get_finetunejob(cluster, namespace, 'resume-lora').get('status')}"
        ),
    )
    selector = "batch.kubernetes.io/job-name=resume-lora-train"
    (first,) = _core(cluster).list_namespaced_pod(namespace, label_selector=selector).items
    _core(cluster).delete_namespaced_pod(first.metadata.name, namespace)

    done = wait_for(
        lambda: phase_is(cluster, namespace, "resume-lora", "Succeeded", "Failed"),
        400,
        interval=1,
        description=lambda: (
            f"resume-lora to finish: {get_finetunejob(cluster, namespace, 'resume-lora').get('status')}"
        ),
    )
    assert done["status"]["phase"] == "Succeeded", done["status"]

    manifest_file = output / "kubetune.json"
    manifest = json.loads(manifest_file.read_text())
    metrics = manifest["metrics"]
    assert metrics["resumed_from_step"] and metrics["resumed_from_step"] >= 5, metrics
    assert metrics["steps"] == STEPS
    assert done["status"]["result"]["sha256"] == hashlib.sha256(manifest_file.read_bytes()).hexdigest()

    jobs = client.BatchV1Api(cluster.api_client()).list_namespaced_job(namespace).items
    assert [j.metadata.name for j in jobs] == ["resume-lora-train"]
    pods = _core(cluster).list_namespaced_pod(namespace, label_selector=selector).items
    assert first.metadata.uid not in {p.metadata.uid for p in pods} and len(pods) >= 1
