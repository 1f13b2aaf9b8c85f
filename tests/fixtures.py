"""Fixtures the operator and end-to-end suites share (registered in ``tests/conftest.py``).

* ``crds`` (module): the CRDs applied to the cluster.
* ``operator``: ``kubetune operator`` as a local process watching the test namespace, with debug
  logs (every API request the reconcilers make is a ``urllib3`` line); yields the log file and
  asserts it has no traceback. ``operator_args`` adds arguments (the e2e suite names the worker
  image).
* ``claim_dir``: a bound PersistentVolumeClaim "data" and its directory on this host.

Plus helpers to make, create and read FineTuneJobs.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import crdgen, v1alpha1
from kubetune.localcluster.testing import ClusterHandle, wait_for


@pytest.fixture(scope="module")
def crds(cluster: ClusterHandle) -> None:
    crdgen.apply(cluster.api_client())


@pytest.fixture
def operator_args() -> list[str]:
    return []


@pytest.fixture
def operator(
    cluster: ClusterHandle, namespace: str, crds: None, operator_args: list[str], tmp_path: Path
) -> Iterator[Path]:
    log = tmp_path / "operator.log"
    argv = [sys.executable, "-m", "kubetune", "operator", "--namespace", namespace, "--liveness", "", "-v"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*argv, *operator_args], env=cluster.env(), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]


@pytest.fixture
def claim_dir(cluster: ClusterHandle, namespace: str) -> Path:
    from kubernetes import client

    if not cluster.is_local:
        # kind binds claims only when a pod uses them, and their paths live in the node container.
        pytest.skip("the test writes the claim's data from the host: embedded local cluster only")
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )

    def bound_volume() -> str | None:
        pvc = core.read_namespaced_persistent_volume_claim("data", namespace)
        return pvc.spec.volume_name if pvc.status.phase == "Bound" else None  # type: ignore[union-attr]

    volume = wait_for(bound_volume, 60, description="claim data to bind")
    path = Path(core.read_persistent_volume(volume).spec.host_path.path)  # type: ignore[union-attr]
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- FineTuneJob helpers -------------------------------------------------------------------------


def finetunejob(name: str, dataset: str = "train.jsonl", **spec: Any) -> dict[str, Any]:
    """A small LoRA FineTuneJob on ``pvc://data/model`` and ``pvc://data/<dataset>``; ``spec``
    entries replace the defaults."""
    return {
        "apiVersion": v1alpha1.API_VERSION,
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "pvc://data/model"},
            "dataset": {"uri": f"pvc://data/{dataset}", "evalFraction": 0.1},
            "method": {"type": "lora", "lora": {"rank": 4, "alpha": 8}},
            "training": {
                "maxSteps": 6,
                "batchSize": 4,
                "maxSeqLength": 64,
                "learningRate": 0.01,
                "checkpointEverySteps": 3,
            },
            "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "2Gi"},
            "output": {"uri": f"pvc://data/out/{name}"},
            "backoffLimit": 2,
            **spec,
        },
    }


def _finetunejobs(cluster: ClusterHandle) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(cluster.api_client())


def get_finetunejob(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = _finetunejobs(cluster).get_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "finetunejobs", name
    )
    return result


def create_finetunejob(cluster: ClusterHandle, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = _finetunejobs(cluster).create_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "finetunejobs", body
    )
    return created


def phase_is(cluster: ClusterHandle, namespace: str, name: str, *phases: str) -> dict[str, Any] | None:
    """The FineTuneJob when its phase is one of ``phases``, else None (for ``wait_for``)."""
    obj = get_finetunejob(cluster, namespace, name)
    return obj if (obj.get("status") or {}).get("phase") in phases else None
