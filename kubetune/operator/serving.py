"""Pure builders and status for an AdapterDeployment: ServingPlan, ConfigMap, Deployment, Service.

Adapter changes never touch the Deployment's pod template under ``updateStrategy: HotReload``: the
reconciler pushes them to running pods over HTTP. Under ``Rolling`` the template carries a hash of
the serving plan, so any change rolls the pods.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

from kubetune.api import methods
from kubetune.api.v1alpha1 import AdapterDeployment
from kubetune.operator import events, kube
from kubetune.operator.config import WorkerSettings
from kubetune.operator.pods import LABEL_COMPONENT, LABEL_MANAGED_BY, pod_spec_with
from kubetune.operator.render import PVC_MOUNT_ROOT
from kubetune.worker.serving_plan import AdapterEntry, RouteBackend, RouteEntry, ServingPlan

LABEL_ADAPTERDEPLOYMENT = "kubetune.dev/adapterdeployment"
ANNOTATION_PLAN_HASH = "kubetune.dev/serving-plan-sha256"
PLAN_MOUNT = "/etc/kubetune"
PLAN_KEY = "serving.json"
CONTAINER = "server"
#: Download cache for hf:// and s3:// sources (an emptyDir).
CACHE_DIR = "/var/cache/kubetune"
#: The admin token (a Secret the operator creates per AdapterDeployment): its key and mount.
ADMIN_TOKEN_KEY = "token"
ADMIN_TOKEN_DIR = "/var/run/kubetune/admin"
#: The user's API keys (spec.apiKeysSecret): its key and mount.
API_KEYS_KEY = "keys"
API_KEYS_DIR = "/var/run/kubetune/api-keys"
#: vLLM (runtime vllm) when spec.image is unset; its entrypoint is `vllm serve`.
VLLM_IMAGE = "docker.io/vllm/vllm-openai:v0.11.0"
#: The --max-lora-rank values vLLM accepts (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: LoRA rank when a FineTuneJob does not set one (the API's default).
DEFAULT_LORA_RANK = 16
#: Mode of the token files. Readable by the server's non-root user without relying on fsGroup
#: ownership (kubelet would make 0440 files group-owned by fsGroup; not every node agent does, the
#: local cluster's included); nothing else runs in the container.
TOKEN_FILE_MODE = 0o444


@dataclass(frozen=True)
class AdapterResolution:
    """Where one adapter's artifact is, or why it is not servable yet."""

    name: str
    uri: str | None
    state: str  # Pending (its FineTuneJob has not succeeded) or Resolved
    message: str = ""
    #: The artifact's recorded sha256 (its FineTuneJob's status.result.sha256): pods refuse another.
    sha256: str | None = None
    #: Its method and LoRA settings, when its FineTuneJob says (a bare uri does not).
    method: str | None = None
    rank: int | None = None
    dora: bool = False
    #: Why the runtime cannot serve it (then it is Failed with reason Unsupported, never loaded).
    problem: str = ""


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
            result = status.get("result") or {}
            uri = result.get("uri") or job["spec"]["output"]["uri"]
            method = (job["spec"].get("method") or {}).get("type")
            lora = (job["spec"].get("method") or {}).get("lora") or {}
            out.append(
                AdapterResolution(
                    adapter.name,
                    uri,
                    "Resolved",
                    sha256=result.get("sha256") or None,
                    method=method,
                    rank=lora.get("rank", DEFAULT_LORA_RANK) if _vllm_method(method) else None,
                    dora=bool(lora.get("dora")),
                )
            )
    return out


def base_model_name(adep: AdapterDeployment) -> str:
    """The base model's name in the API: the Hub id (org/name) or the path's last segment, as vLLM
    names it; suffixed with -base if an adapter or route already uses that name."""
    uri = adep.spec.model.uri
    name = uri.removeprefix("hf://") if uri.startswith("hf://") else uri.rstrip("/").rsplit("/", 1)[-1]
    taken = {a.name for a in adep.spec.adapters} | {r.name for r in adep.spec.routes}
    return f"{name}-base" if name in taken else name


def serving_plan(
    adep: AdapterDeployment, resolved: list[AdapterResolution], canaries: list[dict[str, Any]] | None = None
) -> ServingPlan:
    """The plan; ``canaries`` (status.canaries) set the weights of routes whose canary runs."""
    resolved = [r for r in resolved if not r.problem]
    ready = {r.name for r in resolved if r.uri is not None}
    by_route = {c["route"]: c for c in canaries or []}
    routes = []
    for route in adep.spec.routes:
        weights = canary_weights(route, by_route.get(route.name))
        backends = [RouteBackend(adapter=a, weight=w) for a, w in weights if a in ready]
        if backends:
            routes.append(RouteEntry(name=route.name, backends=backends))
    return ServingPlan(
        model_uri=adep.spec.model.uri,
        model_revision=adep.spec.model.revision,
        trust_remote_code=adep.spec.model.trust_remote_code,
        served_model_name=base_model_name(adep),
        adapters=[
            AdapterEntry(name=r.name, uri=r.uri, sha256=r.sha256) for r in resolved if r.uri is not None
        ],
        routes=routes,
        pvc_mount_root=PVC_MOUNT_ROOT,
        cache_dir=CACHE_DIR,
        merge_adapter=adep.spec.merge_adapter,
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
        # Fields at their defaults are left out: a serving image older than the operator still
        # reads every plan that uses nothing it lacks.
        "data": {PLAN_KEY: plan.model_dump_json(indent=2, exclude_defaults=True)},
    }


def _claims(adep: AdapterDeployment) -> list[str]:
    uris = [adep.spec.model.uri, *(a.uri for a in adep.spec.adapters if a.uri)]
    return sorted({u.removeprefix("pvc://").split("/", 1)[0] for u in uris if u.startswith("pvc://")})


def _probes(port: int, ready_path: str) -> dict[str, Any]:
    return {
        "readinessProbe": {
            "httpGet": {"path": ready_path, "port": port},
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
    }


_LOCKED_DOWN = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _kubetune_container(
    adep: AdapterDeployment,
    settings: WorkerSettings,
    port: int,
    mounts: list[dict[str, Any]],
    resources: dict[str, Any],
    auth_env: list[dict[str, Any]],
) -> dict[str, Any]:
    overrides = adep.spec.pod_template
    return {
        "name": CONTAINER,
        "image": adep.spec.image or settings.server_image or settings.image,
        "imagePullPolicy": settings.server_image_pull_policy or settings.image_pull_policy,
        "command": ["python", "-m", "kubetune", "serve", "--plan", f"{PLAN_MOUNT}/{PLAN_KEY}"],
        "args": ["--host", "0.0.0.0", "--port", str(port)],
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *(overrides.env if overrides and overrides.env else []),
            *auth_env,
        ],
        "ports": [{"name": "http", "containerPort": port}],
        # Ready once every declared adapter has been tried: a replica turns ready with the adapters
        # that load, and reports the others as Failed instead of waiting for them.
        **_probes(port, "/ready"),
        "volumeMounts": mounts,
        "resources": resources,
        "securityContext": dict(_LOCKED_DOWN),
    }


# -- runtime vllm ------------------------------------------------------------------------------------


def _vllm_method(method: str | None) -> bool:
    """Whether the method's artifacts are plain PEFT LoRA adapters, the only kind vLLM loads."""
    info = methods.registry().get(method or "")
    return info is not None and info.serving.vllm


def vllm_path(uri: str) -> str | None:
    """Where vLLM reads an artifact or model: the claim's mount, a Hub id, a local path; None for
    what it cannot read (s3://)."""
    if uri.startswith("pvc://"):
        return f"{PVC_MOUNT_ROOT}/{uri.removeprefix('pvc://')}"
    if uri.startswith("hf://"):
        return uri.removeprefix("hf://")
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    return None


def vllm_refusals(adep: AdapterDeployment, resolved: list[AdapterResolution]) -> list[AdapterResolution]:
    """``resolved`` with a ``problem`` on every adapter vLLM cannot serve: other methods than LoRA,
    DoRA, ranks above 512, sources it cannot read. (``modules_to_save``, which vLLM also refuses,
    is in the artifact: vLLM's load call says so, and the adapter is Failed with its message.)"""
    out = []
    for r in resolved:
        problem = ""
        if r.method is not None and not _vllm_method(r.method):
            problem = f"runtime vllm serves LoRA adapters only, not method {r.method}; use runtime kubetune"
        elif r.dora:
            problem = "runtime vllm cannot serve DoRA adapters; use runtime kubetune"
        elif r.rank is not None and r.rank > VLLM_LORA_RANKS[-1]:
            problem = f"rank {r.rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})"
        elif r.uri is not None and vllm_path(r.uri) is None:
            problem = (
                f"runtime vllm reads adapters from pvc://, hf:// or file://, not {r.uri.split(':', 1)[0]}://"
            )
        out.append(replace(r, problem=problem) if problem else r)
    return out


def vllm_unsupported(adep: AdapterDeployment) -> str | None:
    """What about the whole object runtime vllm cannot do, or None."""
    spec = adep.spec
    problems = []
    if vllm_path(spec.model.uri) is None:
        problems.append("runtime vllm reads the model from pvc://, hf:// or file://")
    if spec.routes:
        problems.append("routes need runtime kubetune (vLLM has no weighted aliases)")
    if spec.api_keys_secret:
        problems.append(
            "apiKeysSecret needs runtime kubetune: vLLM's --api-key guards inference and adapter loading "
            "alike, so a client key would also load adapters (clients of runtime vllm use the admin token)"
        )
    return "; ".join(problems) or None


def vllm_lora_limits(resolved: list[AdapterResolution]) -> tuple[int, int]:
    """(--max-loras, --max-lora-rank) for the adapters vLLM will serve.

    --max-loras is the adapter count rounded up to a power of two, so that adding an adapter rarely
    changes the arguments (which rolls the pods); --max-lora-rank the smallest value vLLM accepts
    that covers every known rank, and at least vLLM's default (16) when a rank is unknown (a bare
    uri; vLLM's load call reports one that does not fit).
    """
    servable = [r for r in resolved if not r.problem]
    max_loras = 1
    while max_loras < len(servable):
        max_loras *= 2
    ranks = [r.rank for r in servable if r.rank is not None]
    needed = max(ranks, default=DEFAULT_LORA_RANK)
    if len(ranks) < len(servable):
        needed = max(needed, DEFAULT_LORA_RANK)
    return max_loras, next(rank for rank in VLLM_LORA_RANKS if rank >= needed)


def _vllm_container(
    adep: AdapterDeployment, plan: ServingPlan, resolved: list[AdapterResolution], port: int
) -> dict[str, Any]:
    spec = adep.spec
    max_loras, max_rank = vllm_lora_limits(resolved)
    args = [
        "--host", "0.0.0.0",
        "--port", str(port),
        "--served-model-name", plan.served_model_name,
        "--enable-lora",
        "--max-loras", str(max_loras),
        "--max-lora-rank", str(max_rank),
    ]  # fmt: skip
    if spec.model.revision:
        args += ["--revision", spec.model.revision]
    if spec.model.trust_remote_code:
        args.append("--trust-remote-code")
    if spec.resources.gpus > 1:
        args += ["--tensor-parallel-size", str(spec.resources.gpus)]
    return {
        "name": CONTAINER,
        "image": spec.image or VLLM_IMAGE,
        "command": ["vllm", "serve", str(vllm_path(spec.model.uri))],
        "args": args,
        "env": [
            # Adapters come and go through /v1/load_lora_adapter and /v1/unload_lora_adapter.
            {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"},
            # vLLM's --api-key guards every /v1 endpoint, adapter loading included; from the
            # environment the token stays out of the process's arguments.
            {
                "name": "VLLM_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": admin_secret_name(adep), "key": ADMIN_TOKEN_KEY}},
            },
            # The root filesystem is read-only: Hub downloads go to the cache volume, compiler
            # caches under /tmp.
            {"name": "HF_HOME", "value": CACHE_DIR},
            {"name": "HOME", "value": "/tmp"},
        ],
        "ports": [{"name": "http", "containerPort": port}],
        # vLLM answers /health once its engine runs; adapters are loaded by the operator after.
        **_probes(port, "/health"),
        "securityContext": dict(_LOCKED_DOWN),
    }


def deployment(
    adep: AdapterDeployment,
    plan: ServingPlan,
    settings: WorkerSettings,
    extra_claims: list[str],
    resolved: list[AdapterResolution] | None = None,
) -> dict[str, Any]:
    """The serving Deployment. ``extra_claims`` are claims of FineTuneJob outputs it serves;
    ``resolved`` (runtime vllm) gives the adapters' ranks for ``--max-lora-rank``."""
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
    if spec.runtime == "vllm":
        # PyTorch's tensor-parallel workers share tensors through /dev/shm (64 MiB in a container).
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    # Mounted whole (not subPath), so a rotated Secret reaches running pods, which re-read the file.
    auth_env = []
    for volume, secret, key, directory, variable in (
        (
            "admin-token",
            admin_secret_name(adep),
            ADMIN_TOKEN_KEY,
            ADMIN_TOKEN_DIR,
            "KUBETUNE_ADMIN_TOKEN_FILE",
        ),
        ("api-keys", spec.api_keys_secret, API_KEYS_KEY, API_KEYS_DIR, "KUBETUNE_API_KEY_FILE"),
    ):
        if secret is None or spec.runtime == "vllm":  # vLLM takes its key from the environment
            continue
        volumes.append(
            {
                "name": volume,
                "secret": {
                    "secretName": secret,
                    "items": [{"key": key, "path": key}],
                    "defaultMode": TOKEN_FILE_MODE,
                },
            }
        )
        mounts.append({"name": volume, "mountPath": directory, "readOnly": True})
        auth_env.append({"name": variable, "value": f"{directory}/{key}"})

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
    if spec.runtime == "vllm":
        container = _vllm_container(adep, plan, resolved or [], port)
        container["imagePullPolicy"] = settings.server_image_pull_policy or settings.image_pull_policy
        container["env"] = [*(overrides.env if overrides and overrides.env else []), *container["env"]]
        container.update(volumeMounts=mounts, resources=resources)
    else:
        container = _kubetune_container(adep, settings, port, mounts, resources, auth_env)
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


def admin_secret_name(adep: AdapterDeployment) -> str:
    return f"{adep.metadata.name}-admin-token"


def admin_secret(adep: AdapterDeployment, token: str) -> dict[str, Any]:
    """The Secret holding the admin token the pods require and the operator sends. Applied once,
    when absent: ``token`` is random, so applying it again would rotate it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(adep, admin_secret_name(adep)),
        "type": "Opaque",
        "data": {ADMIN_TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def admin_token(secret: dict[str, Any] | None) -> str | None:
    """The token a (wire form) admin Secret holds, or None when it holds none."""
    value = ((secret or {}).get("data") or {}).get(ADMIN_TOKEN_KEY)
    token = base64.b64decode(value).decode().strip() if value else ""
    return token or None


def disruption_budget_name(adep: AdapterDeployment) -> str:
    return str(adep.metadata.name)


def disruption_budget(adep: AdapterDeployment) -> dict[str, Any] | None:
    """A PodDisruptionBudget keeping all but one replica through voluntary disruptions (node drains),
    or None for a single replica, which a budget could only block."""
    if adep.spec.replicas <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(adep, disruption_budget_name(adep)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(adep)}},
    }


def endpoint(adep: AdapterDeployment) -> str:
    return f"http://{adep.metadata.name}.{adep.metadata.namespace}.svc:{adep.spec.service.port}/v1"


def unsupported(adep: AdapterDeployment) -> str | None:
    """Why this operator version cannot serve the object as asked, or None. Said in status, never
    silently ignored."""
    if adep.spec.runtime == "vllm" and (problem := vllm_unsupported(adep)):
        return problem
    if adep.spec.merge_adapter and adep.spec.runtime == "vllm":
        return "mergeAdapter needs runtime kubetune (vLLM serves adapters unmerged)"
    return None


# -- progressive canary ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterTraffic:
    """What the pods counted for one adapter (summed over the ready pods): requests it served, those
    that failed (5xx), and the sum of their latencies in seconds. Counters: they only grow while the
    pods live."""

    requests: float = 0.0
    errors: float = 0.0
    latency_seconds: float = 0.0


def canary_weights(route: Any, canary: dict[str, Any] | None) -> list[tuple[str, int]]:
    """The route's backends and weights as its canary has them now: the canary adapter at its
    step's percent, the others sharing the rest by their weights (at least 1 each while there is a
    rest); a rolled-back canary gets nothing, a promoted one everything."""
    declared = [(b.adapter, b.weight) for b in route.backends]
    spec = route.canary
    if spec is None:
        return declared
    state = (canary or {}).get("state", "Progressing")
    share = {"RolledBack": 0, "Promoted": 100}.get(state, int((canary or {}).get("weight") or spec.steps[0]))
    others = [(a, w) for a, w in declared if a != spec.adapter]
    total = sum(w for _, w in others)
    if not others or share >= 100:
        return [(spec.adapter, 100)]
    rest = [(a, max(1, round(w * (100 - share) / total))) for a, w in others]
    return [*([(spec.adapter, share)] if share > 0 else []), *rest]


def canary_progress(
    route: Any, previous: dict[str, Any] | None, traffic: AdapterTraffic, now: float
) -> tuple[dict[str, Any], events.Transition | None]:
    """The canary's next status entry and the Event of its transition, if any (pure).

    A step moves on once it has lasted ``stepSeconds`` and the adapter served ``minRequests`` in it
    within bounds; it rolls back as soon as ``minRequests`` show an error rate or mean latency out of
    bounds. Figures are deltas of the pods' counters since the step started; counters that went down
    (a pod restarted) start the step's count again.
    """
    spec = route.canary

    def entry(step: int, state: str, message: str, base: AdapterTraffic = traffic) -> dict[str, Any]:
        weight = {"RolledBack": 0, "Promoted": 100}.get(state, spec.steps[step])
        return {
            "route": route.name,
            "adapter": spec.adapter,
            "state": state,
            "step": step,
            "weight": weight,
            "stepStartedAt": now if base is traffic else (previous or {}).get("stepStartedAt", now),
            "baseRequests": base.requests,
            "baseErrors": base.errors,
            "baseLatencySeconds": base.latency_seconds,
            "message": message,
        }

    if previous is None or previous.get("adapter") != spec.adapter:
        start = entry(0, "Progressing", f"started at {spec.steps[0]}%")
        return start, events.Transition(
            events.NORMAL, "CanaryStarted", f"route {route.name}: {spec.adapter} at {spec.steps[0]}%"
        )
    if previous.get("state") in ("Promoted", "RolledBack"):
        return previous, None
    step = min(int(previous.get("step", 0)), len(spec.steps) - 1)
    base = AdapterTraffic(
        previous.get("baseRequests", 0.0),
        previous.get("baseErrors", 0.0),
        previous.get("baseLatencySeconds", 0.0),
    )
    requests = traffic.requests - base.requests
    errors = traffic.errors - base.errors
    latency = traffic.latency_seconds - base.latency_seconds
    if requests < 0 or errors < 0 or latency < 0:  # a pod restarted: count this step again
        return {
            **entry(step, "Progressing", "counters reset; counting this step again"),
            "stepStartedAt": previous.get("stepStartedAt", now),
        }, None
    if requests < spec.min_requests:
        return previous, None
    error_rate, mean_latency = errors / requests, latency / max(requests - errors, 1)
    figures = f"{int(requests)} requests, error rate {error_rate:.1%}, mean latency {mean_latency:.3f} s"
    too_slow = spec.max_mean_latency_seconds is not None and mean_latency > spec.max_mean_latency_seconds
    if error_rate > spec.max_error_rate or too_slow:
        why = (
            f"error rate above {spec.max_error_rate:.1%}"
            if error_rate > spec.max_error_rate
            else (f"mean latency above {spec.max_mean_latency_seconds} s")
        )
        message = f"rolled back at {spec.steps[step]}%: {figures}, {why}"
        return entry(step, "RolledBack", message), events.Transition(
            events.WARNING, "CanaryRolledBack", f"route {route.name}: {spec.adapter} {message}"
        )
    if now - float(previous.get("stepStartedAt", now)) < spec.step_seconds:
        return previous, None
    if step + 1 >= len(spec.steps):
        message = f"promoted: {figures} at {spec.steps[step]}%"
        return entry(step, "Promoted", message), events.Transition(
            events.NORMAL, "CanaryPromoted", f"route {route.name}: {spec.adapter} {message}"
        )
    message = f"{spec.steps[step]}% -> {spec.steps[step + 1]}%: {figures}"
    return entry(step + 1, "Progressing", message), events.Transition(
        events.NORMAL, "CanaryStepped", f"route {route.name}: {spec.adapter} {message}"
    )


# -- status ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodReport:
    """What one ready pod serves. ``loaded``: adapter name -> source it serves; ``failures``: adapter
    name -> (reason, message) of its failed load (the pod's own record, or this pass's load call)."""

    loaded: dict[str, str] = field(default_factory=dict)
    failures: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: Decode latency, ms per token, by adapter name and for the base (``BASE_LATENCY``), as the
    #: pod's probe measured it; ``unmerged_ms_per_token``: mergeAdapter's adapter before merging.
    ms_per_token: dict[str, float] = field(default_factory=dict)
    unmerged_ms_per_token: dict[str, float] = field(default_factory=dict)


#: Key of the base model in :attr:`PodReport.ms_per_token`.
BASE_LATENCY = ""


def pod_latencies(report: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """(ms_per_token, unmerged_ms_per_token) from a kubetune pod's ``GET /v1/adapters``."""
    probed: dict[str, float] = {}
    unmerged: dict[str, float] = {}
    base = report.get("base") or {}
    if isinstance(base.get("ms_per_token"), int | float):
        probed[BASE_LATENCY] = float(base["ms_per_token"])
    for adapter in report.get("adapters") or []:
        if isinstance(adapter.get("ms_per_token"), int | float):
            probed[adapter["name"]] = float(adapter["ms_per_token"])
        if isinstance(adapter.get("unmerged_ms_per_token"), int | float):
            unmerged[adapter["name"]] = float(adapter["unmerged_ms_per_token"])
    return probed, unmerged


def _median_ms(values: list[float]) -> float | None:
    """The replicas' median, rounded to 0.01 ms: a status field, so it changes only when a probe
    does (a new load or a new pod)."""
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    value = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return round(value, 2)


def base_ms_per_token(reports: list[PodReport]) -> float | None:
    """status.baseMsPerToken: the base model's decode latency across the ready replicas."""
    return _median_ms([r.ms_per_token[BASE_LATENCY] for r in reports if BASE_LATENCY in r.ms_per_token])


def adapter_statuses(resolved: list[AdapterResolution], reports: list[PodReport]) -> list[dict[str, Any]]:
    """Per adapter: its state across the ready pods, how many serve the desired source, and why it
    failed where it did."""
    out = []
    for r in resolved:
        count = sum(1 for pod in reports if r.uri is not None and pod.loaded.get(r.name) == r.uri)
        failures = [pod.failures[r.name] for pod in reports if r.name in pod.failures]
        reason = ""
        if r.uri is None:
            state, message = "Pending", r.message
        elif r.problem:
            state, reason, message = "Failed", "Unsupported", r.problem
        elif failures and count < len(reports):
            state, (reason, message) = "Failed", failures[0]
            if len(reports) > 1:
                message = f"{message} (on {len(failures)}/{len(reports)} ready replicas)"
        elif reports and count == len(reports):
            state, message = "Loaded", ""
        else:
            state, message = "Loading", f"loaded on {count}/{len(reports)} ready replicas"
        entry: dict[str, Any] = {
            "name": r.name,
            "source": r.uri or "",
            "sha256": r.sha256 or "",
            "state": state,
            "loadedReplicas": count,
            "reason": reason,
            "message": message,
        }
        # Left out while unknown: a null would be dropped by the apiserver and rewritten every pass.
        serving_pods = [pod for pod in reports if r.uri is not None and pod.loaded.get(r.name) == r.uri]
        for key, values in (
            ("msPerToken", [pod.ms_per_token[r.name] for pod in serving_pods if r.name in pod.ms_per_token]),
            (
                "unmergedMsPerToken",
                [
                    pod.unmerged_ms_per_token[r.name]
                    for pod in serving_pods
                    if r.name in pod.unmerged_ms_per_token
                ],
            ),
        ):
            if (value := _median_ms(values)) is not None:
                entry[key] = value
        out.append(entry)
    return out


def adapter_events(
    previous: list[dict[str, Any]], current: list[dict[str, Any]], *, failures_in_condition: bool = False
) -> list[events.Transition]:
    """Events (type, reason, message) for adapters whose state changed into or out of Failed since
    the last status: a Warning when one fails (or fails for another reason, or its source changed),
    a Normal event when a failed one loads.

    ``failures_in_condition``: the same status write turns Degraded to AdapterFailed, whose own
    Event (one per condition transition) names every failed adapter with its reason and message;
    the failures are then left out here, so that one failure is one Event.
    """
    before = {a.get("name"): a for a in previous}
    out = []
    for adapter in current:
        old = before.get(adapter["name"]) or {}
        was_failed = old.get("state") == "Failed"
        if adapter["state"] == "Failed" and failures_in_condition:
            continue
        if adapter["state"] == "Failed":
            same = was_failed and (old.get("reason"), old.get("source")) == (
                adapter["reason"],
                adapter["source"],
            )
            if not same:
                out.append(
                    events.Transition(
                        events.WARNING,
                        "AdapterFailed",
                        f"adapter {adapter['name']} ({adapter['source']}): {adapter['reason']}: "
                        f"{adapter['message']}"[:1024],
                    )
                )
        elif adapter["state"] == "Loaded" and was_failed:
            out.append(
                events.Transition(
                    events.NORMAL, "AdapterLoaded", f"adapter {adapter['name']} loaded after failing"
                )
            )
    return out


def conditions_for(
    adep: AdapterDeployment,
    ready_replicas: int,
    adapters: list[dict[str, Any]],
    route_error: str | None = None,
    admin_error: str | None = None,
    canaries: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Ready: the replicas are ready and every adapter is settled (Loaded, or Failed and reported);
    Degraded: something declared does not serve."""
    wanted = adep.spec.replicas
    loaded = sum(1 for a in adapters if a["state"] == "Loaded")
    failed = [a for a in adapters if a["state"] == "Failed"]
    ready = ready_replicas >= wanted and (wanted == 0 or ready_replicas > 0)
    settled = all(a["state"] in ("Loaded", "Failed") for a in adapters)
    all_loaded = loaded == len(adapters)

    def condition(kind: str, status: bool, reason: str, message: str = "") -> dict[str, Any]:
        return {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message}

    rolling = [c for c in canaries or [] if c["state"] == "Progressing"]
    if admin_error:
        degraded_reason = "AdminUnauthorized"
    elif failed:
        degraded_reason = "AdapterFailed"
    elif route_error:
        degraded_reason = "RoutesRejected"
    else:
        degraded_reason = "Healthy"
    canary_conditions = []
    if canaries:
        states = {c["state"] for c in canaries}
        reason = next(f"Canary{s}" for s in ("RolledBack", "Progressing", "Promoted") if s in states)
        canary_conditions.append(
            condition(
                "Canary",
                bool(rolling),
                reason,
                "; ".join(
                    f"{c['route']}: {c['adapter']} at {c['weight']}%: {c['message']}" for c in canaries
                ),
            )
        )
    return [
        *canary_conditions,
        condition(
            "Ready",
            ready and settled,
            "Serving" if ready and settled else "NotReady",
            f"{ready_replicas}/{wanted} replicas ready, {loaded}/{len(adapters)} adapters loaded"
            + (f", {len(failed)} failed" if failed else ""),
        ),
        condition(
            "Progressing",
            not (ready and settled) or bool(rolling),
            "Rollout"
            if not ready
            else ("LoadingAdapters" if not settled else ("Canary" if rolling else "Complete")),
        ),
        condition("AdaptersLoaded", all_loaded, "AllLoaded" if all_loaded else "NotAllLoaded"),
        condition(
            "Degraded",
            degraded_reason != "Healthy",
            degraded_reason,
            "; ".join(
                [
                    *([f"admin API: {admin_error}"] if admin_error else []),
                    *(f"{a['name']}: {a['reason']}: {a['message']}" for a in failed),
                    *([f"routes: {route_error}"] if route_error else []),
                ]
            ),
        ),
    ]


#: Adapter failures that no retry fixes; only a change does (the spec, the FineTuneJob's artifact, a
#: new pod), and each of those wakes a pass with its own event. The others (DownloadFailed,
#: MissingFiles while an artifact is being published, LoadError) may clear on a pod's own retry.
PERMANENT_FAILURES = frozenset(
    {
        "Unsupported",
        "InvalidName",
        "InvalidUri",
        "PathOutsideRoots",
        "HashMismatch",
        "BaseModelMismatch",
        "UnsupportedArtifact",
    }
)
#: Seconds from a pass that changed an object's status to the next poll, and the most between two
#: polls that keep finding nothing new.
POLL_FIRST_S, POLL_MAX_S = 5.0, 300.0


def needs_polling(status: dict[str, Any]) -> bool:
    """Whether an AdapterDeployment can change with no Kubernetes event to say so: a ready pod still
    loading an adapter, or retrying one that failed for a reason a retry may clear, or a canary
    whose step waits on the pods' counters. Ready, idle and permanently failed objects are not
    polled (anything else that changes them is an event: the spec, a pod, a FineTuneJob)."""
    if not status.get("readyReplicas") or status.get("phase") in ("Ready", "Failed"):
        return False
    if any(c.get("state") == "Progressing" for c in status.get("canaries") or []):
        return True
    return any(
        a.get("state") == "Loading"
        or (a.get("state") == "Failed" and a.get("reason") not in PERMANENT_FAILURES)
        for a in status.get("adapters") or []
    )


def next_poll_delay(previous_s: float | None, changed: bool, status: dict[str, Any]) -> float:
    """Seconds until the next poll: :data:`POLL_FIRST_S` after a pass that changed the status (or
    while a canary steps, whose step timing is the user's), doubling after each pass that changed
    nothing, at most :data:`POLL_MAX_S`."""
    if changed or previous_s is None:
        return POLL_FIRST_S
    if any(c.get("state") == "Progressing" for c in status.get("canaries") or []):
        return POLL_FIRST_S
    return min(POLL_MAX_S, 2 * previous_s)


def phase_for(conditions: list[dict[str, Any]]) -> str:
    true = {c["type"] for c in conditions if c["status"] == "True"}
    if "Degraded" in true:
        return "Degraded"
    # A canary in progress keeps the object Progressing: the converge timer (see needs_polling)
    # then keeps stepping it (its counters move without any Kubernetes event).
    if "Ready" in true and "Canary" not in true:
        return "Ready"
    return "Progressing"
