"""Pure derivation of a FineTuneJob's status from the state of the world.

Level-based: every pass recomputes conditions from the worker Job, its pods and the worker's live
progress report, never from the previous phase. Conditions are the authority; ``phase`` is derived
from them for ``kubectl get``. A condition keeps its ``lastTransitionTime`` while its status holds.

The one thing remembered rather than observed is the end: once Succeeded or Failed is True, it stays
(:func:`finished`). The spec is immutable apart from ``suspend``, so nothing can make a finished run
worth repeating, and the worker Job may be gone (``ttlSecondsAfterFinished``, a user) without the run
being lost. Phases move forward only: Pending, Running (from the first pod start until the Job
completes, retries and the worker's exit included), then Succeeded or Failed; Suspended whenever the
Job is held.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetune.api.schema import ApiModel
from kubetune.api.v1alpha1 import (
    Condition,
    FineTuneJobStatus,
    TrainingPlanStatus,
    TrainingProgress,
    TrainingResult,
)
from kubetune.operator.builders import CONTAINER, PREEMPTED_EXIT_CODE
from kubetune.operator.conditions import merge_conditions
from kubetune.worker.errors import REASON_BY_EXIT_CODE
from kubetune.worker.plan import ProgressReport

CONDITION_TYPES = ("Feasible", "Suspended", "Running", "Succeeded", "Failed")


@dataclass(frozen=True)
class Observed:
    """What a reconcile pass saw. ``plan_error`` is set when the plan could not be rendered;
    ``conflict`` when a child with our name belongs to someone else; ``queued`` when the Job's
    ``spec.suspend`` belongs to its queue (Kueue)."""

    job: dict[str, Any] | None
    pods: list[dict[str, Any]]
    progress: ProgressReport | None = None
    plan_error: str | None = None
    #: The planner's Feasible condition (status, reason, message) and status.plan; None: not planned.
    feasibility: tuple[bool, str, str] | None = None
    plan: dict[str, Any] | None = None
    conflict: str | None = None
    queued: bool = False
    #: Kueue's Workload of a queued Job (its conditions say why it is not admitted yet).
    workload: dict[str, Any] | None = None


def _job_condition(job: dict[str, Any] | None, *kinds: str) -> dict[str, Any] | None:
    """The first True condition of the given types (in the order given)."""
    conditions = ((job or {}).get("status") or {}).get("conditions") or []
    for kind in kinds:
        for condition in conditions:
            if condition.get("type") == kind and condition.get("status") == "True":
                return dict(condition)
    return None


def child_fingerprint(child: dict[str, Any]) -> tuple[Any, ...]:
    """What a status derivation reads from a worker Job or pod: an event that leaves it unchanged
    (the Job controller's own Suspended condition, a pod's scheduling, a kubelet heartbeat) cannot
    change the FineTuneJob's status, so it need not trigger a pass."""
    meta, spec, observed = child.get("metadata") or {}, child.get("spec") or {}, child.get("status") or {}
    conditions = tuple(
        sorted(
            c.get("type", "")
            for c in observed.get("conditions") or []
            if c.get("status") == "True" and c.get("type") in _JOB_ENDINGS
        )
    )
    containers = tuple(
        (s.get("name"), tuple(sorted((s.get("state") or {}).keys())), s.get("restartCount"))
        for s in observed.get("containerStatuses") or []
    )
    # Absent and 0 are the same count (the Job controller fills them in on its first write).
    counts = tuple(observed.get(k) or 0 for k in ("active", "ready", "succeeded", "failed", "terminating"))
    return (
        meta.get("uid"),
        bool(meta.get("deletionTimestamp")),
        spec.get("suspend"),
        observed.get("phase"),
        observed.get("podIP"),
        observed.get("startTime"),
        observed.get("completionTime"),
        conditions,
        containers,
        counts,
    )


_JOB_ENDINGS = ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget")


#: The Workload conditions that say whether, and why not, Kueue admitted it.
_QUEUE_CONDITIONS = ("QuotaReserved", "Admitted")


def workload_fingerprint(workload: dict[str, Any]) -> tuple[Any, ...]:
    """What a pass reads from a Kueue Workload (:func:`queue_reason`): Kueue rewrites its status
    for other reasons too (requeue counts, resource requests), which need no pass."""
    meta = workload.get("metadata") or {}
    conditions = tuple(
        sorted(
            (c.get("type", ""), c.get("status"), c.get("message"))
            for c in (workload.get("status") or {}).get("conditions") or []
            if c.get("type") in _QUEUE_CONDITIONS
        )
    )
    return (meta.get("uid"), bool(meta.get("deletionTimestamp")), conditions)


def job_ended(job: dict[str, Any] | None) -> bool:
    """Whether a Job has finished or is bound to (its terminal conditions, or their forerunners)."""
    return _job_condition(job, *_JOB_ENDINGS) is not None


def _started(pods: list[dict[str, Any]]) -> bool:
    """Whether a worker pod has ever run (pods of a Job with restartPolicy Never stay until it goes)."""
    return any(((p.get("status") or {}).get("phase")) in ("Running", "Succeeded", "Failed") for p in pods)


def _newest_pod(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", default=None)


def _terminated(pod: dict[str, Any] | None) -> dict[str, Any] | None:
    for status in ((pod or {}).get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            state = status.get("state") or {}
            terminated: dict[str, Any] | None = state.get("terminated")
            return terminated
    return None


def failure_of(pods: list[dict[str, Any]]) -> tuple[str, str]:
    """(reason, message) of the newest failed worker container, from its exit code and message."""
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True):
        terminated = _terminated(pod)
        if not terminated or terminated.get("exitCode", 0) == 0:
            continue
        code = int(terminated.get("exitCode", 1))
        message = (terminated.get("message") or "").strip()
        if code == PREEMPTED_EXIT_CODE:
            reason = "Preempted"
        elif code > 128:
            reason = "Killed" if terminated.get("reason") != "OOMKilled" else "OutOfMemory"
        else:
            reason = REASON_BY_EXIT_CODE.get(code, "InternalError")
        # The worker writes "Reason: message"; keep the message part only.
        if message.startswith(f"{reason}: "):
            message = message[len(reason) + 2 :]
        return reason, message.splitlines()[-1][:1024] if message else f"worker exited with code {code}"
    return "WorkerFailed", "the worker Job failed"


def result_of(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The artifact summary a succeeded worker leaves in its termination message (JSON), if any."""
    for pod in pods:
        terminated = _terminated(pod)
        if terminated and terminated.get("exitCode") == 0 and terminated.get("message"):
            try:
                summary = json.loads(terminated["message"])
            except ValueError:
                continue
            if isinstance(summary, dict):
                return summary
    return None


def queue_reason(workload: dict[str, Any] | None) -> str:
    """Why Kueue has not admitted a Workload yet, in Kueue's words: the message of its
    QuotaReserved or Admitted condition while that is False (e.g. "couldn't assign flavors to pod
    set main: insufficient unused quota for cpu in flavor default, 1 more needed")."""
    conditions = {c.get("type"): c for c in ((workload or {}).get("status") or {}).get("conditions") or []}
    for kind in _QUEUE_CONDITIONS:
        condition = conditions.get(kind)
        if condition and condition.get("status") == "False" and condition.get("message"):
            return str(condition["message"])
    return ""


def _condition(kind: str, status: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message}


def desired_conditions(suspended: bool, seen: Observed) -> list[dict[str, Any]]:
    """Every condition type, in a fixed order, without timestamps. ``suspended`` is spec.suspend.

    The Job's own terminal conditions count from their first sign (``SuccessCriteriaMet``,
    ``FailureTarget``), so the end is reported once, not Running, Pending, then Succeeded.
    """
    # Kubernetes >= 1.31 sets SuccessCriteriaMet/FailureTarget before Complete/Failed, and the Job
    # is bound to end that way once they are set.
    complete = _job_condition(seen.job, "Complete", "SuccessCriteriaMet")
    failed = _job_condition(seen.job, "Failed", "FailureTarget")
    pod = _newest_pod(seen.pods)
    pod_phase = ((pod or {}).get("status") or {}).get("phase")
    # The Job says whether it is held (by spec.suspend, or by its queue); before it exists, the spec.
    job_suspended = bool((seen.job.get("spec") or {}).get("suspend")) if seen.job else suspended

    if seen.plan_error:
        feasible = _condition("Feasible", False, "PlanInvalid", seen.plan_error)
    elif seen.feasibility is not None:
        feasible = _condition("Feasible", *seen.feasibility)
    else:
        feasible = _condition("Feasible", True, "PlanRendered", "the training plan was rendered")

    conditions = [feasible]
    if job_suspended and not (complete or failed or seen.plan_error):
        if suspended:
            held = _condition("Suspended", True, "Suspended", "spec.suspend is true")
        elif seen.queued:
            why = queue_reason(seen.workload)
            held = _condition(
                "Suspended",
                True,
                "Queued",
                "the worker Job waits for admission by its queue" + (f": {why}" if why else ""),
            )
        else:
            held = _condition(
                "Suspended", True, "JobSuspended", "the worker Job was suspended by another client"
            )
        conditions.append(held)
    else:
        conditions.append(_condition("Suspended", False, "NotSuspended", ""))

    if failed or seen.plan_error:
        if seen.plan_error:
            reason, message = "PlanInvalid", seen.plan_error
        elif failed.get("reason") == "DeadlineExceeded":  # type: ignore[union-attr]
            reason, message = "DeadlineExceeded", "activeDeadlineSeconds passed before training finished"
        else:
            reason, message = failure_of(seen.pods)
        conditions.append(_condition("Running", False, reason, ""))
        conditions.append(_condition("Succeeded", False, reason, ""))
        conditions.append(_condition("Failed", True, reason, message))
        return conditions
    if complete:
        conditions.append(_condition("Running", False, "Completed", ""))
        conditions.append(_condition("Succeeded", True, "ArtifactPublished", "the artifact was published"))
        conditions.append(_condition("Failed", False, "Succeeded", ""))
        return conditions

    if seen.conflict:
        running = _condition("Running", False, "ChildConflict", seen.conflict)
    elif job_suspended:
        running = _condition("Running", False, conditions[-1]["reason"], "")
    elif pod_phase == "Running":
        phase = seen.progress.phase if seen.progress else "starting"
        running = _condition("Running", True, "Training", f"worker pod {pod['metadata']['name']} is {phase}")  # type: ignore[index]
    elif _started(seen.pods) and pod_phase == "Succeeded":
        running = _condition("Running", True, "Finishing", "the worker exited; the Job is completing")
    elif _started(seen.pods):
        running = _condition("Running", True, "Retrying", "a worker pod ended; the Job starts another")
    elif seen.job is None and feasible["status"] != "True":
        running = _condition(
            "Running", False, "Infeasible", "no worker Job: the job does not fit (see Feasible)"
        )
    elif seen.job is None:
        running = _condition("Running", False, "Creating", "creating the worker Job")
    else:
        running = _condition("Running", False, "Pending", "waiting for the worker pod to start")
    conditions.append(running)
    conditions.append(_condition("Succeeded", False, "InProgress", ""))
    conditions.append(_condition("Failed", False, "InProgress", ""))
    return conditions


def finished(status: dict[str, Any] | None) -> bool:
    """Whether a status records the end of the run (Succeeded or Failed True): then no worker Job is
    ever created again for the object."""
    return any(
        c.get("type") in ("Succeeded", "Failed") and c.get("status") == "True"
        for c in (status or {}).get("conditions") or []
    )


def training(status: dict[str, Any] | None) -> bool:
    """Whether a worker pod is running, so live progress is worth polling."""
    return any(
        c.get("type") == "Running" and c.get("status") == "True" and c.get("reason") == "Training"
        for c in (status or {}).get("conditions") or []
    )


def phase_of(conditions: list[dict[str, Any]]) -> str:
    true = {c["type"] for c in conditions if c["status"] == "True"}
    for kind, phase in (
        ("Failed", "Failed"),
        ("Succeeded", "Succeeded"),
        ("Suspended", "Suspended"),
        ("Running", "Running"),
    ):
        if kind in true:
            return phase
    return "Pending"


def _progress_status(progress: ProgressReport) -> TrainingProgress:
    percent = int(100 * progress.step / progress.total_steps) if progress.total_steps else 0
    return TrainingProgress(
        step=progress.step,
        total_steps=progress.total_steps,
        summary=f"{progress.step}/{progress.total_steps} ({percent}%)",
        epoch=round(progress.epoch, 4),
        loss=_rounded(progress.loss),
        eval_loss=_rounded(progress.eval_loss),
        tokens_per_second=_rounded(progress.tokens_per_second),
        eta_seconds=None if progress.eta_seconds is None else int(progress.eta_seconds),
        updated_at=progress.updated_at or None,
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def _final_progress(last: TrainingProgress | None, final: dict[str, Any]) -> TrainingProgress:
    """The last live report completed with the worker's final numbers (numbers only: the schema has
    no nulls), and a summary that says where the run ended."""
    progress = wire(last) if last is not None else {}
    for key in ("step", "totalSteps", "epoch", "loss", "evalLoss"):
        value = final.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            progress[key] = int(value) if key in ("step", "totalSteps") else round(float(value), 6)
    step, total = progress.get("step"), progress.get("totalSteps")
    if step is not None and total:
        progress["summary"] = f"{step}/{total} ({int(100 * step / total)}%)"
        progress["etaSeconds"] = 0
    return TrainingProgress.model_validate(progress)


def _result_status(summary: dict[str, Any]) -> TrainingResult:
    """The worker's summary, reduced to what the status schema allows: whatever a worker writes, a
    status patch must not be rejected (the schema types metrics as numbers)."""
    result: dict[str, Any] = {}
    for key in ("uri", "sha256", "format"):
        if isinstance(summary.get(key), str):
            result[key] = summary[key]
    if result.get("format") not in (None, "peft", "bottleneck", "full"):
        del result["format"]
    if isinstance(summary.get("sizeBytes"), int) and summary["sizeBytes"] >= 0:
        result["sizeBytes"] = summary["sizeBytes"]
    metrics = summary.get("metrics")
    if isinstance(metrics, dict):
        result["metrics"] = {
            str(k): float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
    return TrainingResult.model_validate(result)


def wire(status: ApiModel) -> dict[str, Any]:
    """A status (or a part of one) as written to the apiserver: camelCase, and only the fields a pass
    set, so a field left out is never written as its default."""
    return status.model_dump(by_alias=True, exclude_none=True, exclude_unset=True, mode="json")


def desired_status(
    generation: int | None, suspended: bool, seen: Observed, previous: dict[str, Any] | None, now: datetime
) -> dict[str, Any]:
    """The complete status to write for an object at ``generation`` with spec.suspend ``suspended``:
    built as the API's :class:`FineTuneJobStatus` (so a field the CRD does not have fails here, not at
    the apiserver), returned in wire form. ``previous`` is the status as read (wire form)."""
    previous = previous or {}
    desired = desired_conditions(suspended, seen)
    ended = finished(previous) and not finished({"conditions": desired})
    if ended:
        # The end is remembered, not re-observed: the Job may be gone (TTL) and must not come back.
        desired = [
            {k: v for k, v in c.items() if k not in ("lastTransitionTime", "observedGeneration")}
            for c in previous.get("conditions") or []
        ]
    conditions = merge_conditions(previous.get("conditions") or [], desired, generation, now)
    fields: dict[str, Any] = {
        "observed_generation": generation,
        "phase": phase_of(conditions),
        "conditions": [Condition.model_validate(c) for c in conditions],
    }
    if seen.job is not None and not ended:
        fields["job_name"] = seen.job["metadata"]["name"]
        job_status = seen.job.get("status") or {}
        fields["start_time"] = job_status.get("startTime")
        fields["completion_time"] = job_status.get("completionTime")
    elif ended:
        fields["job_name"] = previous.get("jobName")
        fields["start_time"] = previous.get("startTime")
        fields["completion_time"] = previous.get("completionTime")
    if seen.plan is not None:
        fields["plan"] = TrainingPlanStatus.model_validate(seen.plan)
    elif previous.get("plan"):
        fields["plan"] = TrainingPlanStatus.model_validate(previous["plan"])
    if seen.progress is not None:
        fields["progress"] = _progress_status(seen.progress)
    elif previous.get("progress"):
        # The last report outlives the worker.
        fields["progress"] = TrainingProgress.model_validate(previous["progress"])
    summary = result_of(seen.pods) if fields["phase"] == "Succeeded" else None
    if summary is not None:
        fields["result"] = _result_status(summary)
        final = summary.get("progress")
        if isinstance(final, dict):
            fields["progress"] = _final_progress(fields.get("progress"), final)
    elif previous.get("result"):
        fields["result"] = TrainingResult.model_validate(previous["result"])
    return wire(FineTuneJobStatus(**fields))
