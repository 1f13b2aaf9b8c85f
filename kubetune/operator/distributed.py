"""Pure builders for multi-node training (``resources.nodes > 1``): how the worker Job becomes a group.

The group is Kubernetes' own machinery, as Kubeflow Trainer and JobSet build it: an Indexed Job
(``completionMode: Indexed``, parallelism = completions = nodes) whose pods are named by a headless
Service (``<job>-<index>.<service>``), each running torchrun with ``--node-rank`` = its completion
index. docs/distributed.md says why each choice was made; in short:

- **static rendezvous at index 0** (``--master-addr <job>-0.<service>``), not c10d's dynamic one:
  ranks are then ``node_rank * nproc + local_rank``, so global rank 0 is always pod index 0. The
  operator reads progress from that pod, and only rank 0 publishes; with c10d ranks follow join order.
- **whole-group restart by the Job**, not torchrun's elastic restarts (``--max-restarts 0``): a lost
  pod (node failure, eviction, deletion) can only be replaced by the Job controller, and torchrun's
  restarts inside the surviving pods cannot bring it back. The survivors see the peer go, exit with
  ``PeerLost`` (not counted against ``backoffLimit``), and every index restarts from the checkpoint on
  storage all nodes share.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob

#: TCP port of rank 0's rendezvous store (torchrun's default).
RENDEZVOUS_PORT = 29500
#: The annotation the Job controller puts on each pod of an Indexed Job.
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
#: The env var the Job controller sets from that annotation; expanded in the container's args.
COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"


def is_distributed(job: FineTuneJob) -> bool:
    return job.spec.resources.nodes > 1


def processes_per_node(job: FineTuneJob) -> int:
    """One process per GPU; one process on a CPU node (its threads use the node's cores)."""
    return max(1, job.spec.resources.gpus_per_node)


def rendezvous_host(job_name: str, service_name: str) -> str:
    """Index 0's stable DNS name, resolved through the pods' search path (namespace, cluster domain)."""
    return f"{job_name}-0.{service_name}"


def launch_command(job: FineTuneJob, job_name: str, service_name: str, train: list[str]) -> list[str]:
    """torchrun (through :mod:`kubetune.worker.distributed`, which keeps the worker's exit codes) for
    this pod's index, around the ``kubetune train`` arguments ``train``."""
    return [
        "python",
        "-m",
        "kubetune.worker.distributed",
        f"--nnodes={job.spec.resources.nodes}",
        f"--nproc-per-node={processes_per_node(job)}",
        f"--node-rank=$({COMPLETION_INDEX_ENV})",
        "--rdzv-backend=static",
        f"--master-addr={rendezvous_host(job_name, service_name)}",
        f"--master-port={RENDEZVOUS_PORT}",
        "--max-restarts=0",
        *train,
    ]


def indexed_job_fields(job: FineTuneJob) -> dict[str, Any]:
    """What an Indexed Job adds to the worker Job's spec."""
    nodes = job.spec.resources.nodes
    return {"completionMode": "Indexed", "completions": nodes, "parallelism": nodes}


def rank0_first(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pods ordered by completion index (pods of a non-indexed Job keep their order): rank 0's pod,
    the one that serves progress, comes first."""

    def index(pod: dict[str, Any]) -> int:
        value = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION, "0")
        return int(value) if str(value).isdigit() else 0

    return sorted(pods, key=index)
