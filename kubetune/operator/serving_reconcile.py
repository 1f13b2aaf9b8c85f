"""One reconcile pass of an AdapterDeployment.

Server-side applies the serving ConfigMap, Deployment and Service (only those whose desired
manifest changed; a child owned by someone else is reported, never touched), then makes every ready
pod serve exactly the desired adapters and routes by calling its HTTP API (hot swap, no restart),
and writes status from what the pods report, only when it changed. Level-based and idempotent like
the FineTuneJob pass.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from kubetune.api.v1alpha1 import AdapterDeployment
from kubetune.operator import kube, serving
from kubetune.operator.reconcile import OperatorConfig
from kubetune.operator.status import merge_conditions

logger = logging.getLogger("kubetune.operator.serving")

PLURAL = "adapterdeployments"
KIND = "AdapterDeployment"


def _call(pod_ip: str, port: int, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{pod_ip}:{port}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def _error_message(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        try:
            return str(json.loads(error.read())["error"]["message"])
        except (ValueError, KeyError, TypeError):
            return f"HTTP {error.code}"
    return f"{type(error).__name__}: {error}"


#: Key under which a pod's route-table failure is reported among adapter failures.
ROUTES_KEY = "routes"


def sync_pod(pod_ip: str, port: int, plan: Any) -> tuple[dict[str, str], dict[str, str]]:
    """Make one pod serve the plan's adapters and routes; returns (name -> source loaded, failures
    by adapter name, plus ``ROUTES_KEY`` when the route table was refused)."""
    failures: dict[str, str] = {}
    current = {
        a["name"]: a["source"] for a in _call(pod_ip, port, "GET", "/v1/adapters", timeout=5)["adapters"]
    }
    desired = {a.name: a.uri for a in plan.adapters}
    for name in set(current) - set(desired):
        _call(pod_ip, port, "POST", "/v1/unload_lora_adapter", {"lora_name": name})
        current.pop(name)
    for name, uri in desired.items():
        if current.get(name) == uri:
            continue
        try:
            _call(pod_ip, port, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": uri})
            current[name] = uri
        except (OSError, ValueError) as error:
            failures[name] = _error_message(error)
            logger.warning("adapter %s on %s: %s", name, pod_ip, failures[name])
    routes = [
        {"name": r.name, "backends": [b.model_dump() for b in r.backends if b.adapter in current]}
        for r in plan.routes
    ]
    routes = [r for r in routes if r["backends"]]
    try:
        _call(pod_ip, port, "PUT", "/v1/routes", {"routes": routes}, timeout=5)
    except (OSError, ValueError) as error:
        failures[ROUTES_KEY] = _error_message(error)
        logger.warning("routes on %s: %s", pod_ip, failures[ROUTES_KEY])
    return current, failures


def _failed(obj: dict[str, Any], adep: AdapterDeployment, reason: str, message: str) -> dict[str, Any]:
    """Status of an AdapterDeployment that cannot be served as asked."""
    conditions = merge_conditions(
        (obj.get("status") or {}).get("conditions") or [],
        [
            {"type": "Ready", "status": "False", "reason": reason, "message": message},
            {"type": "Degraded", "status": "True", "reason": reason, "message": message},
        ],
        adep.metadata.generation,
        datetime.now(UTC),
    )
    return {
        "observedGeneration": adep.metadata.generation,
        "phase": "Failed",
        "conditions": conditions,
    }


def _write_status(custom: Any, obj: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    previous = obj.get("status") or {}
    if desired != {k: v for k, v in previous.items() if k in desired}:
        meta = obj["metadata"]
        kube.patch_status(custom, PLURAL, meta["namespace"], meta["name"], desired)
    return desired


def reconcile_adapterdeployment(
    api_client: Any, namespace: str, name: str, config: OperatorConfig
) -> dict[str, Any] | None:
    from kubernetes import client

    custom = client.CustomObjectsApi(api_client)

    with kube.serialised(PLURAL, namespace, name):
        obj = kube.get_custom_object(custom, PLURAL, namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return None
        try:
            adep = AdapterDeployment.model_validate(obj)
        except ValidationError as error:
            logger.error("AdapterDeployment %s/%s does not parse: %s", namespace, name, error)
            return None

        problem = serving.unsupported(adep)
        if problem:
            return _write_status(custom, obj, _failed(obj, adep, "Unsupported", problem))

        jobs: dict[str, dict[str, Any]] = {}
        for adapter in adep.spec.adapters:
            if adapter.fine_tune_job and adapter.fine_tune_job not in jobs:
                job = kube.get_custom_object(custom, "finetunejobs", namespace, adapter.fine_tune_job)
                if job is not None:
                    jobs[adapter.fine_tune_job] = job
        resolved = serving.resolve_adapters(adep, jobs)
        plan = serving.serving_plan(adep, resolved)
        job_claims = sorted(
            {
                str(r.uri).removeprefix("pvc://").split("/", 1)[0]
                for r in resolved
                if r.uri and r.uri.startswith("pvc://")
            }
        )

        # Replicas are part of the desired Deployment: they follow spec.replicas, which is what
        # kubectl scale and an HPA change (through the AdapterDeployment's scale subresource).
        children = [
            serving.plan_configmap(adep, plan),
            serving.deployment(adep, plan, config.worker, job_claims),
            serving.service(adep),
        ]
        existing = [
            kube.read(api_client, child["kind"], namespace, child["metadata"]["name"]) for child in children
        ]
        # All or nothing: a Deployment must not start for a Service that belongs to someone else.
        for current in existing:
            if conflict := kube.ownership_problem(current, KIND, adep.metadata.uid):
                return _write_status(custom, obj, _failed(obj, adep, "ChildConflict", conflict))
        for current, desired_child in zip(existing, children, strict=True):
            kube.apply_if_changed(api_client, current, desired_child)

        pods = kube.list_pods(api_client, namespace, serving.selector_string(adep))
        ready_pods = [
            p
            for p in pods
            if not p["metadata"].get("deletionTimestamp")
            and any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in (p.get("status") or {}).get("conditions", [])
            )
        ]
        loaded_by_pod: list[dict[str, str]] = []
        failures: dict[str, str] = {}
        for pod in ready_pods:
            try:
                loaded, pod_failures = sync_pod(pod["status"]["podIP"], adep.spec.service.port, plan)
            except (OSError, ValueError) as error:
                logger.warning("pod %s: %s", pod["metadata"]["name"], _error_message(error))
                continue
            loaded_by_pod.append(loaded)
            failures.update(pod_failures)

        adapters = serving.adapter_statuses(resolved, loaded_by_pod, failures)
        conditions = merge_conditions(
            (obj.get("status") or {}).get("conditions") or [],
            serving.conditions_for(adep, len(ready_pods), adapters, failures.get(ROUTES_KEY)),
            adep.metadata.generation,
            datetime.now(UTC),
        )
        # Replicas as the pods show them: pod events wake this pass, the Deployment's status lags.
        status = {
            "observedGeneration": adep.metadata.generation,
            "replicas": len([p for p in pods if not p["metadata"].get("deletionTimestamp")]),
            "readyReplicas": len(ready_pods),
            "selector": serving.selector_string(adep),
            "phase": serving.phase_for(conditions),
            "conditions": conditions,
            "adapters": adapters,
            "adaptersReady": f"{sum(a['state'] == 'Loaded' for a in adapters)}/{len(adapters)}",
            "endpoint": serving.endpoint(adep),
        }
        return _write_status(custom, obj, status)
