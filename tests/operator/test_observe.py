"""The operator's observability helpers, without a cluster.

Aspects:
- condition transitions become Events: one per condition whose status or reason changed, Warning
  for the abnormal states (Failed or Degraded True, Feasible False, a ChildConflict), none for the
  False conditions an object starts with, none when nothing changed;
- API request URLs are reduced to their resource (and subresource) for the request counter;
- the objects-by-phase gauge counts each object once, in its last phase, and forgets deleted ones;
- a pass that raises counts as a reconcile and as an error;
- log records made inside a pass carry the object; text lines show it as a ``[namespace/name]`` prefix.
"""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from kubetune.operator import events, logs, metrics


def _c(kind: str, status: str, reason: str, message: str = "") -> dict[str, str]:
    return {"type": kind, "status": status, "reason": reason, "message": message}


def test_first_pass_reports_only_true_or_abnormal_conditions() -> None:
    current = [
        _c("Feasible", "True", "PlanRendered", "the training plan was rendered"),
        _c("Suspended", "False", "NotSuspended"),
        _c("Running", "False", "Creating", "creating the worker Job"),
        _c("Succeeded", "False", "InProgress"),
    ]
    assert events.transitions([], current) == [
        events.Transition("Normal", "PlanRendered", "Feasible is True: the training plan was rendered")
    ]


def test_an_invalid_plan_is_a_warning_from_the_first_pass() -> None:
    current = [
        _c("Feasible", "False", "PlanInvalid", "lora.alpha: must be an integer"),
        _c("Failed", "True", "PlanInvalid"),
    ]
    got = events.transitions([], current)
    assert [(e.type, e.reason) for e in got] == [("Warning", "PlanInvalid"), ("Warning", "PlanInvalid")]
    assert got[0].message == "Feasible is False: lora.alpha: must be an integer"


def test_changes_of_status_or_reason_are_transitions_and_nothing_else_is() -> None:
    before = [
        _c("Running", "False", "Pending"),
        _c("Succeeded", "False", "InProgress"),
        _c("Failed", "False", "InProgress"),
    ]
    after = [
        _c("Running", "False", "Completed"),
        _c("Succeeded", "True", "ArtifactPublished", "the artifact was published"),
        _c("Failed", "False", "InProgress", "a new message alone is no transition"),
    ]
    got = events.transitions(before, after)
    assert [(e.type, e.reason) for e in got] == [("Normal", "Completed"), ("Normal", "ArtifactPublished")]
    assert events.transitions(after, after) == []


def test_a_child_conflict_and_a_degraded_deployment_are_warnings() -> None:
    got = events.transitions(
        [_c("Running", "False", "Pending"), _c("Degraded", "False", "AllLoaded")],
        [
            _c("Running", "False", "ChildConflict", "Job x belongs to uid y"),
            _c("Degraded", "True", "AdapterFailed"),
        ],
    )
    assert [(e.type, e.reason) for e in got] == [("Warning", "ChildConflict"), ("Warning", "AdapterFailed")]


@pytest.mark.parametrize(
    ("url", "resource"),
    [
        ("https://10.0.0.1:6443/api/v1/namespaces/ns/pods?labelSelector=a%3Db", "pods"),
        ("https://10.0.0.1:6443/apis/batch/v1/namespaces/ns/jobs/x-train", "jobs"),
        ("https://h/apis/kubetune.dev/v1alpha1/namespaces/ns/finetunejobs/x/status", "finetunejobs/status"),
        ("https://h/api/v1/namespaces/ns", "namespaces"),
        ("https://h/apis/kubetune.dev/v1alpha1/finetunejobs", "finetunejobs"),
    ],
)
def test_resource_of(url: str, resource: str) -> None:
    assert metrics.resource_of(url) == resource


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_objects_by_phase_count_each_object_once() -> None:
    kind = "TestKind"
    metrics.record_phase(kind, "ns", "a", "Pending")
    metrics.record_phase(kind, "ns", "a", "Running")
    metrics.record_phase(kind, "ns", "b", "Running")
    metrics.record_phase(kind, "ns", "c", "Failed")
    metrics.record_phase(kind, "ns", "c", None)
    assert _sample("kubetune_objects", {"kind": kind, "phase": "Running"}) == 2
    assert _sample("kubetune_objects", {"kind": kind, "phase": "Pending"}) == 0
    assert _sample("kubetune_objects", {"kind": kind, "phase": "Failed"}) == 0


def test_a_pass_that_raises_counts_as_an_error() -> None:
    kind = "ErrKind"
    with metrics.reconcile_pass(kind):
        pass
    with pytest.raises(RuntimeError), metrics.reconcile_pass(kind):
        raise RuntimeError("apiserver went away")
    assert _sample("kubetune_reconciles_total", {"kind": kind}) == 2
    assert _sample("kubetune_reconcile_errors_total", {"kind": kind}) == 1
    assert _sample("kubetune_reconcile_duration_seconds_count", {"kind": kind}) == 2


def test_records_inside_a_pass_name_the_object() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(logs.ObjectReferenceFilter())
    log = logging.getLogger("kubetune.operator.test")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with logs.about("FineTuneJob", "team-a", "support-lora"):
            log.info("created Job %s", "support-lora-train")
        log.info("outside any pass")
    finally:
        log.removeHandler(handler)
    inside, outside = records
    assert inside.k8s_ref == {"kind": "FineTuneJob", "namespace": "team-a", "name": "support-lora"}  # type: ignore[attr-defined]
    assert not hasattr(outside, "k8s_ref")
    line = logs.PrefixingFormatter(logs.TEXT_FORMAT).format(inside)
    assert line.endswith("kubetune.operator.test: [team-a/support-lora] created Job support-lora-train")
