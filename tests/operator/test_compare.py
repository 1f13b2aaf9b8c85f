"""``kubetune compare`` against real FineTuneJobs on the local cluster.

Aspects:
- two tiny runs (LoRA and IA3) sharing a ``kubetune.dev/compare`` label are read back from their
  status and their manifests on the claim: the table lists both with measured numbers, JSON
  carries each run's loss curve from its manifest, and ``--plot`` writes a PNG;
- an AdapterDeployment (scaled to zero: no server needed) that serves one run by its FineTuneJob
  gives that run a serving entry, and the other run's latency cell says "not served";
- a third, suspended job in the comparison is named as not finished, and the command exits 2;
- a selector the apiserver rejects, and one that matches nothing, are said plainly (exit 1).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune.localcluster.testing import ClusterHandle, wait_for
from tests.fixtures import create_finetunejob, finetunejob, get_finetunejob, phase_is

pytestmark = [pytest.mark.cluster, pytest.mark.torch]

LABEL = "kubetune.dev/compare"


def _compare(cluster: ClusterHandle, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune", "compare", *args],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _labelled(body: dict[str, Any], value: str) -> dict[str, Any]:
    body["metadata"]["labels"] = {LABEL: value}
    return body


def _wait_succeeded(cluster: ClusterHandle, namespace: str, name: str) -> None:
    done = wait_for(
        lambda: phase_is(cluster, namespace, name, "Succeeded", "Failed"),
        300,
        interval=1,
        description=lambda: f"{name} to finish: {get_finetunejob(cluster, namespace, name).get('status')}",
    )
    assert done["status"]["phase"] == "Succeeded", done["status"]


def test_compare_reads_real_runs(
    cluster: ClusterHandle, namespace: str, operator: Path, claim_dir: Path, tmp_path: Path
) -> None:
    from kubetune.worker.testing import make_tiny_model, task_records, write_records

    make_tiny_model(claim_dir / "model")
    write_records(claim_dir / "train.jsonl", task_records(80, fmt="completion"))
    create_finetunejob(cluster, namespace, _labelled(finetunejob("cmp-lora"), "cipher"))
    create_finetunejob(
        cluster,
        namespace,
        _labelled(finetunejob("cmp-ia3", method={"type": "ia3"}), "cipher"),
    )
    for name in ("cmp-lora", "cmp-ia3"):
        _wait_succeeded(cluster, namespace, name)

    selector = f"{LABEL}=cipher"
    table = _compare(cluster, "-n", namespace, "-l", selector, "--plot", str(tmp_path / "cmp.png"))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:2] == ["job", "method"]
    rows = {line.split()[0]: line for line in lines[1:3]}
    assert set(rows) == {"cmp-ia3", "cmp-lora"}
    assert rows["cmp-lora"].split()[1:3] == ["lora", "(r=4)"] and "MiB" in rows["cmp-lora"]
    assert "(ref)" in table.stdout and "not reachable" not in table.stdout
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"

    document = json.loads(_compare(cluster, "-n", namespace, "-l", selector, "-o", "json").stdout)
    for run in document["runs"]:
        manifest = json.loads((claim_dir / "out" / run["name"] / "kubetune.json").read_text())
        status = get_finetunejob(cluster, namespace, run["name"])["status"]
        assert run["loss_curve"] == manifest["loss_curve"] and len(run["loss_curve"]) >= 3
        assert run["eval_loss"] == pytest.approx(status["result"]["metrics"]["eval_loss"])
        assert run["trainable_parameters"] == manifest["metrics"]["trainable_parameters"] > 0
    assert document["reference"] in ("cmp-lora", "cmp-ia3")

    from kubernetes import client

    from kubetune.api import v1alpha1

    client.CustomObjectsApi(cluster.api_client()).create_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "adapterdeployments",
        {
            "apiVersion": v1alpha1.API_VERSION,
            "kind": "AdapterDeployment",
            "metadata": {"name": "cmp-serve"},
            "spec": {
                "model": {"uri": "pvc://data/model"},
                "adapters": [{"name": "served-lora", "fineTuneJob": "cmp-lora"}],
                "replicas": 0,
            },
        },
    )  # fmt: skip
    served = json.loads(_compare(cluster, "-n", namespace, "-l", selector, "-o", "json").stdout)
    serving = {run["name"]: run["serving"] for run in served["runs"]}
    assert [(s["adapter_deployment"], s["adapter"]) for s in serving["cmp-lora"]] == [
        ("cmp-serve", "served-lora")
    ]
    assert serving["cmp-ia3"] == []
    table_lines = _compare(cluster, "-n", namespace, "-l", selector).stdout.splitlines()
    latency = {line.split()[0]: line for line in table_lines}
    assert latency["cmp-ia3"].rstrip().endswith("not served")
    assert "not served" not in latency["cmp-lora"]

    create_finetunejob(cluster, namespace, _labelled(finetunejob("cmp-later", suspend=True), "cipher"))
    wait_for(lambda: phase_is(cluster, namespace, "cmp-later", "Suspended"), 60, description="suspended")
    pending = _compare(cluster, "-n", namespace, "-l", selector)
    assert pending.returncode == 2
    assert "cmp-later has not succeeded (Suspended)" in pending.stderr
    assert "cmp-lora" in pending.stdout and "cmp-later" in pending.stdout

    bad = _compare(cluster, "-n", namespace, "-l", "not a selector!")
    assert bad.returncode == 1 and "is not a valid label selector" in bad.stderr, bad.stderr
    none = _compare(cluster, "-n", namespace, "-l", f"{LABEL}=nothing")
    assert none.returncode == 1 and f"no FineTuneJob in namespace '{namespace}' matches" in none.stderr
