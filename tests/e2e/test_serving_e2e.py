"""An AdapterDeployment on real containers (the worker image on the podman node), driven by a local
``kubetune operator``, with one corrupt adapter among good ones.

Aspects:
- isolation: with two good adapters and one whose weights were tampered with, the deployment turns
  Ready serving the two good ones; the corrupt one is ``Failed`` with its reason (HashMismatch) in
  ``status.adapters``, the Degraded condition names it, one Warning Event says so, and the serving
  container never restarts;
- auth: the operator creates the admin-token Secret (owned by the AdapterDeployment), the pods
  require it: a load call without it gets 401 in OpenAI's shape, directly and through the Service,
  while the operator's hot swaps (an adapter removed) go through; the token is never in the
  operator's log, the status or the Events; with ``apiKeysSecret`` the inference API needs a key;
- OpenAI compatibility through the Service: the official ``openai`` client streams completions and
  chat with the user's API key, and gets ``AuthenticationError`` without one;
- hygiene: a ``spec.service`` change reaches the Service; a second replica brings a
  PodDisruptionBudget that keeps all but one replica;
- ``mergeAdapter``: the one adapter is served merged into the base, which is no longer listed;
- a route's canary is stepped (50%, 100%) by the operator from the pod's counters while requests
  flow through the Service, then promoted: all requests on the new adapter, Events for each step;
  the next version, whose mean latency breaks its bound, is rolled back at its first step: all
  requests on the promoted one again, the Canary condition and a Warning Event say why.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import v1alpha1
from kubetune.localcluster.testing import ClusterHandle, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.torch]

NAME = "serve"
API_KEY = "e2e-client-key"
PROMPT = "encode : c a t"


def _objects(cluster: ClusterHandle) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(cluster.api_client())


def _core(cluster: ClusterHandle) -> Any:
    from kubernetes import client

    return client.CoreV1Api(cluster.api_client())


def _status(cluster: ClusterHandle, namespace: str) -> dict[str, Any]:
    obj = _objects(cluster).get_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "adapterdeployments", NAME
    )
    return dict(obj.get("status") or {})


def _pods(cluster: ClusterHandle, namespace: str) -> list[Any]:
    pods = _core(cluster).list_namespaced_pod(
        namespace, label_selector=f"kubetune.dev/adapterdeployment={NAME}"
    )
    return [p for p in pods.items if not p.metadata.deletion_timestamp]


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def _artifacts(claim_dir: Path) -> None:
    """The tiny base, two LoRA adapters trained on it, and a copy of one with tampered weights."""
    from kubetune.worker.testing import make_tiny_model, task_records, write_records
    from tests.serving.conftest import train

    model = make_tiny_model(claim_dir / "model")
    data = write_records(claim_dir / "train.jsonl", task_records(80, fmt="completion"))
    adapters = claim_dir / "adapters"
    train(model, data, adapters / "good-a", {"type": "lora", "lora": {"rank": 4}})
    train(model, data, adapters / "good-b", {"type": "lora", "lora": {"rank": 8}})
    shutil.copytree(adapters / "good-a", adapters / "corrupt")
    weights = next(p for p in (adapters / "corrupt").iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    # The serving container runs as another user than this test.
    for path in [claim_dir, *claim_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _settled(cluster: ClusterHandle, namespace: str, adapters: str) -> dict[str, Any] | None:
    status = _status(cluster, namespace)
    states = {a["name"]: a["state"] for a in status.get("adapters") or []}
    ready = _condition(status, "Ready").get("status") == "True" and status.get("readyReplicas") == 1
    return (
        status
        if ready and status.get("adaptersReady") == adapters and "Loading" not in states.values()
        else None
    )


def test_corrupt_adapter_is_isolated_and_the_admin_api_needs_the_token(
    cluster: ClusterHandle, namespace: str, operator: Path, claim_dir: Path
) -> None:
    import httpx
    import openai

    _artifacts(claim_dir)
    core = _core(cluster)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "client-keys"}, "stringData": {"keys": f"{API_KEY}\n"}}
    )
    body = {
        "apiVersion": v1alpha1.API_VERSION,
        "kind": "AdapterDeployment",
        "metadata": {"name": NAME},
        "spec": {
            "model": {"uri": "pvc://data/model"},
            "adapters": [
                {"name": "good-a", "uri": "pvc://data/adapters/good-a"},
                {"name": "good-b", "uri": "pvc://data/adapters/good-b"},
                {"name": "corrupt", "uri": "pvc://data/adapters/corrupt"},
            ],
            "resources": {"cpu": "1", "memory": "2Gi"},
            "apiKeysSecret": "client-keys",
        },
    }
    created = _objects(cluster).create_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "adapterdeployments", body
    )

    status = wait_for(
        lambda: _settled(cluster, namespace, "2/3"),
        300,
        interval=1,
        description=lambda: f"Ready with 2/3 adapters: {json.dumps(_status(cluster, namespace))}",
    )
    adapters = {a["name"]: a for a in status["adapters"]}
    assert [adapters[n]["state"] for n in ("good-a", "good-b")] == ["Loaded", "Loaded"]
    assert (adapters["corrupt"]["state"], adapters["corrupt"]["reason"]) == ("Failed", "HashMismatch")
    assert "differs" in adapters["corrupt"]["message"] or "sha256" in adapters["corrupt"]["message"]
    degraded = _condition(status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "AdapterFailed"), degraded
    assert "corrupt: HashMismatch" in degraded["message"]
    assert status["phase"] == "Degraded"
    # The runtime's decode-latency probes, per loaded adapter and for the base (kubetune compare).
    assert adapters["good-a"]["msPerToken"] > 0 and adapters["good-b"]["msPerToken"] > 0, adapters
    assert "msPerToken" not in adapters["corrupt"] and status["baseMsPerToken"] > 0, status

    def warnings() -> list[str]:
        found = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={NAME}").items
        return sorted(e.message for e in found if e.reason == "AdapterFailed" and e.type == "Warning")

    # One Event for the first failure: the Degraded condition turning True, which names the adapter.
    (condition_event,) = wait_for(lambda: warnings(), 60, interval=1, description="the AdapterFailed Event")
    assert condition_event.startswith("Degraded is True: corrupt: HashMismatch"), condition_event
    # The pod keeps retrying it with backoff (5 s, 10 s...): no new Event, no flapping status.
    time.sleep(12)
    assert warnings() == [condition_event], warnings()
    again = _status(cluster, namespace)
    assert ({a["name"]: a["state"] for a in again["adapters"]}["corrupt"], again["phase"]) == (
        "Failed",
        "Degraded",
    )

    # The admin token: a Secret the operator made, owned by the AdapterDeployment.
    secret = core.read_namespaced_secret(f"{NAME}-admin-token", namespace)
    assert [o.uid for o in secret.metadata.owner_references] == [created["metadata"]["uid"]]
    token = base64.b64decode(secret.data["token"]).decode()
    assert len(token) >= 32

    (pod,) = _pods(cluster, namespace)
    service = core.read_namespaced_service(NAME, namespace)
    for base in (f"http://{pod.status.pod_ip}:8000", f"http://{service.spec.cluster_ip}:8000"):
        refused = httpx.post(
            f"{base}/v1/load_lora_adapter",
            json={"lora_name": "intruder", "lora_path": "pvc://data/adapters/good-a"},
            timeout=30,
        )
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.post(
            f"{base}/v1/unload_lora_adapter",
            json={"lora_name": "good-a"},
            headers={"Authorization": "Bearer not-the-token"},
            timeout=30,
        )
        assert wrong.status_code == 401, wrong.text

    # The inference API through the Service, with the user's key, streaming.
    client = openai.OpenAI(base_url=f"http://{service.spec.cluster_ip}:8000/v1", api_key=API_KEY, timeout=60)
    chunks = list(client.completions.create(model="good-a", prompt=PROMPT, max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices), chunks
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    chat = list(
        client.chat.completions.create(
            model="good-b", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, stream=True
        )
    )
    assert chat[0].choices[0].delta.role == "assistant"
    assert any(c.choices and c.choices[0].finish_reason for c in chat)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", timeout=60).models.list()
    with pytest.raises(openai.APIStatusError) as failed:
        client.completions.create(model="corrupt", prompt=PROMPT, max_tokens=4)
    assert failed.value.status_code == 503

    # A hot swap through the admin API (the operator holds the token): good-b goes, no restart.
    _objects(cluster).patch_namespaced_custom_object(
        v1alpha1.GROUP,
        v1alpha1.VERSION,
        namespace,
        "adapterdeployments",
        NAME,
        {"spec": {"adapters": [a for a in body["spec"]["adapters"] if a["name"] != "good-b"]}},
    )
    wait_for(
        lambda: [m.id for m in client.models.list().data] == ["model", "good-a"],
        120,
        interval=1,
        description=lambda: f"good-b unloaded: {[m.id for m in client.models.list().data]}",
    )
    status = wait_for(lambda: _settled(cluster, namespace, "1/2"), 60, interval=1, description="1/2")
    assert _condition(status, "Degraded")["reason"] == "AdapterFailed"  # not AdminUnauthorized

    # spec.service is mutable: the Service follows it.
    _objects(cluster).patch_namespaced_custom_object(
        v1alpha1.GROUP,
        v1alpha1.VERSION,
        namespace,
        "adapterdeployments",
        NAME,
        {"spec": {"service": {"type": "NodePort"}}},
    )
    wait_for(
        lambda: core.read_namespaced_service(NAME, namespace).spec.type == "NodePort",
        60,
        interval=1,
        description="the Service to become a NodePort",
    )

    (same,) = _pods(cluster, namespace)
    assert same.metadata.uid == pod.metadata.uid
    assert same.status.container_statuses[0].restart_count == 0

    # A second replica brings a disruption budget.
    _objects(cluster).patch_namespaced_custom_object_scale(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "adapterdeployments", NAME, {"spec": {"replicas": 2}}
    )
    from kubernetes import client as k8s

    policy = k8s.PolicyV1Api(cluster.api_client())
    budget = wait_for(
        lambda: [
            b
            for b in policy.list_namespaced_pod_disruption_budget(namespace).items
            if b.metadata.name == NAME
        ],
        60,
        interval=1,
        description="the PodDisruptionBudget",
    )[0]
    assert budget.spec.max_unavailable == 1
    assert budget.spec.selector.match_labels["kubetune.dev/adapterdeployment"] == NAME

    # The token never leaves the Secret: not in the operator's log, the status or the Events.
    everything = operator.read_text() + json.dumps(_status(cluster, namespace))
    everything += json.dumps([e.message for e in core.list_namespaced_event(namespace).items])
    assert token not in everything


def test_merge_adapter_serves_the_adapter_merged(
    cluster: ClusterHandle, namespace: str, operator: Path, claim_dir: Path
) -> None:
    import httpx

    from kubetune.worker.testing import make_tiny_model, task_records, write_records
    from tests.serving.conftest import train

    model = make_tiny_model(claim_dir / "model")
    data = write_records(claim_dir / "train.jsonl", task_records(80, fmt="completion"))
    train(model, data, claim_dir / "adapters" / "only", {"type": "lora", "lora": {"rank": 4}})
    for path in [claim_dir, *claim_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    body = {
        "apiVersion": v1alpha1.API_VERSION,
        "kind": "AdapterDeployment",
        "metadata": {"name": NAME},
        "spec": {
            "model": {"uri": "pvc://data/model"},
            "adapters": [{"name": "merged", "uri": "pvc://data/adapters/only"}],
            "mergeAdapter": True,
            "resources": {"cpu": "1", "memory": "2Gi"},
        },
    }
    _objects(cluster).create_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "adapterdeployments", body
    )
    status = wait_for(
        lambda: _settled(cluster, namespace, "1/1"),
        300,
        interval=1,
        description=lambda: f"Ready with the merged adapter: {json.dumps(_status(cluster, namespace))}",
    )
    assert status["phase"] == "Ready"
    service = _core(cluster).read_namespaced_service(NAME, namespace)
    url = f"http://{service.spec.cluster_ip}:8000/v1"
    # The base is merged: only the adapter is served.
    assert [m["id"] for m in httpx.get(f"{url}/models", timeout=30).json()["data"]] == ["merged"]
    answer = httpx.post(
        f"{url}/completions", json={"model": "merged", "prompt": PROMPT, "max_tokens": 4}, timeout=60
    )
    assert answer.status_code == 200 and answer.headers["x-kubetune-adapter"] == "merged", answer.text
    assert (
        httpx.post(f"{url}/completions", json={"model": "model", "prompt": PROMPT}, timeout=60).status_code
        == 404
    )


def test_canary_is_promoted_step_by_step_and_a_slow_one_rolled_back(
    cluster: ClusterHandle, namespace: str, operator: Path, claim_dir: Path
) -> None:
    import httpx

    from kubetune.worker.testing import make_tiny_model, task_records, write_records
    from tests.serving.conftest import train

    model = make_tiny_model(claim_dir / "model")
    data = write_records(claim_dir / "train.jsonl", task_records(80, fmt="completion"))
    for name, rank in (("v1", 4), ("v2", 8)):
        train(model, data, claim_dir / "adapters" / name, {"type": "lora", "lora": {"rank": rank}})
    for path in [claim_dir, *claim_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    body = {
        "apiVersion": v1alpha1.API_VERSION,
        "kind": "AdapterDeployment",
        "metadata": {"name": NAME},
        "spec": {
            "model": {"uri": "pvc://data/model"},
            "adapters": [
                {"name": "v1", "uri": "pvc://data/adapters/v1"},
                {"name": "v2", "uri": "pvc://data/adapters/v2"},
            ],
            "routes": [
                {
                    "name": "support",
                    "backends": [{"adapter": "v1", "weight": 1}, {"adapter": "v2", "weight": 1}],
                    "canary": {"adapter": "v2", "steps": [50, 100], "stepSeconds": 2, "minRequests": 4},
                }
            ],
            "resources": {"cpu": "1", "memory": "2Gi"},
        },
    }
    _objects(cluster).create_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "adapterdeployments", body
    )

    def serving_at_50() -> bool:
        status = _status(cluster, namespace)
        return status.get("readyReplicas") == 1 and (status.get("canaries") or [{}])[0].get("weight") == 50

    wait_for(
        serving_at_50,
        300,
        interval=1,
        description=lambda: f"ready, the canary at 50%: {json.dumps(_status(cluster, namespace))}",
    )
    service = _core(cluster).read_namespaced_service(NAME, namespace)
    url = f"http://{service.spec.cluster_ip}:8000/v1"

    def promoted() -> dict[str, Any] | None:
        answer = httpx.post(
            f"{url}/completions", json={"model": "support", "prompt": PROMPT, "max_tokens": 1}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        canary = (_status(cluster, namespace).get("canaries") or [{}])[0]
        return canary if canary.get("state") == "Promoted" else None

    canary = wait_for(
        promoted, 300, interval=0.2, description=lambda: json.dumps(_status(cluster, namespace))
    )
    assert canary["weight"] == 100 and "promoted" in canary["message"]
    status = _status(cluster, namespace)
    assert (_condition(status, "Canary")["reason"], status["phase"]) == ("CanaryPromoted", "Ready")
    # Every request now goes to v2.
    for _ in range(5):
        answer = httpx.post(
            f"{url}/completions", json={"model": "support", "prompt": PROMPT, "max_tokens": 1}, timeout=60
        )
        assert answer.headers["x-kubetune-adapter"] == "v2"
    reasons = {
        e.reason
        for e in _core(cluster)
        .list_namespaced_event(namespace, field_selector=f"involvedObject.name={NAME}")
        .items
    }
    assert {"CanaryStarted", "CanaryStepped", "CanaryPromoted"} <= reasons, reasons

    # The next version, v3 (v1's artifact under a new name), with a mean-latency bound no request
    # meets: rolled back at its first step, from the counters of the requests it served.
    shutil.copytree(claim_dir / "adapters" / "v1", claim_dir / "adapters" / "v3")
    for path in [claim_dir / "adapters" / "v3", *(claim_dir / "adapters" / "v3").rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    slow = {"adapter": "v3", "steps": [50, 100], "stepSeconds": 2, "minRequests": 3}
    spec = {
        "adapters": [*body["spec"]["adapters"], {"name": "v3", "uri": "pvc://data/adapters/v3"}],
        "routes": [
            {
                "name": "support",
                "backends": [{"adapter": "v2", "weight": 1}, {"adapter": "v3", "weight": 1}],
                "canary": {**slow, "maxMeanLatencySeconds": 0.000001},
            }
        ],
    }
    _objects(cluster).patch_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "adapterdeployments", NAME, {"spec": spec}
    )
    served: set[str] = set()

    def rolled_back() -> dict[str, Any] | None:
        answer = httpx.post(
            f"{url}/completions", json={"model": "support", "prompt": PROMPT, "max_tokens": 1}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        served.add(answer.headers["x-kubetune-adapter"])
        canary = (_status(cluster, namespace).get("canaries") or [{}])[0]
        return canary if (canary.get("adapter"), canary.get("state")) == ("v3", "RolledBack") else None

    canary = wait_for(
        rolled_back, 300, interval=0.2, description=lambda: json.dumps(_status(cluster, namespace))
    )
    assert "v3" in served, served  # it did get its share before the rollback
    assert canary["weight"] == 0 and canary["step"] == 0, canary
    assert "rolled back at 50%" in canary["message"] and "mean latency above" in canary["message"]
    status = _status(cluster, namespace)
    condition = _condition(status, "Canary")
    assert (condition["reason"], condition["status"]) == ("CanaryRolledBack", "False"), condition
    assert "v3 at 0%" in condition["message"] and status["phase"] == "Ready"
    for _ in range(5):
        answer = httpx.post(
            f"{url}/completions", json={"model": "support", "prompt": PROMPT, "max_tokens": 1}, timeout=60
        )
        assert answer.headers["x-kubetune-adapter"] == "v2"
    rollbacks = [
        e
        for e in _core(cluster)
        .list_namespaced_event(namespace, field_selector=f"involvedObject.name={NAME}")
        .items
        if e.reason == "CanaryRolledBack" and e.type == "Warning"
    ]
    assert len(rollbacks) == 1, rollbacks
    assert "v3 rolled back at 50%" in rollbacks[0].message and "mean latency above" in rollbacks[0].message
