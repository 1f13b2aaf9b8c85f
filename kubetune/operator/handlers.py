"""The kopf handlers: thin triggers for the level-based reconcile passes.

Every trigger of a FineTuneJob (the object, its Job, its pods, a periodic timer for live progress)
runs :func:`kubetune.operator.reconcile.reconcile`; every trigger of an AdapterDeployment (the object,
its pods, a timer) runs :func:`kubetune.operator.serving_reconcile.reconcile_adapterdeployment`. A
missed event is repaired by the next pass.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubetune.api import v1alpha1
from kubetune.operator.builders import LABEL_FINETUNEJOB
from kubetune.operator.reconcile import PLURAL, OperatorConfig, reconcile
from kubetune.operator.serving import LABEL_ADAPTERDEPLOYMENT
from kubetune.operator.serving_reconcile import reconcile_adapterdeployment

FTJ = (v1alpha1.GROUP, v1alpha1.VERSION, PLURAL)
ADEP = (v1alpha1.GROUP, v1alpha1.VERSION, "adapterdeployments")
#: Seconds between periodic passes of each FineTuneJob (live progress is polled on these).
RESYNC_SECONDS = 5.0


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Every operator setting lives here, each with its reason.
    # Handler progress and diff-base annotations under our own domain, not kopf's.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubetune.dev", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "kubetune.dev/finalizer"
    # Conditions and status carry the story; Kubernetes events only for warnings and errors.
    settings.posting.level = logging.WARNING
    # kopf's default API request timeout (300 s) would stall a handler that long on a sick apiserver.
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 10
    # Re-open watches every few minutes so a silently dropped connection cannot hide events for long.
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    # A failing handler retries soon, then backs off; one bad object never blocks the others.
    settings.batching.error_delays = [1, 2, 5, 10, 30, 60, 120, 300]
    # Reconciles do blocking I/O in kopf's thread pool; bound it for small operator pods.
    settings.execution.max_workers = 8

    if "config" not in memo:
        memo["config"] = OperatorConfig()
    if "api_client" not in memo:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        memo["api_client"] = client.ApiClient()


def _reconcile(memo: Any, namespace: str | None, name: str) -> None:
    assert namespace is not None, "FineTuneJobs are namespaced"
    reconcile(memo["api_client"], namespace, name, memo["config"])


@kopf.on.resume(*FTJ)
@kopf.on.create(*FTJ)
def finetunejob_created(memo: Any, namespace: str | None, name: str, **_: Any) -> None:
    _reconcile(memo, namespace, name)


@kopf.on.field(*FTJ, field="spec.suspend")
def finetunejob_suspend_changed(memo: Any, namespace: str | None, name: str, **_: Any) -> None:
    _reconcile(memo, namespace, name)


@kopf.timer(*FTJ, interval=RESYNC_SECONDS, sharp=False)
def finetunejob_resync(memo: Any, namespace: str | None, name: str, **_: Any) -> None:
    _reconcile(memo, namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_FINETUNEJOB: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={LABEL_FINETUNEJOB: kopf.PRESENT})
def child_changed(memo: Any, namespace: str | None, labels: kopf.Labels, type: str, **_: Any) -> None:
    if not type:  # the initial listing: the FineTuneJob's own resume handler covers it
        return
    _reconcile(memo, namespace, labels[LABEL_FINETUNEJOB])


def _reconcile_serving(memo: Any, namespace: str | None, name: str) -> None:
    assert namespace is not None, "AdapterDeployments are namespaced"
    reconcile_adapterdeployment(memo["api_client"], namespace, name, memo["config"])


@kopf.on.resume(*ADEP)
@kopf.on.create(*ADEP)
@kopf.on.update(*ADEP)
def adapterdeployment_changed(memo: Any, namespace: str | None, name: str, **_: Any) -> None:
    _reconcile_serving(memo, namespace, name)


@kopf.timer(*ADEP, interval=RESYNC_SECONDS, sharp=False)
def adapterdeployment_resync(memo: Any, namespace: str | None, name: str, **_: Any) -> None:
    # Also how adapters of FineTuneJobs that finish later, and new replicas, get loaded.
    _reconcile_serving(memo, namespace, name)


@kopf.on.event("", "v1", "pods", labels={LABEL_ADAPTERDEPLOYMENT: kopf.PRESENT})
def serving_pod_changed(memo: Any, namespace: str | None, labels: kopf.Labels, type: str, **_: Any) -> None:
    if not type:
        return
    _reconcile_serving(memo, namespace, labels[LABEL_ADAPTERDEPLOYMENT])
