"""One reconcile pass of an AdapterDeployment.

Creates or updates the serving ConfigMap, Deployment and Service, then makes every ready pod serve
exactly the desired adapters and routes by calling its HTTP API (hot swap, no restart), and writes
status from what the pods report. Level-based and idempotent like the FineTuneJob pass.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from kubetune.api import v1alpha1
from kubetune.api.v1alpha1 import AdapterDeployment
from kubetune.operator import serving
from kubetune.operator.reconcile import OperatorConfig, _serialised, get_custom_object
from kubetune.operator.status import merge_conditions

logger = logging.getLogger("kubetune.operator.serving")

PLURAL = "adapterdeployments"


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


def reconcile_adapterdeployment(
    api_client: Any, namespace: str, name: str, config: OperatorConfig
) -> dict[str, Any] | None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    custom = client.CustomObjectsApi(api_client)
    apps = client.AppsV1Api(api_client)
    core = client.CoreV1Api(api_client)

    with _serialised(namespace, f"adep/{name}"):
        obj = get_custom_object(custom, PLURAL, namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return None
        try:
            adep = AdapterDeployment.model_validate(obj)
        except ValidationError as error:
            logger.error("AdapterDeployment %s/%s does not parse: %s", namespace, name, error)
            return None

        problem = serving.unsupported(adep)
        if problem:
            conditions = merge_conditions(
                (obj.get("status") or {}).get("conditions") or [],
                [
                    {"type": "Ready", "status": "False", "reason": "Unsupported", "message": problem},
                    {"type": "Degraded", "status": "True", "reason": "Unsupported", "message": problem},
                ],
                adep.metadata.generation,
                datetime.now(UTC),
            )
            failed = {
                "observedGeneration": adep.metadata.generation,
                "phase": "Failed",
                "conditions": conditions,
            }
            custom.patch_namespaced_custom_object_status(
                v1alpha1.GROUP, v1alpha1.VERSION, namespace, PLURAL, name, {"status": failed}
            )
            return failed

        jobs: dict[str, dict[str, Any]] = {}
        for adapter in adep.spec.adapters:
            if adapter.fine_tune_job and adapter.fine_tune_job not in jobs:
                job = get_custom_object(custom, "finetunejobs", namespace, adapter.fine_tune_job)
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

        configmap = serving.plan_configmap(adep, plan)
        try:
            core.replace_namespaced_config_map(configmap["metadata"]["name"], namespace, configmap)  # type: ignore[arg-type]
        except ApiException as error:
            if error.status != 404:
                raise
            core.create_namespaced_config_map(namespace, configmap)  # type: ignore[arg-type]

        desired = serving.deployment(adep, plan, config.worker, job_claims)
        try:
            existing = apps.read_namespaced_deployment(name, namespace)
            current = api_client.sanitize_for_serialization(existing)
            # Replicas belong to whoever scales spec.replicas (kubectl scale, an HPA through /scale).
            if (
                current["spec"]["template"] != desired["spec"]["template"]
                or current["spec"].get("replicas") != desired["spec"]["replicas"]
            ):
                apps.patch_namespaced_deployment(
                    name,
                    namespace,
                    {
                        "spec": {
                            "replicas": desired["spec"]["replicas"],
                            "template": desired["spec"]["template"],
                        }
                    },
                )
        except ApiException as error:
            if error.status != 404:
                raise
            apps.create_namespaced_deployment(namespace, desired)  # type: ignore[arg-type]
        try:
            core.create_namespaced_service(namespace, serving.service(adep))  # type: ignore[arg-type]
        except ApiException as error:
            if error.status != 409:
                raise

        deployment = api_client.sanitize_for_serialization(apps.read_namespaced_deployment(name, namespace))
        pods = api_client.sanitize_for_serialization(
            core.list_namespaced_pod(namespace, label_selector=serving.selector_string(adep))
        )["items"]
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
        status = {
            "observedGeneration": adep.metadata.generation,
            "replicas": int((deployment.get("status") or {}).get("replicas") or 0),
            "readyReplicas": len(ready_pods),
            "selector": serving.selector_string(adep),
            "phase": serving.phase_for(conditions),
            "conditions": conditions,
            "adapters": adapters,
            "adaptersReady": f"{sum(a['state'] == 'Loaded' for a in adapters)}/{len(adapters)}",
            "endpoint": serving.endpoint(adep),
        }
        if status != {k: v for k, v in (obj.get("status") or {}).items() if k in status}:
            custom.patch_namespaced_custom_object_status(
                v1alpha1.GROUP, v1alpha1.VERSION, namespace, PLURAL, name, {"status": status}
            )
        return status
