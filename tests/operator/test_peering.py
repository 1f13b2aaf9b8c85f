"""Two operator replicas peered through a KopfPeering, on the local cluster.

Aspects:
- the chart's peering CRDs are accepted by a real apiserver, and both replicas keep a record in the
  peering object;
- only the replica of the higher priority works: it alone creates the Job of a new FineTuneJob,
  the other one is paused (it may have worked for a moment if it started first);
- SIGKILLing it (no goodbye, so its record stays until it expires) hands over: the other replica
  resumes and creates the Job of a FineTuneJob made after the kill, and no second Job appears for
  the first one. The seconds from the kill to that Job are printed (docs/operator.md records them);
  no limit is asserted on them.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.localcluster.testing import ClusterHandle, wait_for
from tests.fixtures import create_finetunejob, finetunejob

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PEERING_CRDS = Path(__file__).resolve().parents[2] / "charts" / "kubetune" / "crds" / "kopf.dev_peerings.yml"
PEERING = "kubetune"


class Replica:
    def __init__(self, cluster: ClusterHandle, namespace: str, log: Path, priority: int) -> None:
        self.log = log
        argv = [sys.executable, "-m", "kubetune", "operator", "--namespace", namespace, "--liveness", ""]
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [*argv, "-v", "--peering", PEERING, "--priority", str(priority)],
                env=cluster.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def replicas(cluster: ClusterHandle, namespace: str, crds: None, tmp_path: Path) -> Iterator[list[Replica]]:
    cluster.kubectl("apply", "-f", str(PEERING_CRDS))
    cluster.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "--timeout=60s")
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}}
    _objects(cluster).create_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", peering)
    started = [
        Replica(cluster, namespace, tmp_path / "high.log", priority=200),
        Replica(cluster, namespace, tmp_path / "low.log", priority=100),
    ]
    try:
        yield started
    finally:
        for replica in started:
            replica.stop()


def _objects(cluster: ClusterHandle) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(cluster.api_client())


def _job(cluster: ClusterHandle, namespace: str, name: str) -> Any:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    try:
        return client.BatchV1Api(cluster.api_client()).read_namespaced_job(name, namespace)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def _active(replica: Replica) -> bool:
    """Whether kopf's last word on peering in the replica's log is that it resumed (it starts paused)."""
    text = replica.text()
    return text.rfind("Resuming operations") > text.rfind("Pausing operations")


def _created(replica: Replica, job: str) -> bool:
    return re.search(rf"created Job {re.escape(job)}\b", replica.text()) is not None


def test_the_higher_priority_replica_works_and_a_kill_hands_over(
    cluster: ClusterHandle, namespace: str, replicas: list[Replica]
) -> None:
    high, low = replicas

    def records() -> dict[str, Any]:
        obj = _objects(cluster).get_namespaced_custom_object(
            "kopf.dev", "v1", namespace, "kopfpeerings", PEERING
        )
        return dict(obj.get("status") or {})

    wait_for(lambda: len(records()) == 2, 90, description=lambda: f"two peering records: {records()}")
    # A peered replica starts paused. One that sees no higher record resumes, so the lower one may
    # work for a moment when it starts first, until the higher one's record shows up.
    wait_for(
        lambda: _active(high) and not _active(low),
        60,
        description=lambda: f"only the higher replica active: {records()}",
    )

    create_finetunejob(cluster, namespace, finetunejob("before", suspend=True))
    wait_for(lambda: _job(cluster, namespace, "before-train"), 60, description="the first Job")
    wait_for(lambda: _created(high, "before-train"), 10, description="the higher replica's log line")
    assert not _created(low, "before-train") and not _active(low)

    high.proc.send_signal(signal.SIGKILL)
    high.proc.wait()
    killed = time.monotonic()
    create_finetunejob(cluster, namespace, finetunejob("after", suspend=True))
    wait_for(
        lambda: _job(cluster, namespace, "after-train"),
        120,
        interval=0.2,
        description=lambda: f"the remaining replica to take over; its log: ...{low.text()[-2000:]}",
    )
    handover_s = time.monotonic() - killed
    print(f"hand-over: {handover_s:.1f} s from SIGKILL to the next FineTuneJob's Job")

    assert _created(low, "after-train") and _active(low)
    assert not _created(low, "before-train"), "the first FineTuneJob's Job was created twice"
    assert not _tracebacks(low.text()), _tracebacks(low.text())


#: kopf's own watch-cancel callback (``kopf/_cogs/clients/api.py``, ``request_cancel_callback``) can fail
#: an assertion when peering pauses a stream; asyncio logs it, kopf carries on, and it is not ours.
_KOPF_CANCEL_NOISE = "Exception in callback stream.<locals>.request_cancel_callback"


def _tracebacks(text: str) -> list[str]:
    """The log records (a timestamped line and what follows it) that hold a traceback, but kopf's noise."""
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text)
    return [r for r in records if "Traceback" in r and _KOPF_CANCEL_NOISE not in r]
