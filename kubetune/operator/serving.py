"""Pure builders and status for an AdapterDeployment: ServingPlan, ConfigMap, Deployment, Service.

Adapter changes never touch the Deployment's pod template under ``updateStrategy: HotReload``: the
reconciler pushes them to running pods over HTTP. Under ``Rolling`` the template carries a hash of
the serving plan, so any change rolls the pods.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from kubetune.api.v1alpha1 import AdapterDeployment
from kubetune.operator import kube
from kubetune.operator.builders import LABEL_COMPONENT, LABEL_MANAGED_BY, WorkerSettings, pod_spec_with
from kubetune.operator.render import PVC_MOUNT_ROOT
from kubetune.worker.serving_plan import AdapterEntry, RouteBackend, RouteEntry, ServingPlan

LABEL_ADAPTERDEPLOYMENT = "kubetune.dev/adapterdeployment"
ANNOTATION_PLAN_HASH = "kubetune.dev/serving-plan-sha256"
PLAN_MOUNT = "/etc/kubetune"
PLAN_KEY = "serving.json"
CONTAINER = "server"
#: Download cache for hf:// and s3:// sources (an emptyDir).
CACHE_DIR = "/var/cache/kubetune"


@dataclass(frozen=True)
class AdapterResolution:
    """Where one adapter's artifact is, or why it is not servable yet."""

    name: str
    uri: str | None
    state: str  # Pending (its FineTuneJob has not succeeded) or Resolved
    message: str = ""


def resolve_adapters(adep: AdapterDeployment, jobs: dict[str, dict[str, Any]]) -> list[AdapterResolution]:
    """Map spec.adapters to artifact URIs; ``jobs`` holds the referenced FineTuneJobs by name."""
    out = []
    for adapter in adep.spec.adapters:
        if adapter.uri is not None:
            out.append(AdapterResolution(adapter.name, adapter.uri, "Resolved"))
            continue
        job = jobs.get(str(adapter.fine_tune_job))
        status = (job or {}).get("status") or {}
        if job is None:
            out.append(
                AdapterResolution(
                    adapter.name, None, "Pending", f"FineTuneJob {adapter.fine_tune_job} not found"
                )
            )
        elif status.get("phase") != "Succeeded":
            phase = status.get("phase") or "Pending"
            out.append(
                AdapterResolution(
                    adapter.name, None, "Pending", f"FineTuneJob {adapter.fine_tune_job} is {phase}"
                )
            )
        else:
            uri = (status.get("result") or {}).get("uri") or job["spec"]["output"]["uri"]
            out.append(AdapterResolution(adapter.name, uri, "Resolved"))
    return out


def base_model_name(adep: AdapterDeployment) -> str:
    """The base model's name in the API: the Hub id (org/name) or the path's last segment, as vLLM
    names it; suffixed with -base if an adapter or route already uses that name."""
    uri = adep.spec.model.uri
    name = uri.removeprefix("hf://") if uri.startswith("hf://") else uri.rstrip("/").rsplit("/", 1)[-1]
    taken = {a.name for a in adep.spec.adapters} | {r.name for r in adep.spec.routes}
    return f"{name}-base" if name in taken else name


def serving_plan(adep: AdapterDeployment, resolved: list[AdapterResolution]) -> ServingPlan:
    ready = {r.name for r in resolved if r.uri is not None}
    routes = [
        RouteEntry(
            name=route.name,
            backends=[
                RouteBackend(adapter=b.adapter, weight=b.weight) for b in route.backends if b.adapter in ready
            ],
        )
        for route in adep.spec.routes
        if any(b.adapter in ready for b in route.backends)
    ]
    return ServingPlan(
        model_uri=adep.spec.model.uri,
        model_revision=adep.spec.model.revision,
        trust_remote_code=adep.spec.model.trust_remote_code,
        served_model_name=base_model_name(adep),
        adapters=[AdapterEntry(name=r.name, uri=r.uri) for r in resolved if r.uri is not None],
        routes=routes,
        pvc_mount_root=PVC_MOUNT_ROOT,
        cache_dir=CACHE_DIR,
    )


def plan_sha256(plan: ServingPlan) -> str:
    return hashlib.sha256(plan.model_dump_json().encode()).hexdigest()


def _owner(adep: AdapterDeployment) -> dict[str, Any]:
    return kube.owner_reference("AdapterDeployment", adep.metadata)


def selector_labels(adep: AdapterDeployment) -> dict[str, str]:
    return {LABEL_ADAPTERDEPLOYMENT: str(adep.metadata.name), LABEL_COMPONENT: "server"}


def selector_string(adep: AdapterDeployment) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(adep).items())


def _meta(adep: AdapterDeployment, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": adep.metadata.namespace,
        "labels": {**selector_labels(adep), LABEL_MANAGED_BY: "kubetune"},
        "ownerReferences": [_owner(adep)],
    }


def configmap_name(adep: AdapterDeployment) -> str:
    return f"{adep.metadata.name}-serving"


def plan_configmap(adep: AdapterDeployment, plan: ServingPlan) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(adep, configmap_name(adep)),
        "data": {PLAN_KEY: plan.model_dump_json(indent=2)},
    }


def _claims(adep: AdapterDeployment) -> list[str]:
    uris = [adep.spec.model.uri, *(a.uri for a in adep.spec.adapters if a.uri)]
    return sorted({u.removeprefix("pvc://").split("/", 1)[0] for u in uris if u.startswith("pvc://")})


def deployment(
    adep: AdapterDeployment, plan: ServingPlan, settings: WorkerSettings, extra_claims: list[str]
) -> dict[str, Any]:
    """The serving Deployment. ``extra_claims`` are claims of FineTuneJob outputs it serves."""
    spec = adep.spec
    overrides = spec.pod_template
    port = spec.service.port
    claims = sorted(set(_claims(adep)) | set(extra_claims))
    volumes: list[dict[str, Any]] = [{"name": "plan", "configMap": {"name": configmap_name(adep)}}]
    mounts: list[dict[str, Any]] = [{"name": "plan", "mountPath": PLAN_MOUNT, "readOnly": True}]
    for index, claim in enumerate(claims):
        volumes.append(
            {"name": f"claim-{index}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append({"name": f"claim-{index}", "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": True})
    volumes.append({"name": "cache", "emptyDir": {}})
    mounts.append({"name": "cache", "mountPath": CACHE_DIR})

    resources: dict[str, Any] = {}
    amounts = {k: v for k, v in (("cpu", spec.resources.cpu), ("memory", spec.resources.memory)) if v}
    if amounts:
        resources["requests"] = dict(amounts)
    limits = dict(amounts)
    if spec.resources.gpus:
        limits[spec.resources.gpu_resource_name] = str(spec.resources.gpus)
    if limits:
        resources["limits"] = limits

    secrets = dict.fromkeys(
        s for s in [adep.spec.model.credentials_secret, *(a.credentials_secret for a in spec.adapters)] if s
    )
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or settings.server_image or settings.image,
        "imagePullPolicy": settings.server_image_pull_policy or settings.image_pull_policy,
        "command": ["python", "-m", "kubetune", "serve", "--plan", f"{PLAN_MOUNT}/{PLAN_KEY}"],
        "args": ["--host", "0.0.0.0", "--port", str(port)],
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *(overrides.env if overrides and overrides.env else []),
        ],
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": port},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        # Loading a large base model takes minutes: the startup probe gives it 30 minutes.
        "startupProbe": {
            "httpGet": {"path": "/health", "port": port},
            "periodSeconds": 2,
            "failureThreshold": 900,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": port},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "volumeMounts": mounts,
        "resources": resources,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    if secrets:
        container["envFrom"] = [{"secretRef": {"name": s}} for s in secrets]
    annotations = dict(overrides.annotations) if overrides and overrides.annotations else {}
    if spec.update_strategy == "Rolling":
        annotations[ANNOTATION_PLAN_HASH] = plan_sha256(plan)
    pod_spec = pod_spec_with(
        [container],
        volumes,
        overrides,
        service_account=settings.server_service_account,
        image_pull_secrets=settings.image_pull_secrets,
    )
    labels = {
        **(overrides.labels if overrides and overrides.labels else {}),
        **selector_labels(adep),
        # The operator's pod watch selects on it (server-side), for worker and serving pods alike.
        LABEL_MANAGED_BY: "kubetune",
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(adep, str(adep.metadata.name)),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(adep)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec},
        },
    }


def service(adep: AdapterDeployment) -> dict[str, Any]:
    port = adep.spec.service.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(adep, str(adep.metadata.name)),
        "spec": {
            "type": adep.spec.service.type,
            "selector": selector_labels(adep),
            "ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def endpoint(adep: AdapterDeployment) -> str:
    return f"http://{adep.metadata.name}.{adep.metadata.namespace}.svc:{adep.spec.service.port}/v1"


def unsupported(adep: AdapterDeployment) -> str | None:
    """Why this operator version cannot serve the object as asked, or None. Said in status, never
    silently ignored."""
    if adep.spec.runtime == "vllm":
        return "runtime vllm is not supported by this operator version yet; use runtime kubetune"
    if adep.spec.merge_adapter:
        return "mergeAdapter is not supported by this operator version yet"
    return None


# -- status ------------------------------------------------------------------------------------------


def adapter_statuses(
    resolved: list[AdapterResolution], loaded_by_pod: list[dict[str, str]], failures: dict[str, str]
) -> list[dict[str, Any]]:
    """Per adapter: how many ready pods serve the desired source. ``loaded_by_pod``: one dict per ready
    pod, adapter name -> source; ``failures``: adapter name -> last load error."""
    out = []
    for r in resolved:
        count = sum(1 for pod in loaded_by_pod if r.uri is not None and pod.get(r.name) == r.uri)
        if r.uri is None:
            state, message = "Pending", r.message
        elif r.name in failures:
            state, message = "Failed", failures[r.name]
        elif loaded_by_pod and count == len(loaded_by_pod):
            state, message = "Loaded", ""
        else:
            state, message = "Loading", f"loaded on {count}/{len(loaded_by_pod)} ready replicas"
        out.append(
            {
                "name": r.name,
                "source": r.uri or "",
                "state": state,
                "loadedReplicas": count,
                "message": message,
            }
        )
    return out


def conditions_for(
    adep: AdapterDeployment,
    ready_replicas: int,
    adapters: list[dict[str, Any]],
    route_error: str | None = None,
) -> list[dict[str, Any]]:
    wanted = adep.spec.replicas
    loaded = sum(1 for a in adapters if a["state"] == "Loaded")
    failed = [a for a in adapters if a["state"] == "Failed"]
    ready = ready_replicas >= wanted and (wanted == 0 or ready_replicas > 0)
    all_loaded = loaded == len(adapters)

    def condition(kind: str, status: bool, reason: str, message: str = "") -> dict[str, Any]:
        return {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message}

    return [
        condition(
            "Ready",
            ready and all_loaded,
            "Serving" if ready and all_loaded else "NotReady",
            f"{ready_replicas}/{wanted} replicas ready, {loaded}/{len(adapters)} adapters loaded",
        ),
        condition(
            "Progressing",
            not (ready and all_loaded),
            "Rollout" if not ready else ("LoadingAdapters" if not all_loaded else "Complete"),
        ),
        condition("AdaptersLoaded", all_loaded, "AllLoaded" if all_loaded else "NotAllLoaded"),
        condition(
            "Degraded",
            bool(failed or route_error),
            "AdapterFailed" if failed else ("RoutesRejected" if route_error else "Healthy"),
            "; ".join(
                [
                    *(f"{a['name']}: {a['message']}" for a in failed),
                    *([f"routes: {route_error}"] if route_error else []),
                ]
            ),
        ),
    ]


def phase_for(conditions: list[dict[str, Any]]) -> str:
    true = {c["type"] for c in conditions if c["status"] == "True"}
    if "Degraded" in true:
        return "Degraded"
    if "Ready" in true:
        return "Ready"
    return "Progressing"
