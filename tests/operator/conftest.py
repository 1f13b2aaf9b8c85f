"""Cluster fixtures of the operator tests: the CRDs, the operator as a local process, a claim."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.api import crdgen
from kubetune.localcluster.testing import ClusterHandle, wait_for


@pytest.fixture(scope="module")
def crds(cluster: ClusterHandle) -> None:
    crdgen.apply(cluster.api_client())


@pytest.fixture
def operator(cluster: ClusterHandle, namespace: str, crds: None, tmp_path: Path) -> Iterator[Path]:
    """``kubetune operator`` watching the test namespace, with debug logs (every API request the
    reconcilers make is a ``urllib3`` line); yields the log file, asserts it has no traceback."""
    log = tmp_path / "operator.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune", "operator", "--namespace", namespace, "--liveness", "", "-v"],
            env=cluster.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
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
    """A bound PersistentVolumeClaim "data"; returns its directory on this host."""
    from kubernetes import client

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
