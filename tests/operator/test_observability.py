"""What the operator shows of itself on the local cluster: Events, /metrics and logs.

Aspects:
- condition transitions are posted as Events on the FineTuneJob: a Normal Feasible one (the
  planner's ``ModelConfigUnavailable``: the operator does not read pvc:// models) and a Normal
  ``Suspended`` for a suspended job, Warnings (``DatasetNotFound``) for one whose worker fails;
- ``/metrics`` on ``--metrics-port`` counts reconciles per kind with their latency histogram, the
  objects by phase, and the API requests the passes made (by verb, resource and code);
- the operator's log lines about a pass name the object as ``[namespace/name]``.
"""

from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kubetune.localcluster.testing import ClusterHandle, wait_for
from tests.fixtures import create_finetunejob, finetunejob, phase_is

pytestmark = [pytest.mark.cluster]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def metrics_port() -> int:
    return _free_port()


@pytest.fixture
def operator_args(metrics_port: int) -> list[str]:
    return ["--metrics-port", str(metrics_port)]


def _events(cluster: ClusterHandle, namespace: str, name: str) -> list[tuple[str, str, str]]:
    from kubernetes import client

    items = (
        client.CoreV1Api(cluster.api_client())
        .list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
        .items
    )
    return [(e.type, e.reason, e.message) for e in items]


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if not match or line.startswith("#"):
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum over the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def test_events_metrics_and_logs(
    cluster: ClusterHandle, namespace: str, operator: Path, metrics_port: int
) -> None:
    create_finetunejob(cluster, namespace, finetunejob("held", suspend=True))
    # Admitted, and its worker fails at once (the dataset is checked before torch is imported).
    no_data: dict[str, Any] = finetunejob("no-data")
    no_data["spec"].update(
        model={"uri": "file:///nonexistent-kubetune/model"},
        dataset={"uri": "file:///nonexistent-kubetune/train.jsonl"},
        output={"uri": "file:///nonexistent-kubetune/out"},
    )
    create_finetunejob(cluster, namespace, no_data)
    wait_for(lambda: phase_is(cluster, namespace, "held", "Suspended"), 60, description="held Suspended")
    wait_for(lambda: phase_is(cluster, namespace, "no-data", "Failed"), 180, description="no-data Failed")

    held = wait_for(
        lambda: (e := _events(cluster, namespace, "held")) and len(e) >= 2 and e,
        60,
        description=lambda: f"Events of held: {_events(cluster, namespace, 'held')}",
    )
    feasible = [e for e in held if e[1] == "ModelConfigUnavailable"]
    assert feasible and feasible[0][0] == "Normal" and feasible[0][2].startswith("Feasible is True: "), held
    assert ("Normal", "Suspended", "Suspended is True: spec.suspend is true") in held
    failed = wait_for(
        lambda: [e for e in _events(cluster, namespace, "no-data") if e[0] == "Warning"],
        60,
        description=lambda: f"Events of no-data: {_events(cluster, namespace, 'no-data')}",
    )
    assert {reason for _, reason, _ in failed} == {"DatasetNotFound"}
    assert any("train.jsonl: no such file" in message for _, _, message in failed), failed

    samples = _scrape(metrics_port)
    assert _value(samples, "kubetune_reconciles_total", kind="FineTuneJob") >= 2
    assert _value(samples, "kubetune_reconcile_errors_total", kind="FineTuneJob") == 0
    assert _value(samples, "kubetune_reconcile_duration_seconds_count", kind="FineTuneJob") >= 2
    assert _value(samples, "kubetune_objects", kind="FineTuneJob", phase="Suspended") == 1
    assert _value(samples, "kubetune_objects", kind="FineTuneJob", phase="Failed") == 1
    # Both passes read their object and wrote its status; the suspended one applied its Job.
    assert (
        _value(samples, "kubetune_api_requests_total", verb="GET", resource="finetunejobs", code="200") >= 2
    )
    assert _value(samples, "kubetune_api_requests_total", verb="PATCH", resource="finetunejobs/status") >= 2
    assert _value(samples, "kubetune_api_requests_total", verb="PATCH", resource="jobs") >= 1

    log = operator.read_text()
    assert re.search(rf"kubetune\.operator: \[{namespace}/held\] created Job held-train", log), log[-3000:]
