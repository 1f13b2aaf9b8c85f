"""Pure builders and status of an AdapterDeployment, without a cluster.

Aspects:
- adapters resolve from FineTuneJob results or URIs; unfinished jobs leave them Pending and out of
  the serving plan, and routes keep only servable backends;
- the base model's API name never collides with an adapter or route;
- the Deployment mounts every claim read-only, probes /health, runs non-root, and changes its pod
  template on adapter changes only under updateStrategy Rolling; its pods carry the managed-by label
  the operator's pod watch selects on;
- per-adapter states and conditions from what ready pods report; unsupported options are named.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.v1alpha1 import AdapterDeployment
from kubetune.operator import serving
from kubetune.operator.builders import WorkerSettings
from tests.api.cases import adapterdeployment

JOBS = {
    "support-lora": {
        "spec": {"output": {"uri": "pvc://adapters/support-lora"}},
        "status": {"phase": "Succeeded", "result": {"uri": "pvc://adapters/support-lora"}},
    }
}


def _adep(**spec: Any) -> AdapterDeployment:
    manifest = adapterdeployment()
    manifest["metadata"].update(namespace="team-a", uid="u1", generation=2)
    manifest["spec"].update(spec)
    return AdapterDeployment.model_validate(manifest)


def test_resolution_and_plan() -> None:
    adep = _adep()
    resolved = serving.resolve_adapters(adep, JOBS)
    assert [(r.name, r.uri, r.state) for r in resolved] == [
        ("support-v1", "pvc://adapters/support-lora", "Resolved"),
        ("support-v2", "s3://adapters/support-v2", "Resolved"),
    ]
    pending = serving.resolve_adapters(adep, {"support-lora": {"spec": {}, "status": {"phase": "Running"}}})
    assert pending[0].state == "Pending" and "Running" in pending[0].message
    plan = serving.serving_plan(adep, pending)
    assert [a.name for a in plan.adapters] == ["support-v2"]
    assert [(b.adapter, b.weight) for b in plan.routes[0].backends] == [("support-v2", 10)]
    assert plan.served_model_name == "Qwen/Qwen2.5-0.5B-Instruct"


def test_base_name_avoids_collisions() -> None:
    adep = _adep(
        model={"uri": "pvc://models/support"},
        routes=[],
        adapters=[{"name": "support", "uri": "s3://bucket/b"}],
    )
    assert serving.base_model_name(adep) == "support-base"


def test_deployment_and_service() -> None:
    adep = _adep(replicas=3, resources={"gpus": 1, "memory": "8Gi"})
    plan = serving.serving_plan(adep, serving.resolve_adapters(adep, JOBS))
    manifest = serving.deployment(adep, plan, WorkerSettings(image="example/kt:1"), ["adapters"])
    spec = manifest["spec"]
    assert spec["replicas"] == 3 and spec["selector"]["matchLabels"] == serving.selector_labels(adep)
    # The operator's pod watch selects on managed-by, server-side.
    assert spec["template"]["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune"
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][-2:] == ["--plan", "/etc/kubetune/serving.json"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "adapters", "readOnly": True}]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert serving.ANNOTATION_PLAN_HASH not in spec["template"]["metadata"]["annotations"]
    svc = serving.service(adep)
    assert svc["spec"]["ports"][0]["port"] == 8000 and svc["spec"]["selector"] == serving.selector_labels(
        adep
    )
    assert serving.endpoint(adep) == "http://support.team-a.svc:8000/v1"


def test_rolling_strategy_hashes_the_plan() -> None:
    adep = _adep(updateStrategy="Rolling")
    resolved = serving.resolve_adapters(adep, JOBS)
    one = serving.deployment(adep, serving.serving_plan(adep, resolved), WorkerSettings(), [])
    two = serving.deployment(adep, serving.serving_plan(adep, resolved[:1]), WorkerSettings(), [])
    key = serving.ANNOTATION_PLAN_HASH
    assert (
        one["spec"]["template"]["metadata"]["annotations"][key]
        != two["spec"]["template"]["metadata"]["annotations"][key]
    )


def test_adapter_states_and_conditions() -> None:
    adep = _adep(replicas=2)
    resolved = serving.resolve_adapters(adep, JOBS)
    both = {"support-v1": "pvc://adapters/support-lora", "support-v2": "s3://adapters/support-v2"}
    states = serving.adapter_statuses(resolved, [both, {"support-v1": "pvc://adapters/support-lora"}], {})
    assert [(a["state"], a["loadedReplicas"]) for a in states] == [("Loaded", 2), ("Loading", 1)]
    conditions = {c["type"]: c["status"] for c in serving.conditions_for(adep, 2, states)}
    assert conditions == {
        "Ready": "False",
        "Progressing": "True",
        "AdaptersLoaded": "False",
        "Degraded": "False",
    }

    failed = serving.adapter_statuses(resolved, [both], {"support-v2": "sha256 mismatch"})
    degraded = serving.conditions_for(adep, 2, failed)
    assert serving.phase_for(degraded) == "Degraded"
    assert "support-v2: sha256 mismatch" in next(c for c in degraded if c["type"] == "Degraded")["message"]

    ready = serving.conditions_for(adep, 2, serving.adapter_statuses(resolved, [both, both], {}))
    assert serving.phase_for(ready) == "Ready"


def test_unsupported_options_are_named() -> None:
    assert serving.unsupported(_adep()) is None
    assert "vllm" in str(serving.unsupported(_adep(runtime="vllm", resources={"gpus": 1})))
    assert "mergeAdapter" in str(
        serving.unsupported(
            _adep(mergeAdapter=True, routes=[], adapters=[{"name": "x", "uri": "s3://bucket/b"}])
        )
    )
