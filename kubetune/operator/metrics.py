"""The operator's Prometheus metrics (prometheus-client's default registry, served on
``--metrics-port``), shared by both controllers.

==========================================  ==========  =============================================
metric                                      type        labels
==========================================  ==========  =============================================
``kubetune_reconciles_total``               counter     ``kind`` (FineTuneJob, AdapterDeployment)
``kubetune_reconcile_errors_total``         counter     ``kind``
``kubetune_reconcile_duration_seconds``     histogram   ``kind``
``kubetune_objects``                        gauge       ``kind``, ``phase`` (objects the operator sees)
``kubetune_api_requests_total``             counter     ``verb``, ``resource``, ``code``
==========================================  ==========  =============================================

API requests are those the reconcile passes make through the ``kubernetes`` client
(:class:`CountingApiClient`); kopf's own watches and its annotation and finalizer patches go through
its own HTTP session and are not counted here.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as _Tally
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

RECONCILES = Counter("kubetune_reconciles", "Reconcile passes run.", ["kind"])
RECONCILE_ERRORS = Counter("kubetune_reconcile_errors", "Reconcile passes that raised.", ["kind"])
RECONCILE_SECONDS = Histogram(
    "kubetune_reconcile_duration_seconds",
    "Seconds a reconcile pass took, waiting for the object's lock included.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
API_REQUESTS = Counter(
    "kubetune_api_requests",
    "Kubernetes API requests made by the reconcile passes, by verb, resource and HTTP status code.",
    ["verb", "resource", "code"],
)


@contextmanager
def reconcile_pass(kind: str) -> Iterator[None]:
    """Count and time one pass of a ``kind`` object; a pass that raises counts as an error."""
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        RECONCILE_ERRORS.labels(kind).inc()
        raise
    finally:
        RECONCILES.labels(kind).inc()
        RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - start)


class _Phases(Collector):
    """``kubetune_objects``: the phase of every object the operator has seen, counted at scrape time
    (a gauge per phase would need decrementing the old phase on every change)."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str, str], str] = {}
        self._guard = threading.Lock()

    def set(self, kind: str, namespace: str, name: str, phase: str | None) -> None:
        """Record an object's phase (``None`` when it is deleted)."""
        with self._guard:
            if phase is None:
                self._phases.pop((kind, namespace, name), None)
            else:
                self._phases[(kind, namespace, name)] = phase

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._guard:
            tally = _Tally((kind, phase) for (kind, _, _), phase in self._phases.items())
        family = GaugeMetricFamily(
            "kubetune_objects", "kubetune objects by kind and phase.", labels=["kind", "phase"]
        )
        for (kind, phase), count in sorted(tally.items()):
            family.add_metric([kind, phase], count)
        yield family


PHASES = _Phases()
REGISTRY.register(PHASES)


def record_phase(kind: str, namespace: str, name: str, phase: str | None) -> None:
    """An object's phase as last seen (``None``: deleted). Objects without a status yet count as
    ``Pending``."""
    PHASES.set(kind, namespace, name, phase)


def resource_of(url: str) -> str:
    """The resource (and subresource) of an API URL: ``/api/v1/namespaces/ns/pods`` -> ``pods``,
    ``/apis/g/v1/namespaces/ns/finetunejobs/x/status`` -> ``finetunejobs/status``."""
    path = url.split("://", 1)[-1].split("?", 1)[0]
    parts = [p for p in path.split("/") if p][1:]  # drop the host
    # /api/v1/... or /apis/<group>/<version>/...
    parts = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if parts[:1] == ["namespaces"] and len(parts) > 2:
        parts = parts[2:]  # a namespaced resource, not the namespace itself
    if not parts:
        return ""
    return f"{parts[0]}/{parts[2]}" if len(parts) > 2 else parts[0]


def counting_api_client(configuration: Any = None) -> Any:
    """A ``kubernetes.client.ApiClient`` that counts its requests in ``kubetune_api_requests_total``
    (code ``error`` when no response came)."""
    from kubernetes import client

    class CountingApiClient(client.ApiClient):
        def call_api(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            code = "error"
            try:
                response = super().call_api(method, url, *args, **kwargs)
                code = str(response.status)
                return response
            finally:
                API_REQUESTS.labels(method.upper(), resource_of(url), code).inc()

    return CountingApiClient(configuration)
