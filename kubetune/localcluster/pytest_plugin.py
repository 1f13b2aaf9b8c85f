"""pytest fixtures for tests that need a Kubernetes cluster (register in ``tests/conftest.py``).

* ``cluster`` (session): a :class:`~kubetune.localcluster.testing.ClusterHandle`. With
  ``KUBECONFIG`` set it points at that cluster (kind, a real one); otherwise the embedded
  local cluster is started once per session and stopped at its end.
* ``api_client`` (session): ``cluster.api_client()``.
* ``namespace`` (function): a fresh namespace (its ``default`` ServiceAccount already
  exists, so pods can be created at once), deleted after the test without waiting.
* ``kueue_cluster`` (session): a second embedded cluster that also runs Kueue (its controller
  and webhooks, built by ``make kueue-build``; skipped when it is not built, failed instead
  with ``KUBETUNE_REQUIRE_KUEUE=1``, as ``make test`` sets); only the tests that ask for it
  start it. With ``KUBECONFIG`` set, that cluster, if it has Kueue's CRDs.

Set ``KUBETUNE_SKIP_CLUSTER=1`` to skip cluster tests instead of failing when no cluster can
be started (not root, binaries not built).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import pytest

from kubetune.localcluster.testing import ClusterHandle, wait_for

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

# Tests want crashed containers back quickly; kubelet's 10 s would dominate their runtime.
_TEST_RESTART_BACKOFF_S = 0.5
_TEST_MAX_RESTART_BACKOFF_S = 5.0


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterHandle]:
    yield from session_cluster(runtime="process")


def session_cluster(runtime: str, *, kueue: bool = False) -> Iterator[ClusterHandle]:
    """The body of a session ``cluster`` fixture: ``KUBECONFIG``'s cluster when set, else an
    embedded one whose node runs containers with ``runtime`` (``process`` or ``podman``), with
    Kueue when ``kueue``. A Kueue that is not built skips the tests, or fails them with
    ``KUBETUNE_REQUIRE_KUEUE=1``: ``make test`` builds it first (``make kueue-build``), since a
    cold build takes minutes, too long to start inside a test.

    A conftest that needs real containers overrides ``cluster`` with
    ``yield from session_cluster(runtime="podman")``.
    """
    kubeconfig = os.environ.get("KUBECONFIG")
    if kubeconfig:
        yield ClusterHandle(Path(kubeconfig.split(os.pathsep)[0]))
        return
    from kubetune.localcluster.binaries import BinariesMissing, find_kueue
    from kubetune.localcluster.controlplane import ClusterError, ClusterOptions, LocalCluster, NodeOptions

    local = LocalCluster(
        ClusterOptions(
            nodes=[NodeOptions(runtime=runtime)],
            restart_backoff_s=_TEST_RESTART_BACKOFF_S,
            max_restart_backoff_s=_TEST_MAX_RESTART_BACKOFF_S,
            kueue=kueue,
        )
    )
    if kueue:
        try:
            find_kueue()
        except BinariesMissing as exc:
            if os.environ.get("KUBETUNE_REQUIRE_KUEUE") == "1":
                pytest.fail(f"Kueue is not built (KUBETUNE_REQUIRE_KUEUE=1): {exc}", pytrace=False)
            pytest.skip(f"Kueue is not built: {exc}")
    try:
        local.start()
    except (BinariesMissing, ClusterError) as exc:
        if os.environ.get("KUBETUNE_SKIP_CLUSTER"):
            pytest.skip(f"no local cluster: {exc}")
        pytest.fail(f"could not start the local cluster: {exc}", pytrace=False)
    previous = _stop_on_sigterm()
    try:
        yield ClusterHandle(local.kubeconfig, local)
    finally:
        local.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm() -> signal.Handlers | None:
    """Turn SIGTERM (CI timeouts, `kill`) into KeyboardInterrupt so fixture finalizers stop
    the cluster; pytest's default is to die at once, leaving containers to the next reaper."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    return signal.SIG_DFL


@pytest.fixture(scope="session")
def kueue_cluster() -> Iterator[ClusterHandle]:
    for handle in session_cluster(runtime="process", kueue=True):
        if not handle.is_local:
            from kubernetes import client
            from kubernetes.client.rest import ApiException

            try:
                client.ApiextensionsV1Api(handle.api_client()).read_custom_resource_definition(
                    "clusterqueues.kueue.x-k8s.io"
                )
            except ApiException:
                pytest.skip("the KUBECONFIG cluster has no Kueue")
        yield handle


@pytest.fixture(scope="session")
def api_client(cluster: ClusterHandle) -> ApiClient:
    return cluster.api_client()


@pytest.fixture
def namespace(cluster: ClusterHandle, request: pytest.FixtureRequest) -> Iterator[str]:
    yield from fresh_namespace(cluster, request.node.name)


def fresh_namespace(cluster: ClusterHandle, test_name: str) -> Iterator[str]:
    """The body of a ``namespace`` fixture on ``cluster``, named after ``test_name``."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(cluster.api_client())
    base = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    name = f"{base}-{secrets.token_hex(3)}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))

    def default_service_account() -> bool:
        accounts = core.list_namespaced_service_account(name).items
        return any(sa.metadata is not None and sa.metadata.name == "default" for sa in accounts)

    wait_for(default_service_account, 30, description=f"ServiceAccount {name}/default")
    yield name
    # Not awaited: namespace deletion is asynchronous and the session's end stops everything.
    try:
        core.delete_namespace(name, propagation_policy="Background")
    except ApiException as exc:
        if exc.status != 404:  # the test deleted it itself
            raise
