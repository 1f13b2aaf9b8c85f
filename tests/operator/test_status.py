"""Level-based status derivation, without a cluster.

Aspects:
- each stage of a worker Job maps to conditions and a phase (Pending, Running, Suspended, Succeeded,
  Failed), with every condition type present;
- a failure's reason and message come from the worker's exit code and termination message;
- lastTransitionTime is kept while a condition holds and observedGeneration is stamped;
- live progress becomes status.progress with a kubectl-friendly summary; the result of a succeeded
  worker becomes status.result;
- phases only move forward through a whole run (Job created, pod pending, running, retried, worker
  exited, SuccessCriteriaMet, Complete, Job deleted by its TTL): no Pending between Running and
  Succeeded, and the end (with its result) outlives the Job;
- whether the run is held follows the Job's spec.suspend (Kueue's, for a queued Job), and a child
  owned by someone else is reported as ChildConflict;
- a child's fingerprint changes exactly when something the status reads from it changes;
- the status is built as the API's typed FineTuneJobStatus: a field the CRD lacks fails in the builder.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from kubetune.operator import status
from kubetune.operator.status import Observed
from kubetune.worker.plan import ProgressReport

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _job(*conditions: str, reason: str = "", suspend: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"name": "support-lora-train"},
        "spec": {"suspend": suspend},
        "status": {
            "startTime": "2026-11-23T11:00:00Z",
            "conditions": [{"type": c, "status": "True", "reason": reason} for c in conditions],
        },
    }


def _pod(
    phase: str, exit_code: int | None = None, message: str = "", created: str = "2026-11-23T11:00:00Z"
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "worker", "state": {}}
    if exit_code is not None:
        container["state"] = {"terminated": {"exitCode": exit_code, "message": message}}
    return {
        "metadata": {"name": f"pod-{created[-3:-1]}", "creationTimestamp": created},
        "status": {"phase": phase, "podIP": "10.0.0.5", "containerStatuses": [container]},
    }


def _status(
    seen: Observed, suspended: bool = False, previous: dict[str, Any] | None = None
) -> dict[str, Any]:
    return status.desired_status(3, suspended, seen, previous, NOW)


def _conditions(result: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in result["conditions"]}


def test_stages_map_to_phases() -> None:
    assert _status(Observed(job=None, pods=[]))["phase"] == "Pending"
    assert _status(Observed(job=_job(), pods=[_pod("Pending")]))["phase"] == "Pending"
    running = _status(Observed(job=_job(), pods=[_pod("Running")]))
    assert running["phase"] == "Running" and _conditions(running)["Running"] == ("True", "Training")
    assert _status(Observed(job=_job(suspend=True), pods=[]), suspended=True)["phase"] == "Suspended"
    assert _status(Observed(job=None, pods=[]), suspended=True)["phase"] == "Suspended"
    done = _status(Observed(job=_job("Complete"), pods=[_pod("Succeeded", 0)]))
    assert done["phase"] == "Succeeded" and _conditions(done)["Succeeded"] == ("True", "ArtifactPublished")
    for result in (running, done):
        assert [c["type"] for c in result["conditions"]] == list(status.CONDITION_TYPES)
        assert all(c["observedGeneration"] == 3 for c in result["conditions"])


def test_failure_reason_comes_from_the_worker() -> None:
    pods = [
        _pod("Failed", 19, "SourceUnavailable: timeout", created="2026-11-23T11:00:01Z"),
        _pod(
            "Failed",
            12,
            'DatasetInvalid: train.jsonl line 17: missing "completion"',
            created="2026-11-23T11:00:09Z",
        ),
    ]
    failed = _status(Observed(job=_job("Failed", reason="PodFailurePolicy"), pods=pods))
    assert failed["phase"] == "Failed"
    (condition,) = [c for c in failed["conditions"] if c["type"] == "Failed"]
    assert condition["reason"] == "DatasetInvalid"
    assert condition["message"] == 'train.jsonl line 17: missing "completion"'


def test_deadline_and_plan_errors() -> None:
    late = _status(Observed(job=_job("Failed", reason="DeadlineExceeded"), pods=[]))
    assert _conditions(late)["Failed"] == ("True", "DeadlineExceeded")
    bad = _status(Observed(job=None, pods=[], plan_error="multi-node training is not supported"))
    assert bad["phase"] == "Failed" and _conditions(bad)["Feasible"] == ("False", "PlanInvalid")


def test_transition_times_hold_while_status_holds() -> None:
    first = status.desired_status(1, False, Observed(job=_job(), pods=[_pod("Running")]), None, NOW)
    later = status.desired_status(
        1, False, Observed(job=_job(), pods=[_pod("Running")]), first, NOW + timedelta(minutes=5)
    )
    assert first["conditions"] == later["conditions"]
    done = status.desired_status(
        1, False, Observed(job=_job("Complete"), pods=[]), later, NOW + timedelta(minutes=9)
    )
    times = {c["type"]: c["lastTransitionTime"] for c in done["conditions"]}
    assert times["Feasible"] == "2026-11-23T12:00:00Z"
    assert times["Running"] == times["Succeeded"] == "2026-11-23T12:09:00Z"


def test_progress_and_result() -> None:
    report = ProgressReport(
        phase="training", step=120, total_steps=1000, epoch=0.36, loss=1.234567891, tokens_per_second=5000.5
    )
    running = _status(Observed(job=_job(), pods=[_pod("Running")], progress=report))
    assert running["progress"]["summary"] == "120/1000 (12%)"
    assert running["progress"]["loss"] == 1.234568

    summary = {
        "uri": "pvc://adapters/x",
        "sha256": "ab" * 32,
        "sizeBytes": 123,
        "format": "peft",
        "metrics": {"eval_loss": 0.5},
    }
    done = _status(
        Observed(job=_job("Complete"), pods=[_pod("Succeeded", 0, json.dumps(summary))]), previous=running
    )
    assert done["result"] == summary
    assert done["progress"]["summary"] == "120/1000 (12%)"  # the last report outlives the worker

    # The worker's final numbers complete the last live report; nulls never reach the schema.
    final = {
        **summary,
        "progress": {"step": 1000, "totalSteps": 1000, "epoch": 3.0, "loss": 0.5, "evalLoss": None},
    }
    finished = _status(
        Observed(job=_job("Complete"), pods=[_pod("Succeeded", 0, json.dumps(final))]), previous=running
    )
    assert finished["progress"]["summary"] == "1000/1000 (100%)" and finished["progress"]["loss"] == 0.5
    assert finished["progress"]["etaSeconds"] == 0 and None not in finished["progress"].values()

    # Whatever the worker writes, status only gets what its schema allows.
    noisy = {
        **summary,
        "format": "weird",
        "sizeBytes": "12",
        "metrics": {"loss": 1, "precision": "fp32", "nan": float("nan"), "ok": True},
    }
    cleaned = _status(Observed(job=_job("Complete"), pods=[_pod("Succeeded", 0, json.dumps(noisy))]))[
        "result"
    ]
    assert cleaned == {"uri": summary["uri"], "sha256": summary["sha256"], "metrics": {"loss": 1.0}}


def _phases(observations: list[Observed], suspended: bool = False) -> list[str]:
    previous: dict[str, Any] | None = None
    phases = []
    for index, seen in enumerate(observations):
        previous = status.desired_status(1, suspended, seen, previous, NOW + timedelta(seconds=index))
        phases.append(previous["phase"])
    return phases


def test_phases_never_go_backwards() -> None:
    summary = {"uri": "pvc://adapters/x", "sha256": "ab" * 32, "format": "peft"}
    preempted = _pod("Failed", 143, created="2026-11-23T11:00:01Z")
    retry = _pod("Pending", created="2026-11-23T11:00:05Z")
    exited = _pod("Succeeded", 0, json.dumps(summary), created="2026-11-23T11:00:05Z")
    run = [
        Observed(job=None, pods=[]),
        Observed(job=_job(), pods=[]),
        Observed(job=_job(), pods=[_pod("Pending")]),
        Observed(job=_job(), pods=[_pod("Running")]),
        Observed(job=_job(), pods=[preempted, retry]),  # a retry keeps the run Running
        Observed(job=_job(), pods=[preempted, exited]),  # exited; the Job has not noticed yet
        Observed(job=_job("SuccessCriteriaMet"), pods=[preempted, exited]),
        Observed(job=_job("SuccessCriteriaMet", "Complete"), pods=[preempted, exited]),
        Observed(job=None, pods=[]),  # ttlSecondsAfterFinished deleted the Job and its pods
    ]
    phases = _phases(run)
    assert phases == ["Pending"] * 3 + ["Running"] * 3 + ["Succeeded"] * 3, phases

    previous: dict[str, Any] | None = None
    for seen in run:
        previous = status.desired_status(1, False, seen, previous, NOW)
    assert previous is not None and status.finished(previous)
    assert previous["result"]["uri"] == summary["uri"] and previous["jobName"] == "support-lora-train"
    # A later generation (spec.suspend flipped) keeps the end, stamped with the new generation.
    again = status.desired_status(2, True, Observed(job=None, pods=[]), previous, NOW)
    assert again["phase"] == "Succeeded" and _conditions(again)["Suspended"][0] == "False"
    assert {c["observedGeneration"] for c in again["conditions"]} == {2}


def test_failure_target_is_the_end() -> None:
    pods = [_pod("Failed", 12, "DatasetInvalid: bad line")]
    phases = _phases(
        [Observed(job=_job(), pods=[_pod("Running")]), Observed(job=_job("FailureTarget"), pods=pods)]
    )
    assert phases == ["Running", "Failed"]


def test_suspension_follows_the_job() -> None:
    # Kueue holds a queued Job although spec.suspend is false...
    queued = _status(Observed(job=_job(suspend=True), pods=[], queued=True))
    assert queued["phase"] == "Suspended" and _conditions(queued)["Suspended"] == ("True", "Queued")
    assert _conditions(queued)["Running"] == ("False", "Queued")
    # ... and admits it although spec.suspend is true: the Job's state is what runs.
    admitted = _status(Observed(job=_job(), pods=[_pod("Running")], queued=True), suspended=True)
    assert admitted["phase"] == "Running"
    other = _status(Observed(job=_job(suspend=True), pods=[]))
    assert _conditions(other)["Suspended"] == ("True", "JobSuspended")


def test_queued_condition_carries_kueues_reason() -> None:
    pending = "couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor f"

    def workload(*conditions: tuple[str, str, str], uid: str = "w1") -> dict[str, Any]:
        return {
            "metadata": {"uid": uid},
            "status": {"conditions": [{"type": t, "status": s, "message": m} for t, s, m in conditions]},
        }

    waiting = workload(("QuotaReserved", "False", pending), ("Requeued", "True", "ignored"))
    held = _status(Observed(job=_job(suspend=True), pods=[], queued=True, workload=waiting))
    message = next(c["message"] for c in held["conditions"] if c["type"] == "Suspended")
    assert message == f"the worker Job waits for admission by its queue: {pending}"
    # No Workload yet (Kueue creates it after the Job), or one already admitted: the plain message.
    for seen in (None, workload(("QuotaReserved", "True", "reserved"), ("Admitted", "True", "admitted"))):
        plain = _status(Observed(job=_job(suspend=True), pods=[], queued=True, workload=seen))
        assert next(c["message"] for c in plain["conditions"] if c["type"] == "Suspended") == (
            "the worker Job waits for admission by its queue"
        )
    # Only what the condition reads wakes a pass: Kueue's other status writes do not.
    requeued = workload(("QuotaReserved", "False", pending), ("Requeued", "True", "again"))
    assert status.workload_fingerprint(waiting) == status.workload_fingerprint(requeued)
    assert status.workload_fingerprint(waiting) != status.workload_fingerprint(
        workload(("QuotaReserved", "False", "x"))
    )


def test_child_conflict() -> None:
    message = "Job x-train already exists and has no controller"
    blocked = _status(Observed(job=None, pods=[], conflict=message))
    assert blocked["phase"] == "Pending"
    running = next(c for c in blocked["conditions"] if c["type"] == "Running")
    assert (running["reason"], running["message"]) == ("ChildConflict", message)


def test_training_means_a_running_worker() -> None:
    assert status.training(_status(Observed(job=_job(), pods=[_pod("Running")])))
    assert not status.training(_status(Observed(job=_job(), pods=[_pod("Pending")])))
    assert not status.training(None) and not status.finished(None)


def test_child_fingerprint_ignores_what_status_does_not_read() -> None:
    job = {**_job(suspend=True), "metadata": {"name": "j", "uid": "u"}}
    held = {**job, "status": {**job["status"], "conditions": [{"type": "Suspended", "status": "True"}]}}
    assert status.child_fingerprint(job) == status.child_fingerprint(held)
    assert status.child_fingerprint(job) != status.child_fingerprint(_job("SuccessCriteriaMet", suspend=True))
    assert status.child_fingerprint(_pod("Pending")) != status.child_fingerprint(_pod("Running"))
    assert status.child_fingerprint(_pod("Running")) != status.child_fingerprint(_pod("Running", exit_code=0))


def test_status_is_built_as_the_api_model() -> None:
    """The status goes through the API's FineTuneJobStatus: what the model reads back is what was
    built, and a field the CRD does not have fails here rather than at the apiserver."""
    import pytest
    from pydantic import ValidationError

    from kubetune.api.v1alpha1 import FineTuneJobStatus

    report = ProgressReport(phase="training", step=3, total_steps=6, epoch=0.5, loss=1.0)
    built = _status(Observed(job=_job(), pods=[_pod("Running")], progress=report))
    assert (
        FineTuneJobStatus.model_validate(built).model_dump(
            by_alias=True, exclude_none=True, exclude_unset=True, mode="json"
        )
        == built
    )
    with pytest.raises(ValidationError, match="bogus"):
        _status(Observed(job=None, pods=[], plan={"bogus": 1}))
