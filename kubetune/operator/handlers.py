"""The kopf handlers: thin triggers for the level-based reconcile passes.

Reconciles are event-driven. A FineTuneJob is reconciled (:func:`kubetune.operator.reconcile.reconcile`)
when it shows a generation this operator process has not reconciled yet (it was created, its
``spec.suspend`` changed, or the operator started and its run has not ended), and whenever its
worker Job or one of the Job's pods changes. Its watch events are the only trigger: no kopf
create/update handler, so kopf writes no annotations on it and never re-runs a creation from a stale
event; a pass that keeps failing is retried on a timer of its own. The only periodic work is
polling a training worker's live ``/progress``, and only while a worker pod is running: the timer is
filtered on the Running condition, so kopf stops it when the run leaves that state.

An AdapterDeployment is reconciled
(:func:`kubetune.operator.serving_reconcile.reconcile_adapterdeployment`) when it changes, when one of
its pods changes, and when a FineTuneJob it serves ends or goes away. Finished, suspended and failed
objects cost no API calls while nothing changes.

Watch-event handlers that usually decide "nothing to do" are coroutines, run on kopf's event loop;
only the passes go to kopf's thread pool.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import kopf

from kubetune.api import v1alpha1
from kubetune.operator import kube, logs, metrics, serving
from kubetune.operator import status as ftj_status
from kubetune.operator.builders import LABEL_FINETUNEJOB, LABEL_MANAGED_BY
from kubetune.operator.config import OperatorConfig
from kubetune.operator.reconcile import KIND, PLURAL, PassMemory, SpecKey, reconcile, spec_key
from kubetune.operator.serving import LABEL_ADAPTERDEPLOYMENT
from kubetune.operator.serving_reconcile import KIND as ADEP_KIND
from kubetune.operator.serving_reconcile import PLURAL as ADEP_PLURAL
from kubetune.operator.serving_reconcile import POLLS, reconcile_adapterdeployment

logger = logging.getLogger("kubetune.operator")

FTJ = (v1alpha1.GROUP, v1alpha1.VERSION, PLURAL)
ADEP = (v1alpha1.GROUP, v1alpha1.VERSION, ADEP_PLURAL)
#: Seconds between polls of a training worker's /progress: the one state that changes without an
#: event. Each poll that sees new numbers costs one status patch.
PROGRESS_INTERVAL_S = 10.0
#: Seconds between passes over an AdapterDeployment whose ready pods do not yet serve every
#: adapter (see ``_converging``); adapter loads finish without any Kubernetes event.
SERVING_CONVERGE_INTERVAL_S = 5.0
#: Seconds between attempts of a pass triggered by a child's event. kopf does not retry event
#: handlers, and the next event may be long in coming: a few quick retries ride out an apiserver hiccup.
CHILD_EVENT_RETRIES_S = (1.0, 3.0, 10.0)
#: Seconds before a FineTuneJob whose pass failed (after the quick retries) is tried again, until
#: a pass works: nothing else may come to wake it.
FAILED_PASS_RETRY_S = 30.0


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Every operator setting lives here, each with its reason.
    # Handler progress and diff-base annotations under our own domain, not kopf's.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubetune.dev", key="last-handled-configuration"
    )
    # The progress timer needs a finalizer while it runs (kopf stops it before the object goes).
    settings.persistence.finalizer = "kubetune.dev/finalizer"
    # kopf posts its own log lines as Events from this level up: its routine INFO lines ("handler
    # succeeded") would flood `kubectl get events`. Condition transitions are posted as Events
    # whatever this says (events.py).
    settings.posting.level = logging.WARNING
    # kopf's default API request timeout (300 s) would stall a handler that long on a sick apiserver.
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 10
    # Re-open watches every few minutes so a silently dropped connection cannot hide events for long.
    # Reconciles are driven by these watches, so a dead one would stall them.
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    # A failed create/resume/update handler is retried after 10 s, not kopf's 60 s: nothing periodic
    # would repair what it missed.
    settings.execution.default_backoff = 10
    # Watch only our own Jobs and pods, filtered by the apiserver: kopf's label filters on the
    # handlers are applied client-side, after every pod of the watched namespaces was streamed.
    settings.watching.label_selectors["batch", "jobs"] = LABEL_FINETUNEJOB
    settings.watching.label_selectors["", "pods"] = f"{LABEL_MANAGED_BY}=kubetune"
    # Reconciles do blocking I/O in kopf's thread pool; bound it for small operator pods. Passes are
    # short and event-driven, so 8 threads keep up with thousands of objects.
    settings.execution.max_workers = 8

    if "config" not in memo:
        memo["config"] = OperatorConfig()
    operator_config: OperatorConfig = memo["config"]
    peering = operator_config.peering
    # Replicas: with a peering object, the replica of the highest priority works and the others
    # pause; while the peering object is missing, every replica waits for it rather than run unpeered
    # (mandatory). Without one, standalone: kopf would otherwise look for a peering named "default".
    if peering is None:
        settings.peering.standalone = True
    else:
        settings.peering.standalone = False
        settings.peering.mandatory = True
        settings.peering.name = peering.name
        settings.peering.priority = peering.priority
        settings.peering.lifetime = peering.lifetime_s
        # A keep-alive every 10-15 s is routine; not logged even with -v (pauses and resumes are).
        settings.peering.stealth = True
    if "api_client" not in memo:
        from kubernetes import config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        memo["api_client"] = metrics.counting_api_client()
    # FineTuneJob name -> what an AdapterDeployment cares about, last time it was seen.
    memo.setdefault("artifacts", {})
    # Watch-event coroutines hand passes to kopf's thread pool (``_in_pool``).
    memo["settings"] = settings
    # What FineTuneJob passes read and reconciled: lets their triggers skip events that change nothing.
    memo.setdefault("passes", PassMemory())


def _typed_errors(attempt: Callable[[], object]) -> None:
    """Run a pass in a handler that kopf retries (a timer), raising kopf's typed errors: a transient
    apiserver failure is a ``TemporaryError`` with the apiserver's Retry-After (logged in one line, no
    traceback, retried after that delay). Anything else propagates, and kopf retries it after
    ``settings.execution.default_backoff``. No failure is a ``PermanentError``: a pass raises only on
    API failures, never on a bad spec (that is a condition), and a later attempt may well work (an
    RBAC fix, a webhook back)."""
    try:
        attempt()
    except Exception as error:
        delay = kube.transient_delay(error)
        if delay is None:
            raise
        raise kopf.TemporaryError(f"the apiserver failed transiently: {error}", delay=delay) from error


def _retrying(attempt: Callable[[], object], what: str) -> None:
    for delay in (*CHILD_EVENT_RETRIES_S, None):
        try:
            attempt()
            return
        except Exception as error:
            if delay is None:
                raise
            logger.warning("%s failed, retrying in %.0f s: %s", what, delay, error)
            time.sleep(delay)


# -- FineTuneJob -------------------------------------------------------------------------------------


def _reconcile(memo: Any, namespace: str | None, name: str) -> None:
    assert namespace is not None, "FineTuneJobs are namespaced"
    with logs.about(KIND, namespace, name), metrics.reconcile_pass(KIND):
        reconcile(memo["api_client"], namespace, name, memo["config"], memo["passes"])


def _reconcile_until_it_works(memo: Any, namespace: str | None, name: str) -> None:
    """A pass with quick retries; when those fail too, again every :data:`FAILED_PASS_RETRY_S` in
    the background until one works (kopf does not retry event handlers)."""
    try:
        _retrying(lambda: _reconcile(memo, namespace, name), f"FineTuneJob {namespace}/{name}")
    except Exception as error:
        what = f"FineTuneJob {namespace}/{name}: pass failed, retrying in {FAILED_PASS_RETRY_S:.0f} s"
        if kube.transient_delay(error) is None:
            logger.exception(what)
        else:  # an apiserver outage: one line, not a traceback per object
            logger.error("%s: %s", what, error)
        context = contextvars.copy_context()  # kopf's event poster lives in the context
        retry = threading.Timer(
            FAILED_PASS_RETRY_S, context.run, args=(_reconcile_until_it_works, memo, namespace, name)
        )
        retry.daemon = True
        retry.start()


async def _in_pool(memo: Any, work: Callable[[], None]) -> None:
    """Run blocking work in kopf's thread pool, in a copy of this context (as kopf runs sync handlers)."""
    context = contextvars.copy_context()
    await asyncio.get_running_loop().run_in_executor(memo["settings"].execution.executor, context.run, work)


def _needs_pass(memo: Any, type: str, uid: str, meta: kopf.Meta, status: kopf.Status) -> bool:
    """Whether a FineTuneJob's event may change what a pass would do: a generation (or a
    skip-feasibility annotation) this process has not reconciled. Our own status writes, and events
    older than them, show one it has."""
    key = spec_key(meta)
    reconciled: dict[str, SpecKey] = memo["passes"].generations
    if reconciled.get(uid) == key:
        return False
    if not type and ftj_status.finished(dict(status)) and status.get("observedGeneration") == key[0]:
        # The operator's start: a run that ended at this generation has nothing left to do.
        reconciled[uid] = key
        return False
    return True


@kopf.on.event(*FTJ)
async def finetunejob_event(
    memo: Any,
    namespace: str | None,
    name: str,
    uid: str,
    meta: kopf.Meta,
    status: kopf.Status,
    type: str,
    **kwargs: Any,
) -> None:
    """Every event of a FineTuneJob: a pass when it shows a new generation; the objects-by-phase
    metric; and the AdapterDeployments that serve its artifact, woken when that changes (the run
    ends, the object goes), not on every progress update."""
    metrics.record_phase(
        KIND, namespace or "", name, None if type == "DELETED" else status.get("phase", "Pending")
    )
    if type == "DELETED":
        kube.forget(PLURAL, namespace or "", name)
        memo["passes"].generations.pop(uid, None)
    elif _needs_pass(memo, type, uid, meta, status):
        await _in_pool(memo, lambda: _reconcile_until_it_works(memo, namespace, name))

    serving_by_finetunejob: kopf.Index[Any, str] = kwargs["serving_by_finetunejob"]
    key = (namespace, name)
    artifact = None if type == "DELETED" else (status.get("phase"), (status.get("result") or {}).get("uri"))
    if memo["artifacts"].get(key, ()) == artifact:
        return
    memo["artifacts"][key] = artifact
    if not type or key not in serving_by_finetunejob:
        return  # the initial listing: AdapterDeployments resume on their own
    for adep in list(serving_by_finetunejob[key]):
        await _in_pool(
            memo,
            lambda adep=adep: _retrying(  # type: ignore[misc]
                lambda: _reconcile_serving(memo, namespace, adep), f"AdapterDeployment {namespace}/{adep}"
            ),
        )
    if type == "DELETED":
        memo["artifacts"].pop(key, None)


def _training(status: kopf.Status, **_: Any) -> bool:
    return ftj_status.training(dict(status))


@kopf.timer(*FTJ, interval=PROGRESS_INTERVAL_S, sharp=False, when=_training)
def finetunejob_progress(memo: Any, namespace: str | None, name: str, **_: Any) -> None:
    _typed_errors(lambda: _reconcile(memo, namespace, name))


def _child_news(memo: Any, type: str, uid: str, fingerprint: tuple[Any, ...]) -> bool:
    """Whether a child's watch event may change its FineTuneJob's status: a deletion, or a change of
    what a pass reads (``fingerprint``). The initial listing only records it: the FineTuneJob's own
    resume handler covers it."""
    seen: dict[str, tuple[Any, ...]] = memo["passes"].children
    if type == "DELETED":
        seen.pop(uid, None)
        return True
    if seen.get(uid) == fingerprint:
        return False
    if not type:
        seen[uid] = fingerprint
        return False
    return True


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_FINETUNEJOB: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={LABEL_FINETUNEJOB: kopf.PRESENT})
async def worker_changed(
    memo: Any,
    namespace: str | None,
    labels: kopf.Labels,
    type: str,
    body: kopf.Body,
    uid: str,
    **_: Any,
) -> None:
    if not _child_news(memo, type, uid, ftj_status.child_fingerprint(dict(body))):
        return
    owner = labels[LABEL_FINETUNEJOB]
    # A pass that works records the fingerprints it read; a failed one does not, so the next event of
    # this child tries again, and so does the background retry: the child may change no more.
    await _in_pool(memo, lambda: _reconcile_until_it_works(memo, namespace, owner))


@kopf.on.event(kube.KUEUE_GROUP, kube.KUEUE_WORKLOADS, labels={kube.KUEUE_JOB_UID_LABEL: kopf.PRESENT})
async def workload_changed(
    memo: Any, namespace: str | None, type: str, body: kopf.Body, uid: str, **_: Any
) -> None:
    """Kueue's Workload of a queued worker Job says why the Job waits; nothing on the Job changes
    when that reason does. Without Kueue installed kopf serves no such resource (it logs a warning)."""
    # A deleted Workload needs no pass: its Job was admitted or is gone, and says so itself.
    if not _child_news(memo, type, uid, ftj_status.workload_fingerprint(dict(body))) or type == "DELETED":
        return
    owners = [
        ref["name"]
        for ref in body.get("metadata", {}).get("ownerReferences") or []
        if ref.get("kind") == "Job" and str(ref.get("apiVersion", "")).startswith("batch/")
    ]
    if not owners or namespace is None:
        return

    def pass_for_owner() -> None:
        try:
            worker = kube.read(memo["api_client"], "Job", namespace, owners[0])
        except Exception as error:  # the Job's own events will bring a pass anyway
            logger.warning("Workload of Job %s/%s: cannot read the Job: %s", namespace, owners[0], error)
            return
        owner = ((worker or {}).get("metadata", {}).get("labels") or {}).get(LABEL_FINETUNEJOB)
        if owner:
            _reconcile_until_it_works(memo, namespace, owner)

    await _in_pool(memo, pass_for_owner)


# -- AdapterDeployment -------------------------------------------------------------------------------


def _reconcile_serving(memo: Any, namespace: str | None, name: str) -> dict[str, Any] | None:
    assert namespace is not None, "AdapterDeployments are namespaced"
    with logs.about(ADEP_KIND, namespace, name), metrics.reconcile_pass(ADEP_KIND):
        return reconcile_adapterdeployment(memo["api_client"], namespace, name, memo["config"])


@kopf.index(*ADEP)
def serving_by_finetunejob(namespace: str | None, name: str, spec: kopf.Spec, **_: Any) -> dict[Any, str]:
    """(namespace, FineTuneJob name) -> the AdapterDeployments that serve its artifact."""
    return {
        (namespace, adapter["fineTuneJob"]): name
        for adapter in spec.get("adapters") or []
        if adapter.get("fineTuneJob")
    }


@kopf.on.resume(*ADEP)
@kopf.on.create(*ADEP)
@kopf.on.update(*ADEP)
def adapterdeployment_changed(memo: Any, namespace: str | None, name: str, **_: Any) -> None:
    _reconcile_serving(memo, namespace, name)


def _converging(status: kopf.Status, **_: Any) -> bool:
    """Ready pods still loading an adapter, or retrying one a retry may fix, or a canary stepping:
    these change with no event to wake a pass (:func:`kubetune.operator.serving.needs_polling`).
    Ready, idle and permanently failed objects have no timer at all."""
    return serving.needs_polling(dict(status))


@kopf.timer(*ADEP, interval=SERVING_CONVERGE_INTERVAL_S, sharp=False, when=_converging)
def adapterdeployment_converge(memo: Any, namespace: str | None, name: str, uid: str, **_: Any) -> None:
    # The timer ticks every SERVING_CONVERGE_INTERVAL_S; a pass runs only when the object's poll is
    # due, which backs off while passes find nothing new (serving_reconcile.PollSchedule).
    if not POLLS.due(uid):
        return
    status = None
    try:
        status = _reconcile_serving(memo, namespace, name)
    finally:
        POLLS.passed(uid, status)


@kopf.on.event(*ADEP)
async def adapterdeployment_event(
    namespace: str | None, name: str, status: kopf.Status, type: str, uid: str, **_: Any
) -> None:
    phase = None if type == "DELETED" else status.get("phase", "Pending")
    metrics.record_phase(ADEP_KIND, namespace or "", name, phase)
    if type == "DELETED":
        kube.forget(ADEP_PLURAL, namespace or "", name)
        POLLS.forget(uid)


@kopf.on.event("", "v1", "pods", labels={LABEL_ADAPTERDEPLOYMENT: kopf.PRESENT})
def serving_pod_changed(memo: Any, namespace: str | None, labels: kopf.Labels, type: str, **_: Any) -> None:
    if not type:
        return
    owner = labels[LABEL_ADAPTERDEPLOYMENT]
    _retrying(lambda: _reconcile_serving(memo, namespace, owner), f"AdapterDeployment {namespace}/{owner}")
