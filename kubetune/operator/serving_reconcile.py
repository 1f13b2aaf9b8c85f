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
import secrets
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from kubetune.api.v1alpha1 import AdapterDeployment
from kubetune.operator import events, kube, serving
from kubetune.operator.conditions import merge_conditions
from kubetune.operator.config import OperatorConfig

logger = logging.getLogger("kubetune.operator.serving")

PLURAL = "adapterdeployments"
KIND = "AdapterDeployment"


class AdminUnauthorized(Exception):
    """A pod refused the operator's admin token: a configuration error, not a transient one."""


def _call(
    pod_ip: str,
    port: int,
    method: str,
    path: str,
    body: Any = None,
    timeout: float = 60.0,
    token: str | None = None,
) -> Any:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"http://{pod_ip}:{port}{path}", data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read()
            # vLLM answers adapter loads and unloads in plain text.
            is_json = response.headers.get_content_type() == "application/json"
            return json.loads(data or b"null") if is_json else data.decode(errors="replace")
    except urllib.error.HTTPError as error:
        if error.code == 401:
            raise AdminUnauthorized(f"{method} {path} on {pod_ip}: {_error_details(error)[1]}") from None
        raise


def _error_details(error: Exception) -> tuple[str, str]:
    """(reason, message) of a failed call: the server's OpenAI-shaped error code and message."""
    if isinstance(error, urllib.error.HTTPError):
        try:
            body = json.loads(error.read())
            body = body.get("error", body)  # OpenAI's shape, or vLLM's older flat one
            code = body.get("code")
            return (code if isinstance(code, str) and code else "LoadError"), str(body["message"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return "LoadError", f"HTTP {error.code}"
    return "LoadError", f"{type(error).__name__}: {error}"


def _error_message(error: Exception) -> str:
    return _error_details(error)[1]


#: Key under which a pod's route-table failure is reported among adapter failures.
ROUTES_KEY = "routes"


def sync_pod(pod_ip: str, port: int, plan: Any, token: str | None) -> serving.PodReport:
    """Make one pod serve the plan's adapters and routes, with the admin ``token``; returns what it
    serves and which adapters failed there (``ROUTES_KEY`` when the route table was refused).

    An adapter the pod already tried from the same source and hash is not loaded again: the pod
    retries failed ones itself, with backoff, and its record says why they failed.
    """
    report = _call(pod_ip, port, "GET", "/v1/adapters", timeout=5)
    current = {a["name"]: (a["source"], a.get("sha256")) for a in report["adapters"]}
    loaded_now = False
    states = {s["name"]: s for s in report.get("states") or []}
    desired = {a.name: a for a in plan.adapters}
    failures: dict[str, tuple[str, str]] = {}
    # Failed ones too: unloading stops the pod's retries.
    for name in (set(current) | set(states)) - set(desired):
        _call(pod_ip, port, "POST", "/v1/unload_lora_adapter", {"lora_name": name}, token=token)
        current.pop(name, None)
    for name, entry in desired.items():
        source, sha256 = current.get(name, (None, None))
        if source == entry.uri and entry.sha256 in (None, sha256):
            continue
        state = states.get(name) or {}
        tried = (state.get("source"), state.get("expected_sha256")) == (entry.uri, entry.sha256)
        if tried and state.get("state") in ("Failed", "Loading"):
            # A background retry shows as Loading with the last failure's reason: still failed
            # until it loads, or the status would flap (and post an Event) at every retry.
            if state.get("reason"):
                failures[name] = (str(state["reason"]), str(state.get("message") or ""))
            continue
        body = {"lora_name": name, "lora_path": entry.uri}
        if entry.sha256:
            body["sha256"] = entry.sha256
        try:
            loaded = _call(pod_ip, port, "POST", "/v1/load_lora_adapter", body, token=token)
            current[name] = (entry.uri, loaded.get("sha256") if isinstance(loaded, dict) else None)
            loaded_now = True
        except (OSError, ValueError) as error:
            failures[name] = _error_details(error)
            logger.warning("adapter %s on %s: %s", name, pod_ip, failures[name][1])
    routes = [
        {"name": r.name, "backends": [b.model_dump() for b in r.backends if b.adapter in current]}
        for r in plan.routes
    ]
    routes = [r for r in routes if r["backends"]]
    if routes != report.get("routes"):  # unchanged: a pass over a settled pod writes nothing
        try:
            _call(pod_ip, port, "PUT", "/v1/routes", {"routes": routes}, timeout=5, token=token)
        except (OSError, ValueError) as error:
            failures[ROUTES_KEY] = ("RoutesRejected", _error_message(error))
            logger.warning("routes on %s: %s", pod_ip, failures[ROUTES_KEY][1])
    if loaded_now:
        # Adapters loaded in this pass: their latency probes ran during the load calls.
        report = _call(pod_ip, port, "GET", "/v1/adapters", timeout=5)
    probed, unmerged = serving.pod_latencies(report)
    return serving.PodReport(
        loaded={n: src for n, (src, _) in current.items()},
        failures=failures,
        ms_per_token=probed,
        unmerged_ms_per_token=unmerged,
    )


class Backoff:
    """Load attempts the operator itself retries (vLLM does not retry a failed adapter): per owner,
    pod, adapter and source, the last failure and when to try again (5 s, doubling, at most 5 min, as
    kubetune's own pods do). Kept in memory: a restarted operator tries once more at once."""

    FIRST_S, MAX_S = 5.0, 300.0

    def __init__(self) -> None:
        self._failures: dict[tuple[str, ...], tuple[int, float, tuple[str, str]]] = {}
        self._lock = threading.Lock()

    def pending(self, key: tuple[str, ...]) -> tuple[str, str] | None:
        """The recorded failure while ``key`` waits for its next attempt, else None."""
        with self._lock:
            attempts, retry_at, failure = self._failures.get(key, (0, 0.0, ("", "")))
        return failure if attempts and time.monotonic() < retry_at else None

    def failed(self, key: tuple[str, ...], failure: tuple[str, str]) -> None:
        with self._lock:
            attempts = self._failures.get(key, (0, 0.0, failure))[0] + 1
            delay = min(self.MAX_S, self.FIRST_S * 2 ** (attempts - 1))
            self._failures[key] = (attempts, time.monotonic() + delay, failure)

    def keep_only(self, owner_uid: str, pod_uids: set[str]) -> None:
        """Drop the records of ``owner_uid``'s pods not in ``pod_uids`` (those that went away)."""
        with self._lock:
            for key in [k for k in self._failures if k[0] == owner_uid and k[1] not in pod_uids]:
                del self._failures[key]

    def forget(self, prefix: tuple[str, ...]) -> None:
        with self._lock:
            for key in [k for k in self._failures if k[: len(prefix)] == prefix]:
                del self._failures[key]


VLLM_BACKOFF = Backoff()


class PollSchedule:
    """When the converge timer's next pass over each AdapterDeployment (by uid) is due, following
    :func:`~kubetune.operator.serving.next_poll_delay`: a tick before that costs no API call. In
    memory: a restarted operator polls once at once."""

    def __init__(self) -> None:
        self._due: dict[str, tuple[str, float, float]] = {}  # uid -> (status seen, delay s, due at)
        self._lock = threading.Lock()

    def due(self, uid: str, now: float | None = None) -> bool:
        with self._lock:
            entry = self._due.get(uid)
        return entry is None or (time.monotonic() if now is None else now) >= entry[2]

    def passed(self, uid: str, status: dict[str, Any] | None, now: float | None = None) -> float:
        """Record a pass's status (None: the pass failed); returns the seconds until the next one."""
        seen = json.dumps(status, sort_keys=True, default=str)
        with self._lock:
            previous = self._due.get(uid)
            changed = previous is None or previous[0] != seen
            delay = serving.next_poll_delay(previous[1] if previous else None, changed, status or {})
            self._due[uid] = (seen, delay, (time.monotonic() if now is None else now) + delay)
        return delay

    def forget(self, uid: str) -> None:
        with self._lock:
            self._due.pop(uid, None)


POLLS = PollSchedule()


def sync_vllm_pod(
    pod: tuple[str, str],
    pod_ip: str,
    port: int,
    plan: Any,
    token: str | None,
    backoff: Backoff = VLLM_BACKOFF,
) -> serving.PodReport:
    """:func:`sync_pod` for a vLLM pod (``pod``: its owner's uid and its own, keying the backoff):
    its LoRA adapters are the models with a parent (``root`` is
    the path loaded); loads and unloads go through vLLM's endpoints with the admin token as its API
    key. A failed load is retried with backoff, not at every pass."""
    models = _call(pod_ip, port, "GET", "/v1/models", timeout=5, token=token)["data"]
    current = {m["id"]: m.get("root") for m in models if m.get("parent")}
    desired = {a.name: (a.uri, serving.vllm_path(a.uri)) for a in plan.adapters}
    failures: dict[str, tuple[str, str]] = {}
    loaded: dict[str, str] = {}
    for name, path in current.items():
        if name not in desired or desired[name][1] != path:
            _call(pod_ip, port, "POST", "/v1/unload_lora_adapter", {"lora_name": name}, token=token)
        else:
            loaded[name] = desired[name][0]
    for name, (uri, path) in desired.items():
        if name in loaded:
            continue
        key = (*pod, name, str(path))
        if (failure := backoff.pending(key)) is not None:
            failures[name] = failure
            continue
        try:
            _call(
                pod_ip,
                port,
                "POST",
                "/v1/load_lora_adapter",
                {"lora_name": name, "lora_path": path},
                token=token,
            )
            loaded[name] = uri
            backoff.forget(key)
        except (OSError, ValueError) as error:
            failures[name] = _error_details(error)
            backoff.failed(key, failures[name])
            logger.warning("adapter %s on %s: %s", name, pod_ip, failures[name][1])
    return serving.PodReport(loaded=loaded, failures=failures)


def pod_traffic(pod_ip: str, port: int) -> dict[str, serving.AdapterTraffic]:
    """What a kubetune pod counted per adapter, from its Prometheus ``/metrics`` (open, like probes)."""
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(f"http://{pod_ip}:{port}/metrics")
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    counts: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            adapter = sample.labels.get("served_by")
            if adapter is None:
                continue
            row = counts.setdefault(adapter, [0.0, 0.0, 0.0])
            if sample.name == "kubetune_serve_requests_total":
                row[0] += sample.value
                if sample.labels.get("code", "").startswith("5"):
                    row[1] += sample.value
            elif sample.name == "kubetune_serve_request_seconds_sum":
                row[2] += sample.value
    return {adapter: serving.AdapterTraffic(*row) for adapter, row in counts.items()}


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
    """Write the status when it changed (an Event per condition transition comes with it), and an
    Event per adapter that failed or recovered."""
    previous = obj.get("status") or {}
    if kube.write_status(custom, PLURAL, obj, desired):
        conditions = events.transitions(previous.get("conditions") or [], desired.get("conditions") or [])
        events.post(
            obj,
            serving.adapter_events(
                previous.get("adapters") or [],
                desired.get("adapters") or [],
                failures_in_condition=any(t.reason == "AdapterFailed" for t in conditions),
            ),
        )
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
        vllm = adep.spec.runtime == "vllm"
        if vllm:
            resolved = serving.vllm_refusals(adep, resolved)
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
            serving.deployment(adep, plan, config.worker, job_claims, resolved),
            serving.service(adep),
        ]
        existing = [
            kube.read(api_client, child["kind"], namespace, child["metadata"]["name"]) for child in children
        ]
        secret = kube.read(api_client, "Secret", namespace, serving.admin_secret_name(adep))
        budget = serving.disruption_budget(adep)
        current_budget = kube.read(
            api_client, "PodDisruptionBudget", namespace, serving.disruption_budget_name(adep)
        )
        # All or nothing: a Deployment must not start for a Service that belongs to someone else.
        for current in [*existing, secret, current_budget]:
            if conflict := kube.ownership_problem(current, KIND, adep.metadata.uid):
                return _write_status(custom, obj, _failed(obj, adep, "ChildConflict", conflict))
        token = serving.admin_token(secret)
        if token is None:
            # Created once: the token is random, so it is applied only when there is none.
            token = secrets.token_urlsafe(32)
            kube.apply(api_client, kube.stamped(serving.admin_secret(adep, token)))
        for current, desired_child in zip(existing, children, strict=True):
            kube.apply_if_changed(api_client, current, desired_child)
        if budget is not None:
            kube.apply_if_changed(api_client, current_budget, budget)
        elif current_budget is not None:
            kube.delete(api_client, "PodDisruptionBudget", namespace, serving.disruption_budget_name(adep))

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
        if vllm:
            VLLM_BACKOFF.keep_only(str(adep.metadata.uid), {p["metadata"]["uid"] for p in pods})
        # Canaries: their weights come from the pods' counters of the canary adapters.
        previous_canaries = {c["route"]: c for c in (obj.get("status") or {}).get("canaries") or []}
        canaries: list[dict[str, Any]] = []
        canary_events: list[events.Transition] = []
        canary_routes = [r for r in adep.spec.routes if r.canary is not None]
        if canary_routes and not vllm:
            traffic: dict[str, serving.AdapterTraffic] = {}
            for pod in ready_pods:
                try:
                    for served_by, seen in pod_traffic(
                        pod["status"]["podIP"], adep.spec.service.port
                    ).items():
                        old = traffic.get(served_by, serving.AdapterTraffic())
                        traffic[served_by] = serving.AdapterTraffic(
                            old.requests + seen.requests,
                            old.errors + seen.errors,
                            old.latency_seconds + seen.latency_seconds,
                        )
                except (OSError, ValueError) as error:
                    logger.warning("metrics of pod %s: %s", pod["metadata"]["name"], error)
            for route in canary_routes:
                assert route.canary is not None
                entry, event = serving.canary_progress(
                    route,
                    previous_canaries.get(route.name),
                    traffic.get(route.canary.adapter, serving.AdapterTraffic()),
                    time.time(),
                )
                canaries.append(entry)
                canary_events += [event] if event else []
            plan = serving.serving_plan(adep, resolved, canaries)
        reports: list[serving.PodReport] = []
        route_error = admin_error = None
        for pod in ready_pods:
            try:
                if vllm:
                    uids = (str(adep.metadata.uid), pod["metadata"]["uid"])
                    report = sync_vllm_pod(uids, pod["status"]["podIP"], adep.spec.service.port, plan, token)
                else:
                    report = sync_pod(pod["status"]["podIP"], adep.spec.service.port, plan, token)
            except AdminUnauthorized as error:
                admin_error = f"a pod refused the operator's admin token: {error}"
                logger.warning("pod %s: %s", pod["metadata"]["name"], admin_error)
                continue
            except (OSError, ValueError) as error:
                logger.warning("pod %s: %s", pod["metadata"]["name"], _error_message(error))
                continue
            route_error = route_error or report.failures.pop(ROUTES_KEY, ("", None))[1]
            reports.append(report)

        adapters = serving.adapter_statuses(resolved, reports)
        conditions = merge_conditions(
            (obj.get("status") or {}).get("conditions") or [],
            serving.conditions_for(adep, len(ready_pods), adapters, route_error, admin_error, canaries),
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
            **(
                {"baseMsPerToken": base_ms}
                if (base_ms := serving.base_ms_per_token(reports)) is not None
                else {}
            ),
            "endpoint": serving.endpoint(adep),
            **({"canaries": canaries} if canaries or previous_canaries else {}),
        }
        events.post(obj, canary_events)
        return _write_status(custom, obj, status)
