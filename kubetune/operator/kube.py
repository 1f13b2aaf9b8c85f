"""Kubernetes helpers both controllers share: read, server-side apply, ownership, serialisation.

Children are written with server-side apply under one field manager (:data:`FIELD_MANAGER`), each
carrying the sha256 of the manifest it was applied from (:data:`ANNOTATION_APPLIED`). A pass reads
the child it needs anyway and applies only when that hash differs from the desired one, so an object
whose desired state did not change costs no write. A child is adopted only when its controller
ownerReference carries the owner's uid (:func:`ownership_problem`); anything else is reported, never
touched.

The ``kubernetes`` package is imported lazily so that the pure builders, which use
:func:`owner_reference`, stay importable without it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from kubetune.api import v1alpha1
from kubetune.operator import events, metrics

#: The field manager of everything kubetune applies.
FIELD_MANAGER = "kubetune"
#: Annotation on each applied child: sha256 of the manifest it was last applied from.
ANNOTATION_APPLIED = "kubetune.dev/applied-sha256"
APPLY_PATCH = "application/apply-patch+yaml"


class _Meta(Protocol):
    name: str | None
    uid: str | None


def owner_reference(kind: str, metadata: _Meta) -> dict[str, Any]:
    """A controller ownerReference to a kubetune object: garbage-collects the child with it."""
    return {
        "apiVersion": v1alpha1.API_VERSION,
        "kind": kind,
        "name": metadata.name,
        "uid": metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def controller_uid(obj: dict[str, Any]) -> str | None:
    """The uid of the object's controller (the ownerReference with ``controller: true``), if any."""
    for reference in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if reference.get("controller"):
            return str(reference.get("uid"))
    return None


def ownership_problem(child: dict[str, Any] | None, owner_kind: str, owner_uid: str | None) -> str | None:
    """Why ``child`` (wire form, or None when absent) must not be touched by its would-be owner, or None."""
    if child is None:
        return None
    uid = controller_uid(child)
    if owner_uid is not None and uid == owner_uid:
        return None
    meta = child["metadata"]
    kind = child.get("kind") or "object"
    whose = f"is controlled by uid {uid}" if uid else "has no controller"
    return (
        f"{kind} {meta['name']} already exists and {whose}, not this {owner_kind} (uid {owner_uid}); "
        f"kubetune leaves it alone: delete it, or rename this {owner_kind}"
    )


def applied_hash(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest, independent of key order and of the annotation that records it."""
    meta = dict(manifest.get("metadata") or {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != ANNOTATION_APPLIED}
    meta["annotations"] = annotations
    canonical = json.dumps({**manifest, "metadata": meta}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def stamped(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with :data:`ANNOTATION_APPLIED` set to its hash."""
    meta = dict(manifest["metadata"])
    meta["annotations"] = {**(meta.get("annotations") or {}), ANNOTATION_APPLIED: applied_hash(manifest)}
    return {**manifest, "metadata": meta}


def is_current(existing: dict[str, Any] | None, desired: dict[str, Any]) -> bool:
    """Whether ``existing`` was applied from exactly ``desired`` (then applying again is a no-op)."""
    annotations = ((existing or {}).get("metadata") or {}).get("annotations") or {}
    return annotations.get(ANNOTATION_APPLIED) == applied_hash(desired)


# -- API calls ---------------------------------------------------------------------------------------

#: kind -> (API class, snake_case resource name in the client's method names)
_KINDS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("CoreV1Api", "config_map"),
    "Service": ("CoreV1Api", "service"),
    "Job": ("BatchV1Api", "job"),
    "Deployment": ("AppsV1Api", "deployment"),
    "PersistentVolumeClaim": ("CoreV1Api", "persistent_volume_claim"),
    "Secret": ("CoreV1Api", "secret"),
    "PodDisruptionBudget": ("PolicyV1Api", "pod_disruption_budget"),
}


def _api(api_client: Any, kind: str) -> tuple[Any, str]:
    from kubernetes import client

    api_class, resource = _KINDS[kind]
    return getattr(client, api_class)(api_client), resource


def _wire(method: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Call a client method and return the JSON it got: the pass works on wire (camelCase) dicts,
    and skipping the client's typed models and their serialisation back roughly halves its CPU."""
    response = method(*args, _preload_content=False, **kwargs)
    wire: dict[str, Any] = json.loads(response.data)
    return wire


def read(api_client: Any, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    """A namespaced object in wire (camelCase) form, or None when it does not exist."""
    from kubernetes.client.rest import ApiException

    api, resource = _api(api_client, kind)
    try:
        wire = _wire(getattr(api, f"read_namespaced_{resource}"), name, namespace)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    wire.setdefault("kind", kind)
    return wire


def list_pods(api_client: Any, namespace: str, label_selector: str) -> list[dict[str, Any]]:
    """Pods matching a label selector, in wire form."""
    from kubernetes import client

    pods: list[dict[str, Any]] = _wire(
        client.CoreV1Api(api_client).list_namespaced_pod, namespace, label_selector=label_selector
    )["items"]
    return pods


#: Kueue's Workload API, and the label its Job integration puts on a Job's Workload.
KUEUE_GROUP, KUEUE_VERSION, KUEUE_WORKLOADS = "kueue.x-k8s.io", "v1beta2", "workloads"
KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"


def queue_workload(api_client: Any, namespace: str, job_uid: str) -> dict[str, Any] | None:
    """Kueue's Workload for a queued Job, in wire form; None when there is none yet, when Kueue
    is not installed (404), or when the operator may not read Workloads (403: an older chart)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    try:
        items: list[dict[str, Any]] = _wire(
            client.CustomObjectsApi(api_client).list_namespaced_custom_object,
            KUEUE_GROUP, KUEUE_VERSION, namespace, KUEUE_WORKLOADS,
            label_selector=f"{KUEUE_JOB_UID_LABEL}={job_uid}",
        )["items"]  # fmt: skip
    except ApiException as error:
        if error.status in (403, 404):
            return None
        raise
    return items[0] if items else None


def apply(api_client: Any, manifest: dict[str, Any], field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
    """Server-side apply ``manifest`` (creating it if absent); returns the object in wire form.

    ``force``: the operator is the authority over the fields it applies; fields it does not apply
    (Kueue's ``spec.suspend`` of a queued Job, an HPA's replicas) stay with their managers.
    """
    api, resource = _api(api_client, manifest["kind"])
    meta = manifest["metadata"]
    return _wire(
        getattr(api, f"patch_namespaced_{resource}"),
        meta["name"],
        meta["namespace"],
        manifest,
        field_manager=field_manager,
        force=True,
        _content_type=APPLY_PATCH,
    )


def apply_if_changed(
    api_client: Any, existing: dict[str, Any] | None, desired: dict[str, Any]
) -> dict[str, Any] | None:
    """Apply ``desired`` unless ``existing`` was applied from it already; returns what was written
    (None when nothing was)."""
    if is_current(existing, desired):
        return None
    return apply(api_client, stamped(desired))


def get_custom_object(custom: Any, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    """A kubetune object as a dict, or None when it does not exist (any more)."""
    from kubernetes.client.rest import ApiException

    try:
        obj: dict[str, Any] = custom.get_namespaced_custom_object(
            v1alpha1.GROUP, v1alpha1.VERSION, namespace, plural, name
        )
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return obj


def patch_status(custom: Any, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
    custom.patch_namespaced_custom_object_status(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, plural, name, {"status": status}
    )


def write_status(custom: Any, plural: str, obj: dict[str, Any], desired: dict[str, Any]) -> bool:
    """Write ``desired`` as the status of ``obj`` (a kubetune object as read, wire form) when it
    differs from the status ``obj`` has, then post an Event per condition transition. Returns
    whether it wrote. Either way the object's phase is recorded for ``kubetune_objects``."""
    meta = obj["metadata"]
    previous = obj.get("status") or {}
    metrics.record_phase(str(obj.get("kind")), meta["namespace"], meta["name"], desired.get("phase"))
    if desired == {k: v for k, v in previous.items() if k in desired}:
        return False
    patch_status(custom, plural, meta["namespace"], meta["name"], desired)
    events.post(obj, events.transitions(previous.get("conditions") or [], desired.get("conditions") or []))
    return True


# -- errors ----------------------------------------------------------------------------------------

#: Seconds before a pass that failed on a transient apiserver error is retried, when the apiserver
#: does not say (a 429 or 503 carries its own Retry-After).
TRANSIENT_RETRY_S = 5.0
#: Answers another attempt may not get: conflicts, throttling, and the apiserver's own troubles.
_TRANSIENT_STATUSES = frozenset({409, 429, 500, 502, 503, 504})


def transient_delay(error: BaseException) -> float | None:
    """Seconds to wait before trying again when ``error`` is a transient apiserver failure (it was
    unreachable, throttled us, or is restarting), else None: retrying the same request would fail
    the same way."""
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(error, ApiException):
        if error.status not in _TRANSIENT_STATUSES and error.status != 0:
            return None
        retry_after = (error.headers or {}).get("Retry-After", "")
        return float(retry_after) if retry_after.isdigit() else TRANSIENT_RETRY_S
    if isinstance(error, HTTPError | ConnectionError | TimeoutError):
        return TRANSIENT_RETRY_S
    return None


# -- per-object serialisation ------------------------------------------------------------------------

_locks: dict[tuple[str, str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


@contextmanager
def serialised(plural: str, namespace: str, name: str) -> Iterator[None]:
    """One pass per object at a time: the object's own events and its children's events run
    reconciles from kopf's thread pool, possibly at once."""
    with _locks_guard:
        lock = _locks.setdefault((plural, namespace, name), threading.Lock())
    with lock:
        yield


def forget(plural: str, namespace: str, name: str) -> None:
    """Drop a deleted object's lock, so the table does not grow with every object ever seen."""
    with _locks_guard:
        _locks.pop((plural, namespace, name), None)


# -- deletion --------------------------------------------------------------------------------------


def delete(api_client: Any, kind: str, namespace: str, name: str) -> None:
    """Delete a namespaced child; one that is already gone is fine."""
    from kubernetes.client.rest import ApiException

    api, resource = _api(api_client, kind)
    try:
        getattr(api, f"delete_namespaced_{resource}")(name, namespace, _preload_content=False)
    except ApiException as error:
        if error.status != 404:
            raise
