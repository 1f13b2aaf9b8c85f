"""The planner's feasibility check under ``kubetune operator`` on the local cluster.

Aspects:
- full fine-tuning of a Llama-3-8B config on 24Gi GPUs ends Feasible=False (InsufficientGpuMemory)
  with needed vs available and what would fit, Running=Infeasible, status.plan filled with
  fits=false, and no worker Job;
- annotating the infeasible job with ``kubetune.dev/skip-feasibility: "true"`` afterwards (metadata,
  no new generation) still reaches the operator: Feasible=True (FeasibilityCheckSkipped), an Event,
  and its worker Job;
- a job that fits (QLoRA on 80Gi) is Feasible=True (Fits), shows its plan, and ``kubectl get ftj -o
  wide`` prints its Trainable and Memory columns.

The model is a real config.json read from this host (file://); both jobs request a GPU the local
cluster lacks, so the feasible one is created suspended and no pod is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune.localcluster.testing import ClusterHandle, wait_for
from tests.fixtures import create_finetunejob, finetunejob, get_finetunejob

pytestmark = [pytest.mark.cluster]

LLAMA_3_8B = Path(__file__).resolve().parents[1] / "planner" / "configs" / "llama-3-8b.json"


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), None)


def _planned(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any] | None:
    obj = get_finetunejob(cluster, namespace, name)
    feasible = _condition(obj, "Feasible")
    return obj if feasible and (obj.get("status") or {}).get("plan") else None


def test_an_infeasible_job_gets_no_worker_and_a_feasible_one_shows_its_plan(
    cluster: ClusterHandle, namespace: str, operator: Path
) -> None:
    from kubernetes import client

    model = {"uri": f"file://{LLAMA_3_8B}"}
    too_big = finetunejob(
        "too-big",
        model=model,
        method={"type": "full"},
        training={"batchSize": 1, "maxSeqLength": 1024, "maxSteps": 10},
        resources={"gpusPerNode": 1, "gpuMemory": "24Gi"},
    )
    create_finetunejob(cluster, namespace, too_big)
    obj = wait_for(lambda: _planned(cluster, namespace, "too-big"), 120, description="too-big planned")
    feasible = _condition(obj, "Feasible")
    assert feasible is not None and feasible["status"] == "False", feasible
    assert feasible["reason"] == "InsufficientGpuMemory"
    assert "per GPU but 24.0Gi is available" in feasible["message"] and "qlora" in feasible["message"]
    plan = obj["status"]["plan"]
    assert plan["fits"] is False and plan["totalParameters"] == 8_030_261_248
    assert plan["recommendation"] == feasible["message"]
    running = _condition(obj, "Running")
    assert running is not None and running["reason"] == "Infeasible"
    assert obj["status"]["phase"] == "Pending"
    jobs = client.BatchV1Api(cluster.api_client()).list_namespaced_job(namespace).items
    assert [j.metadata.name for j in jobs] == []

    cluster.kubectl("annotate", "ftj", "too-big", "-n", namespace, "kubetune.dev/skip-feasibility=true")

    def skipped() -> dict[str, Any] | None:
        condition = _condition(get_finetunejob(cluster, namespace, "too-big"), "Feasible")
        return condition if condition and condition["reason"] == "FeasibilityCheckSkipped" else None

    feasible = wait_for(skipped, 120, description="the skip annotation honoured")
    assert feasible["status"] == "True" and "exceeds" in feasible["message"], feasible
    wait_for(
        lambda: client.BatchV1Api(cluster.api_client()).list_namespaced_job(namespace).items,
        60,
        description="the skipped job's worker Job",
    )
    # The Event is posted after the pass's writes, so it may trail the Job by a moment.
    wait_for(
        lambda: any(
            e.reason == "FeasibilityCheckSkipped" and e.involved_object.name == "too-big"
            for e in client.CoreV1Api(cluster.api_client()).list_namespaced_event(namespace).items
        ),
        30,
        description="the FeasibilityCheckSkipped Event",
    )

    fits = finetunejob(
        "fits",
        model=model,
        method={"type": "qlora"},
        training={"batchSize": 1, "maxSeqLength": 1024, "maxSteps": 10},
        resources={"gpusPerNode": 1, "gpuMemory": "80Gi"},
        suspend=True,
    )
    create_finetunejob(cluster, namespace, fits)
    obj = wait_for(lambda: _planned(cluster, namespace, "fits"), 120, description="fits planned")
    feasible = _condition(obj, "Feasible")
    assert feasible is not None and feasible["status"] == "True" and feasible["reason"] == "Fits", feasible
    plan = obj["status"]["plan"]
    assert plan["fits"] is True and plan["trainablePercent"].endswith("%")
    wide = cluster.kubectl("get", "ftj", "fits", "-n", namespace, "-o", "wide").stdout
    header, row = wide.splitlines()[:2]
    assert "TRAINABLE" in header and "MEMORY" in header
    assert plan["trainablePercent"] in row and plan["estimatedPeakMemory"] in row
