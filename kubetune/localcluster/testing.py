"""Helpers for tests that run against a cluster: waiting without sleeps and reading logs.

:class:`ClusterHandle` is what the ``cluster`` fixture yields. It wraps either a
:class:`~kubetune.localcluster.controlplane.LocalCluster` started for the session or an
existing cluster named by ``KUBECONFIG`` (kind, a real cluster); features that need the
local node agent (:meth:`ClusterHandle.add_node`, log files) say so when unavailable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from kubetune.localcluster.controlplane import LocalCluster

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """:func:`wait_for` gave up; the message says what was awaited and what was last seen."""


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    *,
    interval: float = 0.1,
    description: str | Callable[[], str] = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    ``timeout`` and ``interval`` are seconds. Exceptions listed in ``ignore`` count as "not
    yet" (e.g. ``ApiException`` while an object does not exist). On timeout a
    :class:`WaitTimeout` names ``description`` (called if callable, to show the state of the
    world at that moment), the last value and the last ignored exception.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    last_error: BaseException | None = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except ignore as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    what = description() if callable(description) else description
    what = what or getattr(predicate, "__name__", repr(predicate))
    detail = f"; last error: {last_error!r}" if last_error else ""
    raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}; last value: {last!r}{detail}")


def condition_status(obj: Any, kind: str) -> str | None:
    """The ``status`` of condition ``kind`` on a client model or dict (None when absent)."""
    status = obj.get("status") if isinstance(obj, dict) else obj.status
    conditions = (
        status.get("conditions") if isinstance(status, dict) else getattr(status, "conditions", None)
    ) or []
    for condition in conditions:
        if isinstance(condition, dict):
            if condition["type"] == kind:
                return str(condition["status"])
        elif condition.type == kind:
            return str(condition.status)
    return None


@dataclass(frozen=True)
class BuiltImages:
    """The image refs ``make images`` built (it writes them to ``_out/images.env``)."""

    operator: str
    worker: str

    @classmethod
    def read(cls, env_file: Path) -> BuiltImages:
        """Parse ``KEY=VALUE`` lines; raises ``FileNotFoundError`` or ``KeyError`` naming what is missing."""
        values = dict(
            line.split("=", 1)
            for line in env_file.read_text().splitlines()
            if "=" in line and not line.lstrip().startswith("#")
        )
        return cls(values["KUBETUNE_OPERATOR_IMAGE"], values["KUBETUNE_WORKER_IMAGE"])

    def helm_values(self, pull_policy: str = "IfNotPresent") -> list[str]:
        """``helm --set`` arguments that point the chart's operator, worker and server at them."""
        values = []
        for component, ref in (("operator", self.operator), ("worker", self.worker)):
            repository, _, tag = ref.rpartition(":")
            values += [
                "--set", f"{component}.image.repository={repository}",
                "--set", f"{component}.image.tag={tag}",
                "--set", f"{component}.image.pullPolicy={pull_policy}",
            ]  # fmt: skip
        return values


class ClusterHandle:
    """A cluster for tests: kubeconfig, API client, kubectl/helm, logs and extra nodes."""

    def __init__(self, kubeconfig: Path, local: LocalCluster | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.local = local
        self._api_client: ApiClient | None = None
        self._helm: Path | None = None
        if local is not None:
            self._helm = local.binaries.get("helm")

    @property
    def is_local(self) -> bool:
        return self.local is not None

    def api_client(self) -> ApiClient:
        """A ``kubernetes.client.ApiClient`` for this cluster (one per handle, reused)."""
        if self._api_client is None:
            from kubernetes import client, config

            configuration = client.Configuration()
            config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=configuration)
            self._api_client = client.ApiClient(configuration)
        return self._api_client

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (kubectl, helm, the operator) aimed at this cluster."""
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        if self._helm is not None:
            env["PATH"] = f"{self._helm.parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl`` against this cluster; raises with kubectl's stderr when ``check``."""
        return self._run("kubectl", args, check, input)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run("helm", args, check, None)

    def _run(
        self, tool: str, args: tuple[str, ...], check: bool, input: str | None
    ) -> subprocess.CompletedProcess[str]:
        env = self.env()
        binary = shutil.which(tool, path=env["PATH"])
        if binary is None:
            raise FileNotFoundError(f"{tool} not found on PATH (make venv / make cluster-build provide it)")
        proc = subprocess.run(
            [binary, *args], env=env, capture_output=True, text=True, input=input, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
            )
        return proc

    def read_log(
        self, namespace: str, pod: str, container: str | None = None, *, previous: bool = False
    ) -> str:
        """A container's log. On the local cluster it is read from the node agent's files
        (stdout and stderr interleaved); elsewhere it comes from the API."""
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        if self.local is None:
            text: str = core.read_namespaced_pod_log(pod, namespace, container=container, previous=previous)
            return text
        obj = core.read_namespaced_pod(pod, namespace)
        return read_container_log(self.local, obj.to_dict(), container, previous=previous)

    def describe(self, namespace: str, *, log_lines: int = 40) -> str:
        """What a failed wait needs to explain itself: the namespace's pods (phase, each
        container's state and restarts), its newest events and, on the local cluster, the end of
        every node agent's log. Never raises: it is called while reporting another failure."""
        lines: list[str] = []
        try:
            pods = self.kubectl("get", "pods", "-n", namespace, "-o", "json", check=False).stdout
            for pod in json.loads(pods or "{}").get("items", []):
                status = pod.get("status") or {}
                lines.append(
                    f"pod {pod['metadata']['name']}: {status.get('phase')} {status.get('message') or ''}"
                )
                for container in status.get("containerStatuses") or []:
                    state = json.dumps(container.get("state"), sort_keys=True)
                    lines.append(f"  {container['name']}: restarts={container.get('restartCount')} {state}")
            events = self.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False)
            lines += ["events:", *events.stdout.splitlines()[-20:]]
        except Exception as error:  # a report must not hide the failure it explains
            lines.append(f"(could not read the namespace: {error})")
        if self.local is not None:
            for log in sorted((self.local.state_dir / "logs").glob("node-*.log")):
                tail = log.read_text(errors="replace").splitlines()[-log_lines:]
                lines += [f"{log.name} (last {len(tail)} lines):", *tail]
        return "\n".join(lines)

    def restart_apiserver(self, down_s: float = 0.0) -> float:
        """Stop the apiserver, keep it down ``down_s`` seconds, start it again and wait until it
        is ready; returns the seconds it was unreachable. Every watch on it breaks. Only on the
        local cluster: raises ``NotImplementedError`` elsewhere (tests skip)."""
        if self.local is None:
            raise NotImplementedError("restarting the apiserver needs the embedded local cluster")
        started = time.monotonic()
        self.local.restart_apiserver(down_s)
        return time.monotonic() - started

    @contextmanager
    def add_node(self, name: str, *, gpus: int = 0, runtime: str | None = None) -> Iterator[str]:
        """Run an extra node agent for the duration of the ``with`` block; yields its name.

        It runs containers with ``runtime``, by default the same as the cluster's first node.
        Only on the local cluster: raises ``NotImplementedError`` elsewhere (tests skip).
        """
        if self.local is None:
            raise NotImplementedError("extra nodes need the embedded local cluster")
        from kubetune.localcluster.controlplane import NodeOptions

        runtime = runtime or self.local.options.nodes[0].runtime
        self.local.add_node(NodeOptions(name=name, gpus=gpus, runtime=runtime))
        try:
            yield name
        finally:
            self.local.remove_node(name)


def read_container_log(
    cluster: LocalCluster, pod: dict[str, Any], container: str | None = None, *, previous: bool = False
) -> str:
    """Read a container's log file on the local cluster (latest run, or the one before)."""
    meta, spec = pod["metadata"], pod["spec"]
    container = container or spec["containers"][0]["name"]
    node = spec.get("node_name") or spec.get("nodeName")
    if not node:
        # Not scheduled yet: no node holds a log, just as `kubectl logs` finds none.
        raise FileNotFoundError(f"pod {meta['namespace']}/{meta['name']} is not scheduled to a node yet")
    pod_dir = cluster.node_dir(node) / "pods"
    log_dir = pod_dir / f"{meta['namespace']}_{meta['name']}_{meta['uid']}" / container
    runs = sorted((int(p.stem) for p in log_dir.glob("*.log") if p.stem.isdigit()), reverse=True)
    index = 1 if previous else 0
    if len(runs) <= index:
        raise FileNotFoundError(
            f"no {'previous ' if previous else ''}log for container {container} in {log_dir}"
        )
    return (log_dir / f"{runs[index]}.log").read_text(errors="replace")
