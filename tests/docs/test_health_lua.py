"""The Argo CD health checks in docs/health/*.lua, run with Lua (lupa) against status objects.

Aspects:
- the FineTuneJob samples are written by the operator's own status builder
  (``desired_status`` over observed Jobs and pods), so a renamed condition breaks this test: a
  running run is Progressing with its progress, a suspended or queued one Suspended, a failed one
  Degraded with the worker's reason and message, an infeasible plan Degraded, a published one
  Healthy with its URI;
- the AdapterDeployment samples come from the serving controller's ``conditions_for``: ready is
  Healthy, a failed adapter Degraded even while serving, rolling out Progressing, zero replicas
  Suspended;
- a status from an older generation, or none, is Progressing for both kinds.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1 import AdapterDeployment
from kubetune.operator import serving
from kubetune.operator.status import Observed, desired_status
from tests.api.cases import adapterdeployment

lupa = pytest.importorskip("lupa")

HEALTH = Path(__file__).resolve().parents[2] / "docs" / "health"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def health(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    """(status, message) as Argo CD would get them: ``obj`` a global table, the script's return."""
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = runtime.table_from(json.loads(json.dumps(obj)), recursive=True)
    result = runtime.execute((HEALTH / f"{kind}.lua").read_text(encoding="utf-8"))
    return str(result["status"]), str(result["message"])


def _pod(phase: str, terminated: dict[str, Any] | None = None) -> dict[str, Any]:
    state = {"terminated": terminated} if terminated else {"running": {}}
    return {
        "metadata": {"name": "ftj-train-abc", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {"phase": phase, "containerStatuses": [{"name": "worker", "state": state}]},
    }


def _job(*conditions: str, suspend: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"name": "ftj-train"},
        "spec": {"suspend": suspend},
        "status": {"conditions": [{"type": c, "status": "True"} for c in conditions]},
    }


def _ftj(seen: Observed, suspended: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"name": "ftj", "generation": 1},
        "spec": {"suspend": suspended},
        "status": desired_status(1, suspended, seen, None, NOW),
    }


SUMMARY = {"uri": "pvc://data/out/ftj", "sha256": "ab" * 32, "sizeBytes": 10, "format": "peft", "metrics": {}}


@pytest.mark.parametrize(
    ("seen", "suspended", "expected", "words"),
    [
        (Observed(job=_job(), pods=[_pod("Running")]), False, "Progressing", "Training"),
        (Observed(job=_job(), pods=[]), False, "Progressing", "Pending"),
        (Observed(job=None, pods=[]), True, "Suspended", "spec.suspend is true"),
        (Observed(job=_job(suspend=True), pods=[], queued=True), False, "Suspended", "Queued"),
        (
            Observed(
                job=_job("Failed"),
                pods=[_pod("Failed", {"exitCode": 12, "message": "DatasetInvalid: train.jsonl line 3: bad"})],
            ),
            False,
            "Degraded",
            "DatasetInvalid: train.jsonl line 3: bad",
        ),
        (Observed(job=None, pods=[], plan_error="spec.method: bad"), False, "Degraded", "PlanInvalid"),
        (
            Observed(
                job=_job("Complete"),
                pods=[_pod("Succeeded", {"exitCode": 0, "message": json.dumps(SUMMARY)})],
            ),
            False,
            "Healthy",
            "ArtifactPublished: the artifact was published (pvc://data/out/ftj)",
        ),
    ],
)
def test_finetunejob(seen: Observed, suspended: bool, expected: str, words: str) -> None:
    status, message = health("finetunejob", _ftj(seen, suspended))
    assert (status, words in message) == (expected, True), message


def _adep(replicas: int = 1) -> AdapterDeployment:
    manifest = adapterdeployment()
    manifest["metadata"].update(namespace="team-a", uid="u1", generation=2)
    manifest["spec"]["replicas"] = replicas
    return AdapterDeployment.model_validate(manifest)


def _adep_object(adep: AdapterDeployment, conditions: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "metadata": {"name": adep.metadata.name, "generation": 2},
        "spec": {"replicas": adep.spec.replicas},
        "status": {"observedGeneration": 2, "conditions": conditions},
    }


def _adapter(state: str, reason: str = "") -> dict[str, Any]:
    return {"name": "support-v1", "state": state, "reason": reason, "message": "no kubetune.json"}


@pytest.mark.parametrize(
    ("ready", "adapters", "replicas", "expected", "words"),
    [
        (1, [_adapter("Loaded")], 1, "Healthy", "Serving"),
        (1, [_adapter("Loaded"), _adapter("Failed", "MissingFiles")], 1, "Degraded", "MissingFiles"),
        (0, [_adapter("Pending")], 1, "Progressing", "NotReady"),
        (0, [], 0, "Suspended", "zero replicas"),
    ],
)
def test_adapterdeployment(
    ready: int, adapters: list[dict[str, Any]], replicas: int, expected: str, words: str
) -> None:
    adep = _adep(replicas)
    conditions = serving.conditions_for(adep, ready, adapters)
    status, message = health("adapterdeployment", _adep_object(adep, conditions))
    assert (status, words in message) == (expected, True), message


@pytest.mark.parametrize("kind", ["finetunejob", "adapterdeployment"])
def test_a_stale_or_missing_status_is_progressing(kind: str) -> None:
    stale = {
        "metadata": {"name": "x", "generation": 3},
        "spec": {"replicas": 1},
        "status": {"observedGeneration": 2, "conditions": [{"type": "Failed", "status": "True"}]},
    }
    assert health(kind, stale) == ("Progressing", "Waiting for the operator to observe generation 3")
    assert health(kind, {"metadata": {"name": "x", "generation": 1}, "spec": {}})[0] == "Progressing"
