"""One reconcile pass of a FineTuneJob: read the world, apply the builders' difference, write status.

Synchronous (kopf runs sync handlers in its thread pool), serialised per object and idempotent:
children have deterministic names and are server-side applied only when absent or changed, so running
it twice, or from two triggers at once, writes nothing new. A pass costs a read of the object, of its
Job and a list of the Job's pods; it writes only what changed.

Lifecycle rules (docs/operator.md):

- the worker Job is created once per run and never again once status says the run ended, so
  ``ttlSecondsAfterFinished`` can delete it;
- a child whose controller is not this object (another uid, or none) is never adopted or touched:
  the Running condition says ``ChildConflict``;
- ``Job.spec.suspend`` is set at creation from ``spec.suspend``; afterwards the reconciler toggles it
  under its own field manager (:data:`SUSPEND_FIELD_MANAGER`), except for a Job with a Kueue
  queue-name label, whose suspension belongs to Kueue from then on.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.operator import builders, distributed, kube, planning, status
from kubetune.operator.config import OperatorConfig
from kubetune.operator.render import PROGRESS_PORT, training_plan
from kubetune.worker import plan as wp
from kubetune.worker.plan import ProgressReport

logger = logging.getLogger("kubetune.operator")

PLURAL = "finetunejobs"
KIND = "FineTuneJob"
#: Field manager of the reconciler's ``Job.spec.suspend`` toggles. Separate from
#: :data:`kube.FIELD_MANAGER`, which applied the whole Job at creation: applying only the one field
#: under that manager would release every other field it owns.
SUSPEND_FIELD_MANAGER = "kubetune-suspend"


def _fetch_progress(pod: dict[str, Any], timeout: float) -> ProgressReport | None:
    ip = (pod.get("status") or {}).get("podIP")
    if not ip or (pod.get("status") or {}).get("phase") != "Running":
        return None
    try:
        with urllib.request.urlopen(f"http://{ip}:{PROGRESS_PORT}/progress", timeout=timeout) as response:
            return ProgressReport.model_validate_json(response.read())
    except (OSError, ValueError):
        return None  # not listening yet, or between restarts: the next pass tries again


def plan_problem(job: FineTuneJob) -> str | None:
    """Why this operator cannot run the job, or None."""
    return None


def _may_have_pods(worker: dict[str, Any]) -> bool:
    """False for a suspended Job whose status counts no pod at all: listing would find none (this is
    most of what an operator restart reads for a queue of held jobs)."""
    job_status = worker.get("status") or {}
    counts = ("active", "ready", "succeeded", "failed", "terminating")
    return not (worker.get("spec") or {}).get("suspend") or any(job_status.get(c) for c in counts)


def ensure_worker(
    api_client: Any,
    job: FineTuneJob,
    plan: wp.TrainingPlan,
    config: OperatorConfig,
    previous: dict[str, Any] | None,
) -> tuple[dict[str, Any] | None, str | None]:
    """The FineTuneJob's worker Job (wire form), created when it should exist and does not, with
    ``spec.suspend`` brought in line where the FineTuneJob owns it; or (None, why not) when a child
    with its name belongs to someone else."""
    namespace = str(job.metadata.namespace)
    desired = builders.worker_job(job, config.worker)
    name = desired["metadata"]["name"]
    worker = kube.read(api_client, "Job", namespace, name)
    if problem := kube.ownership_problem(worker, KIND, job.metadata.uid):
        return None, problem
    if worker is None:
        if status.finished(previous):
            return None, None  # the run ended; its Job was deleted (TTL, a user) and stays deleted
        for child in (
            builders.plan_configmap(job, plan),
            builders.work_claim(job, config.worker),
            builders.rendezvous_service(job),
        ):
            if child is None:
                continue
            existing = kube.read(api_client, child["kind"], namespace, child["metadata"]["name"])
            if problem := kube.ownership_problem(existing, KIND, job.metadata.uid):
                return None, problem
            kube.apply_if_changed(api_client, existing, child)
        worker = kube.apply(api_client, kube.stamped(desired))
        logger.info("created Job %s", name)
        return worker, None
    suspended = bool((worker.get("spec") or {}).get("suspend"))
    if suspended != job.spec.suspend and not builders.queued(job) and not status.job_ended(worker):
        toggle = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"suspend": job.spec.suspend},
        }
        worker = kube.apply(api_client, toggle, field_manager=SUSPEND_FIELD_MANAGER)
        logger.info("%s Job %s", "suspended" if job.spec.suspend else "resumed", name)
    return worker, None


@dataclass
class PassMemory:
    """What passes leave behind for the triggers of later ones, in one operator process. Never an
    input of a pass itself (a pass reads the world), only a way to skip events that cannot change
    its outcome."""

    #: Worker Job or pod uid -> :func:`status.child_fingerprint` of it as a pass last read it.
    children: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    #: FineTuneJob uid -> :func:`spec_key` of the object a pass last reconciled.
    generations: dict[str, SpecKey] = field(default_factory=dict)


#: What a pass reads from a FineTuneJob that its watch events must show changed: the generation, and
#: the one annotation that changes the outcome without bumping it (metadata is not generation-counted).
SpecKey = tuple[int | None, str | None]


def spec_key(metadata: Any) -> SpecKey:
    annotations = metadata.get("annotations") or {}
    return metadata.get("generation"), annotations.get(planning.SKIP_ANNOTATION)


def reconcile(
    api_client: Any,
    namespace: str,
    name: str,
    config: OperatorConfig,
    memory: PassMemory | None = None,
) -> dict[str, Any] | None:
    """Bring one FineTuneJob's children and status in line; returns the status written (or None).

    ``memory`` gets the Job and pods this pass read (their watch events that show nothing newer,
    such as the Job's ADDED right after its creation, need no pass of their own) and the generation
    it reconciled.
    """
    from kubernetes import client

    custom = client.CustomObjectsApi(api_client)

    with kube.serialised(PLURAL, namespace, name):
        obj = kube.get_custom_object(custom, PLURAL, namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return None  # owner references garbage-collect the children
        previous = obj.get("status") or {}

        job: FineTuneJob | None = None
        plan_error: str | None = None
        try:
            job = FineTuneJob.model_validate(obj)
            plan = training_plan(job)
            plan_error = plan_problem(job)
        except ValidationError as error:
            # Admission normally rejects these; an object stored before a schema change may not parse.
            plan_error = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())

        worker: dict[str, Any] | None = None
        conflict: str | None = None
        pods: list[dict[str, Any]] = []
        progress: ProgressReport | None = None
        # The planner gates the first launch only: a Job created before (or under the bypass
        # annotation) is never orphaned by a later estimate.
        assessment = (
            planning.plan_for(job, config.planner) if job is not None and plan_error is None else None
        )
        launch = assessment is None or assessment.launch or bool(previous.get("jobName"))
        if job is not None and plan_error is None and launch:
            worker, conflict = ensure_worker(api_client, job, plan, config, previous)
        if worker is not None and _may_have_pods(worker):
            # By the Job's uid: pods of an earlier Job of the same name are not this run's.
            uid = worker["metadata"]["uid"]
            pods = kube.list_pods(api_client, namespace, f"batch.kubernetes.io/controller-uid={uid}")
            # Rank 0 (index 0 of a multi-node group) is the one that serves progress.
            running = [
                p for p in distributed.rank0_first(pods) if (p.get("status") or {}).get("phase") == "Running"
            ]
            if running:
                progress = _fetch_progress(running[0], config.progress_timeout_s)

        queued = bool(job and builders.queued(job))
        workload: dict[str, Any] | None = None
        if queued and worker is not None and (worker.get("spec") or {}).get("suspend"):
            # Why Kueue holds it: the Workload's conditions, read only while the Job waits.
            workload = kube.queue_workload(api_client, namespace, worker["metadata"]["uid"])

        if memory is not None:
            for child in [worker, *pods] if worker is not None else pods:
                memory.children[child["metadata"]["uid"]] = status.child_fingerprint(child)
            if workload is not None:
                memory.children[workload["metadata"]["uid"]] = status.workload_fingerprint(workload)
        seen = status.Observed(
            job=worker,
            pods=pods,
            progress=progress,
            plan_error=plan_error,
            feasibility=(assessment.feasible, assessment.reason, assessment.message) if assessment else None,
            plan=assessment.plan if assessment else None,
            conflict=conflict,
            queued=queued,
            workload=workload,
        )
        desired = status.desired_status(
            obj["metadata"].get("generation"),
            bool(job and job.spec.suspend),
            seen,
            previous,
            datetime.now(UTC),
        )
        if kube.write_status(custom, PLURAL, obj, desired):
            logger.debug("status: %s", json.dumps(desired)[:500])
        if memory is not None:
            memory.generations[obj["metadata"]["uid"]] = spec_key(obj["metadata"])
        return desired
