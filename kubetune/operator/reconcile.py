"""One reconcile pass of a FineTuneJob: read the world, apply the builders' difference, write status.

Synchronous (kopf runs sync handlers in its thread pool) and idempotent: children have deterministic
names and are created only when absent, so running it twice, or from two triggers at once, is harmless.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from kubetune.api import v1alpha1
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.operator import builders, status
from kubetune.operator.render import PROGRESS_PORT, training_plan
from kubetune.worker.plan import ProgressReport

logger = logging.getLogger("kubetune.operator")

PLURAL = "finetunejobs"


@dataclass
class OperatorConfig:
    """Operator-wide settings, fixed at start-up."""

    worker: builders.WorkerSettings = field(default_factory=builders.WorkerSettings)
    #: Seconds to wait for a worker's /progress answer; a slow worker must not stall reconciles.
    progress_timeout_s: float = 1.0


_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


@contextmanager
def _serialised(namespace: str, name: str) -> Iterator[None]:
    """FineTuneJob, Job and Pod events can trigger the same object at once; one pass at a time."""
    with _locks_guard:
        lock = _locks.setdefault((namespace, name), threading.Lock())
    with lock:
        yield


def _fetch_progress(pod: dict[str, Any], timeout: float) -> ProgressReport | None:
    ip = (pod.get("status") or {}).get("podIP")
    if not ip or (pod.get("status") or {}).get("phase") != "Running":
        return None
    try:
        with urllib.request.urlopen(f"http://{ip}:{PROGRESS_PORT}/progress", timeout=timeout) as response:
            return ProgressReport.model_validate_json(response.read())
    except (OSError, ValueError):
        return None  # not listening yet, or between restarts: the next pass tries again


def _create_if_absent(create: Any, body: dict[str, Any]) -> None:
    from kubernetes.client.rest import ApiException

    try:
        create(body["metadata"]["namespace"], body)
    except ApiException as error:
        if error.status != 409:
            raise


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


def plan_problem(job: FineTuneJob) -> str | None:
    """Why this operator cannot run the job, or None."""
    if job.spec.resources.nodes > 1:
        return "multi-node training is not supported by this operator version yet: set resources.nodes to 1"
    return None


def reconcile(api_client: Any, namespace: str, name: str, config: OperatorConfig) -> dict[str, Any] | None:
    """Bring one FineTuneJob's children and status in line; returns the status written (or None)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    custom = client.CustomObjectsApi(api_client)
    batch = client.BatchV1Api(api_client)
    core = client.CoreV1Api(api_client)

    with _serialised(namespace, name):
        obj = get_custom_object(custom, PLURAL, namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return None  # owner references garbage-collect the children

        job: FineTuneJob | None = None
        plan_error: str | None = None
        try:
            job = FineTuneJob.model_validate(obj)
            plan = training_plan(job)
            plan_error = plan_problem(job)
        except ValidationError as error:
            # Admission normally rejects these; an object stored before a schema change may not parse.
            plan_error = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())

        worker: dict[str, Any] | None = None
        pods: list[dict[str, Any]] = []
        progress: ProgressReport | None = None
        if job is not None and plan_error is None:
            _create_if_absent(core.create_namespaced_config_map, builders.plan_configmap(job, plan))
            desired_job = builders.worker_job(job, config.worker)
            job_name = desired_job["metadata"]["name"]
            try:
                existing = batch.read_namespaced_job(job_name, namespace)
            except ApiException as error:
                if error.status != 404:
                    raise
                existing = batch.create_namespaced_job(namespace, desired_job)  # type: ignore[arg-type]
                logger.info("created Job %s/%s", namespace, job_name)
            # Wire (camelCase) form, as the pure status functions expect.
            worker = api_client.sanitize_for_serialization(existing)
            assert worker is not None
            if bool(worker["spec"].get("suspend")) != job.spec.suspend:
                batch.patch_namespaced_job(job_name, namespace, {"spec": {"suspend": job.spec.suspend}})
            pods = api_client.sanitize_for_serialization(
                core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}")
            )["items"]
            running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
            if running:
                progress = _fetch_progress(running[0], config.progress_timeout_s)

        seen = status.Observed(job=worker, pods=pods, progress=progress, plan_error=plan_error)
        desired = status.desired_status(
            obj["metadata"].get("generation"),
            bool(job and job.spec.suspend),
            seen,
            obj.get("status"),
            datetime.now(UTC),
        )
        if desired != {k: v for k, v in (obj.get("status") or {}).items() if k in desired}:
            custom.patch_namespaced_custom_object_status(
                v1alpha1.GROUP, v1alpha1.VERSION, namespace, PLURAL, name, {"status": desired}
            )
            logger.debug("status of %s/%s: %s", namespace, name, json.dumps(desired)[:500])
        return desired
