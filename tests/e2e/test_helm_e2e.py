"""The operator end to end on a real cluster from the real images: real Jobs, pods, RBAC, Helm and
containers (the local cluster's podman node, or kind through KUBECONFIG).

Aspects:
- the whole loop under the Helm-installed operator (a Deployment with its least-privilege
  ServiceAccount) running from the operator image, with workers and servers from the worker
  image, every pod as uid 1000 on a read-only root filesystem: a LoRA FineTuneJob on a tiny model
  and data on a PersistentVolumeClaim trains,
  publishes its artifact on the claim and reports Succeeded; an AdapterDeployment then serves it
  over the OpenAI API, hot-swaps a second adapter in and out without restarting the pod, and scales
  through the scale subresource with every replica loading the adapters;
- (with `kubetune operator` as a local process) a bad dataset fails the FineTuneJob with the
  worker's reason and message, without retries;
- a suspended FineTuneJob creates a suspended Job and runs nothing;
- a worker over its memory limit is OOMKilled by the runtime and the FineTuneJob says OutOfMemory;
- the operator process logs no traceback;
- the run's condition transitions are Events on the FineTuneJob, and the operator's reconcile
  metrics are served through the chart's metrics Service.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import v1alpha1
from kubetune.localcluster.testing import BuiltImages, ClusterHandle, wait_for
from tests.fixtures import create_finetunejob, finetunejob, get_finetunejob, phase_is

pytestmark = [pytest.mark.cluster, pytest.mark.torch]


CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"


@pytest.fixture
def operator_release(
    cluster: ClusterHandle, namespace: str, crds: None, images: BuiltImages
) -> Iterator[str]:
    """The chart installed into the test namespace with the built images, watching it;
    uninstalled afterwards."""
    release = f"kt-{secrets.token_hex(3)}"
    installed = cluster.helm(
        "install", release, str(CHART), "--namespace", namespace, "--skip-crds",
        "--set", f"operator.watchNamespaces={{{namespace}}}", *images.helm_values(),
        "--wait", "--timeout", "180s", check=False,
    )  # fmt: skip
    if installed.returncode != 0:
        pytest.fail(f"helm install failed: {installed.stderr.strip()}\n{cluster.describe(namespace)}")
    try:
        yield release
    finally:
        cluster.helm("uninstall", release, "--namespace", namespace, check=False)


def test_helm_installed_operator_trains_and_publishes(
    cluster: ClusterHandle, namespace: str, operator_release: str, claim_dir: Path
) -> None:
    from kubernetes import client

    (pod,) = (
        client.CoreV1Api(cluster.api_client())
        .list_namespaced_pod(namespace, label_selector=f"app.kubernetes.io/instance={operator_release}")
        .items
    )
    assert pod.spec.service_account_name == f"{operator_release}-operator"  # type: ignore[union-attr]
    _assert_locked_down(pod)

    from kubetune.worker.testing import make_tiny_model, task_records, write_records

    make_tiny_model(claim_dir / "model")
    write_records(claim_dir / "train.jsonl", task_records(80, fmt="completion"))
    create_finetunejob(cluster, namespace, finetunejob("tiny-lora", "train.jsonl"))

    done = wait_for(
        lambda: phase_is(cluster, namespace, "tiny-lora", "Succeeded", "Failed"),
        300,
        interval=1,
        description=lambda: (
            "tiny-lora to finish; status: "
            + json.dumps(get_finetunejob(cluster, namespace, "tiny-lora").get("status"))
        ),
    )
    status = done["status"]
    assert status["phase"] == "Succeeded", status
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True" and conditions["Failed"]["status"] == "False"
    assert all(c["observedGeneration"] == done["metadata"]["generation"] for c in status["conditions"])
    assert status["jobName"] == "tiny-lora-train"
    manifest_file = claim_dir / "out" / "tiny-lora" / "kubetune.json"
    assert json.loads(manifest_file.read_text())["method"] == "lora"
    result = status["result"]
    (worker,) = (
        client.CoreV1Api(cluster.api_client())
        .list_namespaced_pod(namespace, label_selector="batch.kubernetes.io/job-name=tiny-lora-train")
        .items
    )
    _assert_locked_down(worker)
    assert result["uri"] == "pvc://data/out/tiny-lora" and result["format"] == "peft"
    assert result["sha256"] == hashlib.sha256(manifest_file.read_bytes()).hexdigest()
    assert result["metrics"]["artifact_size_bytes"] > 0 and result["metrics"]["eval_loss"] > 0
    _serve_and_swap(cluster, namespace)
    _assert_observable(cluster, namespace, operator_release)

    # Least privilege held: nothing the operator tried was forbidden.
    log = cluster.read_log(namespace, pod.metadata.name)  # type: ignore[union-attr]
    assert "Forbidden" not in log and "Traceback" not in log, log[-4000:]


def _assert_observable(cluster: ClusterHandle, namespace: str, release: str) -> None:
    """The run's condition transitions are Events on the FineTuneJob, and the operator's metrics
    are served through the chart's metrics Service (read through the apiserver's service proxy)."""
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())
    events = {
        (e.type, e.reason)
        for e in core.list_namespaced_event(namespace, field_selector="involvedObject.name=tiny-lora").items
    }
    # Feasible's reason is the planner's: it does not read pvc:// models, so the job runs unchecked.
    expected_events = [
        ("Normal", "ModelConfigUnavailable"),
        ("Normal", "Training"),
        ("Normal", "ArtifactPublished"),
    ]
    for expected in expected_events:
        assert expected in events, events
    assert not {e for e in events if e[0] == "Warning"}, events

    text = core.connect_get_namespaced_service_proxy_with_path(
        f"{release}-operator-metrics:metrics", namespace, "metrics"
    )
    samples = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("kubetune_") and "{" in line
    )
    assert float(samples['kubetune_reconciles_total{kind="FineTuneJob"}']) >= 3, text
    assert float(samples['kubetune_reconciles_total{kind="AdapterDeployment"}']) >= 1, text
    assert float(samples['kubetune_objects{kind="FineTuneJob",phase="Succeeded"}']) == 1, text
    assert any(k.startswith("kubetune_api_requests_total{") and 'code="200"' in k for k in samples), text
    assert 'kubetune_reconcile_duration_seconds_count{kind="FineTuneJob"}' in samples, text


def _assert_locked_down(pod: Any) -> None:
    """Every container of ``pod`` runs from an image, as uid 1000, on a read-only root.

    The spec is what the runtime enforces (tests/e2e/test_container_runtime.py proves it does);
    the status proves a container runtime, not a host process, ran it."""
    pod_security = pod.spec.security_context
    for container, state in zip(pod.spec.containers, pod.status.container_statuses, strict=True):
        security = container.security_context
        uid = security.run_as_user if security.run_as_user is not None else pod_security.run_as_user
        assert uid == 1000, (pod.metadata.name, container.name)
        assert pod_security.run_as_non_root is True
        assert security.read_only_root_filesystem is True, (pod.metadata.name, container.name)
        assert security.allow_privilege_escalation is False
        assert security.capabilities.drop == ["ALL"]
        assert state.image_id and not state.container_id.startswith("kubetune://"), state


def _adep(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes import client

    result: dict[str, Any] = client.CustomObjectsApi(cluster.api_client()).get_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "adapterdeployments", name
    )
    return result


def _serving_pods(cluster: ClusterHandle, namespace: str) -> list[Any]:
    from kubernetes import client

    pods = client.CoreV1Api(cluster.api_client()).list_namespaced_pod(
        namespace, label_selector="kubetune.dev/adapterdeployment=support"
    )
    return [p for p in pods.items if not p.metadata.deletion_timestamp]


def _ready(cluster: ClusterHandle, namespace: str, replicas: int, adapters: str) -> dict[str, Any] | None:
    status = _adep(cluster, namespace, "support").get("status") or {}
    ok = status.get("phase") == "Ready" and status.get("readyReplicas") == replicas
    return status if ok and status.get("adaptersReady") == adapters else None


def _serve_and_swap(cluster: ClusterHandle, namespace: str) -> None:
    import httpx
    from kubernetes import client

    objects = client.CustomObjectsApi(cluster.api_client())
    body = {
        "apiVersion": v1alpha1.API_VERSION,
        "kind": "AdapterDeployment",
        "metadata": {"name": "support"},
        "spec": {
            "model": {"uri": "pvc://data/model"},
            "adapters": [{"name": "support-v1", "fineTuneJob": "tiny-lora"}],
            "resources": {"cpu": "1", "memory": "2Gi"},
        },
    }
    objects.create_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "adapterdeployments", body
    )
    status = wait_for(
        lambda: _ready(cluster, namespace, 1, "1/1"),
        240,
        interval=1,
        description=lambda: (
            f"support Ready; status: {json.dumps(_adep(cluster, namespace, 'support').get('status'))}"
        ),
    )
    assert status["adapters"][0]["source"] == "pvc://data/out/tiny-lora"
    assert status["conditions"][0]["type"] == "Ready" and status["conditions"][0]["status"] == "True"
    assert status["endpoint"] == f"http://support.{namespace}.svc:8000/v1"
    (pod,) = _serving_pods(cluster, namespace)
    _assert_locked_down(pod)
    url = f"http://{pod.status.pod_ip}:8000"
    answer = httpx.post(
        f"{url}/v1/completions",
        json={"model": "support-v1", "prompt": "encode : c a t", "max_tokens": 4},
        timeout=60,
    )
    assert answer.status_code == 200 and answer.headers["x-kubetune-adapter"] == "support-v1", answer.text

    # Hot swap: a second adapter (and a route over both) arrives in the running pod, no restart.
    objects.patch_namespaced_custom_object(
        v1alpha1.GROUP,
        v1alpha1.VERSION,
        namespace,
        "adapterdeployments",
        "support",
        {
            "spec": {
                "adapters": [
                    {"name": "support-v1", "fineTuneJob": "tiny-lora"},
                    {"name": "support-v2", "uri": "pvc://data/out/tiny-lora"},
                ],
                "routes": [
                    {
                        "name": "support",
                        "backends": [
                            {"adapter": "support-v1", "weight": 9},
                            {"adapter": "support-v2", "weight": 1},
                        ],
                    }
                ],
            }
        },
    )
    wait_for(lambda: _ready(cluster, namespace, 1, "2/2"), 120, interval=1, description="support-v2 loaded")
    models = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]]
    # The base is named after its path; the route "support" is an alias over both adapters.
    assert models == ["model", "support-v1", "support-v2", "support"]
    (same,) = _serving_pods(cluster, namespace)
    assert same.metadata.uid == pod.metadata.uid
    assert same.status.container_statuses[0].restart_count == 0

    # Scale through the scale subresource: the new replica serves both adapters too.
    objects.patch_namespaced_custom_object_scale(
        v1alpha1.GROUP,
        v1alpha1.VERSION,
        namespace,
        "adapterdeployments",
        "support",
        {"spec": {"replicas": 2}},
    )
    status = wait_for(
        lambda: _ready(cluster, namespace, 2, "2/2"),
        240,
        interval=1,
        description=lambda: (
            "2 replicas; status: "
            + json.dumps(_adep(cluster, namespace, "support").get("status"))
            + "; pods: "
            + json.dumps(
                [
                    (p.metadata.name, p.status.phase, p.status.pod_ip)
                    for p in _serving_pods(cluster, namespace)
                ]
            )
        ),
    )
    assert all(a["loadedReplicas"] == 2 for a in status["adapters"])


def test_bad_dataset_fails_with_the_workers_reason(
    cluster: ClusterHandle, namespace: str, operator: Path, claim_dir: Path
) -> None:
    from kubernetes import client

    (claim_dir / "model").mkdir()
    (claim_dir / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"\n')
    create_finetunejob(cluster, namespace, finetunejob("bad-data", "bad.jsonl"))

    done = wait_for(
        lambda: phase_is(cluster, namespace, "bad-data", "Succeeded", "Failed"),
        240,
        interval=1,
        description="bad-data to finish",
    )
    failed = next(c for c in done["status"]["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "DatasetInvalid"), failed
    assert "line 2" in failed["message"]
    pods = client.CoreV1Api(cluster.api_client()).list_namespaced_pod(
        namespace, label_selector="batch.kubernetes.io/job-name=bad-data-train"
    )
    assert len(pods.items) == 1  # podFailurePolicy: a bad dataset is not retried


def test_suspended_job_runs_nothing(cluster: ClusterHandle, namespace: str, operator: Path) -> None:
    from kubernetes import client

    create_finetunejob(cluster, namespace, finetunejob("held", "train.jsonl", suspend=True))
    wait_for(
        lambda: phase_is(cluster, namespace, "held", "Suspended"), 60, interval=0.5, description="Suspended"
    )
    job = client.BatchV1Api(cluster.api_client()).read_namespaced_job("held-train", namespace)
    assert job.spec.suspend is True  # type: ignore[union-attr]
    assert not client.CoreV1Api(cluster.api_client()).list_namespaced_pod(namespace).items


def test_worker_over_its_memory_limit_is_out_of_memory(
    cluster: ClusterHandle, namespace: str, operator: Path, claim_dir: Path, images: BuiltImages
) -> None:
    """The limit is enforced by the runtime (not a worker's own check): importing torch needs more
    anonymous memory than 64 MiB, so the kernel kills the worker and the FineTuneJob says why.

    Not a limit close to what the import needs: at 160 MiB the anonymous part stays just under it,
    and when no other container has torch's libraries in the page cache, the kernel evicts and
    re-reads their pages instead of killing (measured: 20k major faults and no OOM after 80 s), so
    the run crawls for minutes before it fails, as it would under kubelet. So the node first runs
    the worker image once without a limit, as any node that has run it has its libraries cached
    (pages stay charged to the cgroup that first read them, not to the starved worker's)."""
    from kubernetes import client

    from kubetune.worker.testing import make_tiny_model, task_records, write_records

    core = client.CoreV1Api(cluster.api_client())
    warm = {
        "name": "warm",
        "image": images.worker,
        "command": ["python", "-c", "import torch, transformers, peft"],
    }
    core.create_namespaced_pod(
        namespace,
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "warm"},
         "spec": {"restartPolicy": "Never", "containers": [warm]}},
    )  # fmt: skip
    wait_for(
        lambda: core.read_namespaced_pod("warm", namespace).status.phase == "Succeeded",
        120,
        description=lambda: f"the warm-up pod to succeed: {cluster.describe(namespace)}",
    )

    make_tiny_model(claim_dir / "model")
    write_records(claim_dir / "train.jsonl", task_records(20, fmt="completion"))
    job = finetunejob("starved", "train.jsonl", backoffLimit=0)
    job["spec"]["resources"]["memory"] = "64Mi"
    create_finetunejob(cluster, namespace, job)
    done = wait_for(
        lambda: phase_is(cluster, namespace, "starved", "Succeeded", "Failed"),
        240,
        interval=1,
        description=lambda: (
            "starved to fail; status: "
            + json.dumps(get_finetunejob(cluster, namespace, "starved").get("status"))
        ),
    )
    failed = next(c for c in done["status"]["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "OutOfMemory"), failed
