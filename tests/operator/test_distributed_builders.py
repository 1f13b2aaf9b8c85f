"""Pure builders of a multi-node FineTuneJob (``resources.nodes > 1``), without a cluster.

Aspects:
- the worker Job is Indexed (parallelism = completions = nodes); one node stays a plain Job;
- each pod runs torchrun (through kubetune's launcher) with ``--nnodes``, ``--node-rank`` from the
  completion index, ``--nproc-per-node`` = GPUs (1 on CPU), static rendezvous at index 0's stable
  DNS name, and no elastic restarts;
- a headless Service owned by the FineTuneJob, publishing not-ready addresses, selects exactly the
  worker pods, and the pod template's subdomain is its name;
- GPUs are requested per node; the queue and priority labels still reach the Job and the priority
  class the pod;
- a rank that lost its peer (PeerLost) is ignored by the podFailurePolicy like a preemption;
- a work claim for an output off-claim is ReadWriteMany, since every node writes checkpoints there;
- progress is read from rank 0's pod, whatever order the pods are listed in.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.operator import builders, distributed
from kubetune.worker.errors import PeerLost
from tests.api.cases import finetunejob


def _job(nodes: int = 2, gpus: int = 0, **spec_updates: Any) -> FineTuneJob:
    manifest = finetunejob("big")
    manifest["metadata"].update(namespace="team-a", uid="uid-1", generation=1)
    manifest["spec"]["resources"].update(nodes=nodes, gpusPerNode=gpus)
    manifest["spec"].update(spec_updates)
    return FineTuneJob.model_validate(manifest)


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    return container


def _flags(command: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in command if arg.startswith("--") and "=" in arg)


def test_nodes_above_one_render_an_indexed_job() -> None:
    manifest = builders.worker_job(_job(nodes=3), builders.WorkerSettings())
    spec = manifest["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert spec["template"]["spec"]["subdomain"] == "big-train"
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    single = builders.worker_job(_job(nodes=1), builders.WorkerSettings())["spec"]
    assert "completionMode" not in single and "subdomain" not in single["template"]["spec"]
    assert _container(builders.worker_job(_job(nodes=1), builders.WorkerSettings()))["command"][:3] == [
        "python",
        "-m",
        "kubetune",
    ]


def test_each_pod_runs_torchrun_with_its_completion_index_and_rank0_as_rendezvous() -> None:
    container = _container(builders.worker_job(_job(nodes=2), builders.WorkerSettings()))
    command = container["command"]
    assert command[:3] == ["python", "-m", "kubetune.worker.distributed"]
    flags = _flags(command)
    assert flags == {
        "nnodes": "2",
        "nproc-per-node": "1",
        "node-rank": "$(JOB_COMPLETION_INDEX)",
        "rdzv-backend": "static",
        "master-addr": "big-train-0.big-train",
        "master-port": "29500",
        "max-restarts": "0",
    }
    # What follows the launcher's flags is the single-node command, unchanged.
    assert command[command.index("--max-restarts=0") + 1 :] == [
        "-m",
        "kubetune",
        "train",
        "--plan",
        "/etc/kubetune/plan.json",
    ]
    assert {"name": "rendezvous", "containerPort": 29500} in container["ports"]


def test_gpus_per_node_are_requested_per_pod_and_set_processes_per_node() -> None:
    job = _job(nodes=4, gpus=8)
    container = _container(builders.worker_job(job, builders.WorkerSettings()))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert _flags(container["command"])["nproc-per-node"] == "8"
    assert _flags(container["command"])["nnodes"] == "4"


def test_headless_service_names_the_worker_pods() -> None:
    job = _job()
    service = builders.rendezvous_service(job)
    assert service is not None
    assert service["metadata"]["name"] == "big-train"
    assert service["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    pod_labels = builders.worker_job(job, builders.WorkerSettings())["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    # The service selects workers only: the plan and work children carry other components.
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "worker"
    assert builders.rendezvous_service(_job(nodes=1)) is None


def test_queue_labels_and_priority_class_reach_the_job_and_pods() -> None:
    labels = {"kueue.x-k8s.io/queue-name": "gpus", "kueue.x-k8s.io/priority-class": "high"}
    job = _job(podTemplate={"labels": labels, "priorityClassName": "batch-high"})
    manifest = builders.worker_job(job, builders.WorkerSettings())
    assert labels.items() <= manifest["metadata"]["labels"].items()
    assert manifest["spec"]["template"]["spec"]["priorityClassName"] == "batch-high"


def test_a_rank_that_lost_its_peer_does_not_count_against_backoff() -> None:
    rules = builders.worker_job(_job(), builders.WorkerSettings())["spec"]["podFailurePolicy"]["rules"]
    ignored = [r["onExitCodes"]["values"] for r in rules if r["action"] == "Ignore" and "onExitCodes" in r]
    assert ignored == [[PeerLost.exit_code, 143]]  # ascending, as the apiserver requires
    single = builders.worker_job(_job(nodes=1), builders.WorkerSettings())["spec"]["podFailurePolicy"]
    assert PeerLost.exit_code not in [
        code
        for r in single["rules"]
        if r["action"] == "Ignore"
        for code in r.get("onExitCodes", {}).get("values", [])
    ]


def test_work_claim_is_shared_by_every_node() -> None:
    claim = builders.work_claim(_job(output={"uri": "s3://bucket/big"}), builders.WorkerSettings())
    assert claim is not None and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    single = builders.work_claim(_job(nodes=1, output={"uri": "s3://bucket/big"}), builders.WorkerSettings())
    assert single is not None and single["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_progress_comes_from_rank_zero_pod() -> None:
    def pod(name: str, index: str | None) -> dict[str, Any]:
        annotations = {distributed.COMPLETION_INDEX_ANNOTATION: index} if index is not None else {}
        return {"metadata": {"name": name, "annotations": annotations}}

    ordered = distributed.rank0_first([pod("b", "1"), pod("c", "2"), pod("a", "0")])
    assert [p["metadata"]["name"] for p in ordered] == ["a", "b", "c"]
    assert [p["metadata"]["name"] for p in distributed.rank0_first([pod("x", None), pod("y", None)])] == [
        "x",
        "y",
    ]
