"""Level-based status derivation, without a cluster.

Aspects:
- each stage of a worker Job maps to conditions and a phase (Pending, Running, Suspended, Succeeded,
  Failed), with every condition type present;
- a failure's reason and message come from the worker's exit code and termination message;
- lastTransitionTime is kept while a condition holds and observedGeneration is stamped;
- live progress becomes status.progress with a kubectl-friendly summary; the result of a succeeded
  worker becomes status.result.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from kubetune.operator import status
from kubetune.operator.status import Observed
from kubetune.worker.plan import ProgressReport

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _job(*conditions: str, reason: str = "") -> dict[str, Any]:
    return {
        "metadata": {"name": "support-lora-train"},
        "spec": {},
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
    assert _status(Observed(job=_job(), pods=[]), suspended=True)["phase"] == "Suspended"
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
