"""One pod on the node: its sandbox, its containers (run by the node's container runtime), and its
status.

A :class:`PodWorker` thread owns one pod from binding until its API object is gone. Its loop
is level-based like kubelet's ``syncPod``: each pass looks at the pod object and the
processes, starts/restarts/kills what should change, runs due probes, and patches the status
when it differs from what was last sent.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import urllib3

from kubetune.localcluster import network, procs
from kubetune.localcluster.kubeapi import ApiError
from kubetune.localcluster.nodeagent.dns import pod_hosts, pod_resolv_conf
from kubetune.localcluster.nodeagent.env import EnvError, container_command, container_env
from kubetune.localcluster.nodeagent.probes import ProbeState, http_get
from kubetune.localcluster.nodeagent.runtime import ContainerRun, ImageError, ImageInfo, Security
from kubetune.localcluster.nodeagent.services import service_env
from kubetune.localcluster.nodeagent.volumes import (
    VolumeContext,
    container_mounts,
    prepare_volumes,
    refresh_volumes,
)

if TYPE_CHECKING:
    from kubetune.localcluster.nodeagent.agent import NodeAgent

JSON = dict[str, Any]
log = logging.getLogger("kubetune.nodeagent")
_TICK_S = 0.1
# kubelet syncs ConfigMap/Secret volumes about once a minute; tests want to see changes sooner.
_VOLUME_SYNC_S = 2.0
# kubelet caps the termination message at 4 KiB, and the log fallback at 80 lines / 2 KiB.
_MAX_MESSAGE = 4096
_FALLBACK_LINES, _FALLBACK_BYTES = 80, 2048


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Container:
    """One container of the pod and its current process."""

    spec: JSON
    init: bool
    restart_count: int = 0
    proc: subprocess.Popen[bytes] | None = None
    run: ContainerRun | None = None  # the current (or last) run of this container
    image_id: str = ""
    pull_failures: int = 0
    started_at: str | None = None
    started_mono: float = 0.0
    state: JSON = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: JSON = field(default_factory=dict)
    succeeded: bool = False  # for init containers: completed with exit code 0
    finished: bool = False  # terminated and will not be restarted
    next_start: float = 0.0
    kill_deadline: float | None = None
    kill_reason: str = ""
    readiness: ProbeState | None = None
    liveness: ProbeState | None = None
    startup: ProbeState | None = None
    record: Path | None = None

    @property
    def name(self) -> str:
        name: str = self.spec["name"]
        return name

    @property
    def sidecar(self) -> bool:
        """A restartable init container: started in init order, then runs beside the app."""
        return self.init and self.spec.get("restartPolicy") == "Always"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def started(self) -> bool:
        return self.running and (self.startup is None or self.startup.result is True)

    @property
    def ready(self) -> bool:
        return self.started and (self.readiness is None or self.readiness.result is True)


class PodWorker(threading.Thread):
    def __init__(self, agent: NodeAgent, pod: JSON) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.gone = False  # the API object was deleted (no further status writes)
        self.wake = threading.Event()
        self.dir = agent.node_dir / "pods" / f"{self.namespace}_{self.pod_name}_{self.uid}"
        self.netns = f"kt-{agent.cluster_name}-{self.uid[:8]}"
        self.host_veth = "ktv" + self.uid.replace("-", "")[:8]
        self.pod_ip: str | None = None
        self.reported_ip: str | None = pod.get("status", {}).get("podIP")
        self.volume_paths: dict[str, Path] | None = None
        self.containers = [Container(c, True) for c in pod["spec"].get("initContainers", [])] + [
            Container(c, False) for c in pod["spec"]["containers"]
        ]
        self.config_error: str | None = None
        self.service_links: dict[str, str] = {}
        self.volumes_synced = 0.0
        self.completing = False  # main containers are done; sidecars are being stopped
        self.start_time = now_rfc3339()
        self.conditions: dict[str, JSON] = {}
        self.last_status: str | None = None
        self.terminal_phase: str | None = None

    # -- called from the agent's watch thread -------------------------------------------------

    def update(self, pod: JSON | None) -> None:
        if pod is None:
            self.gone = True
        else:
            self.pod = pod
        self.wake.set()

    # -- the loop -------------------------------------------------------------------------------

    @property
    def spec(self) -> JSON:
        spec: JSON = self.pod["spec"]
        return spec

    @property
    def restart_policy(self) -> str:
        policy: str = self.spec.get("restartPolicy", "Always")
        return policy

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s/%s: worker failed", self.namespace, self.pod_name)
            self._kill_all(grace=0)
        finally:
            self._teardown_sandbox()
            self.agent.worker_done(self)

    def _run(self) -> None:
        phase = self.pod.get("status", {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            # Finished before this worker started: only the deletion is left to do.
            self.terminal_phase = phase
        elif self.pod["metadata"].get("deletionTimestamp"):
            # Being deleted before it ever ran here (or after an earlier worker released it
            # while finalizers keep the object): never start it.
            self.terminal_phase = phase or "Pending"
        else:
            self._setup_sandbox()
        while True:
            deleting = (
                self.gone
                or self.agent.stopping.is_set()
                or bool(self.pod["metadata"].get("deletionTimestamp"))
            )
            if deleting:
                self._terminate()
                return
            if self.terminal_phase is None:
                self._sync_containers()
            self._publish_status()
            if self.terminal_phase is not None:
                # A finished pod keeps its reported IP but gives back its network, as kubelet does.
                self._teardown_sandbox()
            self.wake.wait(_TICK_S if self.terminal_phase is None else 5.0)
            self.wake.clear()

    # -- sandbox ---------------------------------------------------------------------------------

    @property
    def host_network(self) -> bool:
        return bool(self.spec.get("hostNetwork"))

    def _setup_sandbox(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.host_network:
            # The node's address is the bridge gateway; processes share the host's network.
            self.reported_ip = self.agent.gateway
        else:
            self.pod_ip = self.reported_ip = self.agent.allocate_ip(self.uid)
            record = self.agent.cluster_state / "netns" / self.netns
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(self.host_veth)
            self.agent.sandboxes[self.uid] = (self.netns, self.host_veth)
            network.create_pod_netns(
                self.netns, self.host_veth, self.agent.bridge,
                ipaddress.IPv4Interface(f"{self.pod_ip}/{self.agent.prefix_len}"), self.agent.gateway,
            )  # fmt: skip
        if self.spec.get("enableServiceLinks", True):
            services = self.agent.api.get(f"/api/v1/namespaces/{self.namespace}/services")["items"]
            self.service_links = service_env(services)
        assert self.reported_ip is not None
        (self.dir / "etc-hosts").write_text(pod_hosts(self.pod, self.reported_ip))
        resolv = pod_resolv_conf(self.pod, self.agent.gateway, self.agent.host_resolv_conf)
        (self.dir / "resolv.conf").write_text(resolv)
        self.conditions_set("PodReadyToStartContainers", True)

    def _teardown_sandbox(self) -> None:
        if self.pod_ip is None:
            return
        network.delete_pod_netns(self.netns, self.host_veth)
        (self.agent.cluster_state / "netns" / self.netns).unlink(missing_ok=True)
        self.agent.sandboxes.pop(self.uid, None)
        self.agent.release_ip(self.uid)
        self.pod_ip = None

    @property
    def hostname(self) -> str:
        name: str = self.spec.get("hostname") or self.pod_name
        return name[:63]

    # -- containers --------------------------------------------------------------------------

    def _volume_context(self) -> VolumeContext:
        return VolumeContext(
            get_object=lambda kind, name: self.agent.get_object(self.namespace, kind, name),
            request_token=lambda sa, source: self.agent.request_token(self.pod, sa, source),
            claim_dir=lambda claim: self.agent.claim_dir(self.namespace, claim),
        )

    def _sync_containers(self) -> None:
        now = time.monotonic()
        for c in self.containers:
            self._reap(c, now)
        if self.volume_paths is None:
            try:
                self.volume_paths = prepare_volumes(self._volume_context(), self.pod, self.dir)
                self.config_error = None
                self.volumes_synced = now
            except (EnvError, ApiError) as exc:
                self._config_error(str(exc))
                return
        elif now - self.volumes_synced >= _VOLUME_SYNC_S:
            self.volumes_synced = now
            try:
                refresh_volumes(self._volume_context(), self.pod, self.dir)
            except ApiError as exc:
                log.warning("pod %s/%s: volume refresh failed: %s", self.namespace, self.pod_name, exc)
        init = [c for c in self.containers if c.init]
        for c in init:
            # Init containers run one at a time; a sidecar (restartable init container) only
            # has to have started before the next one runs, and keeps running.
            if c.sidecar:
                if self.completing:
                    continue
                self._start_if_due(c, now)
                if c.running:
                    self._probe(c, now)
                if c.started:
                    continue
            elif c.succeeded:
                continue
            elif c.finished:
                self.terminal_phase = "Failed"  # an init container failed under restartPolicy Never
            else:
                self._start_if_due(c, now)
            incomplete = " ".join(i.name for i in init if not (i.started if i.sidecar else i.succeeded))
            message = f"containers with incomplete status: [{incomplete}]"
            self.conditions_set("Initialized", False, "ContainersNotInitialized", message)
            return
        self.conditions_set("Initialized", True)
        apps = [c for c in self.containers if not c.init]
        sidecars = [c for c in init if c.sidecar]
        for c in apps + sidecars:
            if not self.completing:
                self._start_if_due(c, now)
            if c.running:
                self._probe(c, now)
        if all(c.finished for c in apps):
            # Sidecars are stopped once the main containers are done, and do not decide the phase.
            self.completing = True
            for c in sidecars:
                self._kill(c, self._grace(), "main containers completed")
            if not any(c.proc is not None for c in sidecars):
                failed = any(c.state.get("terminated", {}).get("exitCode", 0) != 0 for c in apps)
                self.terminal_phase = "Failed" if failed else "Succeeded"

    def _start_if_due(self, c: Container, now: float) -> None:
        if not c.running and not c.finished and now >= c.next_start and c.kill_deadline is None:
            self._start(c)

    def _config_error(self, message: str) -> None:
        if self.config_error != message:
            log.info("pod %s/%s: %s", self.namespace, self.pod_name, message)
            self.agent.post_event(self.pod, "Warning", "Failed", f"Error: {message}")
        self.config_error = message
        for c in self.containers:
            if not c.running and not c.state.get("terminated"):
                c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": message}}

    def _termination_file(self, c: Container) -> Path:
        return self.dir / "termination" / f"{c.name}-{c.restart_count}"

    def _container_run(self, c: Container, env: dict[str, str]) -> ContainerRun:
        assert self.volume_paths is not None
        mounts = container_mounts(c.spec, self.volume_paths)
        mounts.append({"source": str(self.dir / "etc-hosts"), "target": "/etc/hosts", "readOnly": False})
        mounts.append(
            {"source": str(self.dir / "resolv.conf"), "target": "/etc/resolv.conf", "readOnly": False}
        )
        mounts.append({
            "source": str(self._termination_file(c)),
            "target": c.spec.get("terminationMessagePath") or "/dev/termination-log",
            "readOnly": False,
        })  # fmt: skip
        memory, cpu = ContainerRun.limits_of(c.spec)
        command, args = container_command(c.spec, env)
        return ContainerRun(
            id=f"kt-{self.uid[:8]}-{c.name}-{c.restart_count}",
            image=c.spec.get("image", ""),
            pull_policy=c.spec.get("imagePullPolicy") or "IfNotPresent",
            command=command,
            args=args,
            env=env,
            mounts=mounts,
            netns=None if self.host_network else f"/run/netns/{self.netns}",
            hostname=self.hostname,
            working_dir=c.spec.get("workingDir"),
            log_path=self.log_path(c),
            state_dir=self.dir,
            security=Security.of(self.spec, c.spec),
            memory_limit=memory,
            cpu_limit=cpu,
            labels={"io.kubetune.pod": f"{self.namespace}/{self.pod_name}", "io.kubetune.pod-uid": self.uid},
        )

    def _env(self, c: Container) -> dict[str, str]:
        # The pod's status may not carry its IP yet when its first container starts.
        status = {
            **self.pod.get("status", {}),
            "podIP": self.reported_ip,
            "podIPs": [{"ip": self.reported_ip}],
            "hostIP": self.agent.gateway,
            "hostIPs": [{"ip": self.agent.gateway}],
        }
        return container_env(
            {**self.pod, "status": status},
            c.spec,
            get_object=lambda kind, name: self.agent.get_object(self.namespace, kind, name),
            base_env={**self.service_links, **self.agent.base_env(self.hostname)},
            service_env=self.agent.service_env,
        )

    def log_path(self, c: Container, restart_count: int | None = None) -> Path:
        return self.dir / c.name / f"{c.restart_count if restart_count is None else restart_count}.log"

    def _pull(self, c: Container, now: float) -> ImageInfo | None:
        """Make the container's image available per its pull policy; None while it is not."""
        image = c.spec.get("image", "")
        runtime = self.agent.runtime
        try:
            info = runtime.ensure_image(image, c.spec.get("imagePullPolicy") or "IfNotPresent")
        except ImageError as exc:
            # As kubelet: the first failure is ErrImagePull, retries wait in ImagePullBackOff.
            delay = min(self.agent.restart_backoff_s * 2**c.pull_failures, self.agent.max_restart_backoff_s)
            reason = (
                exc.reason if c.pull_failures == 0 or exc.reason != "ErrImagePull" else "ImagePullBackOff"
            )
            message = exc.message if reason != "ImagePullBackOff" else f'Back-off pulling image "{image}"'
            if c.pull_failures == 0:
                self.agent.post_event(self.pod, "Warning", "Failed", exc.message, c.name)
                self.agent.post_event(self.pod, "Warning", "Failed", f"Error: {exc.reason}", c.name)
            c.pull_failures += 1
            c.next_start = now + delay
            c.state = {"waiting": {"reason": reason, "message": message}}
            return None
        if not c.image_id and runtime.name != "kubetune":
            self.agent.post_event(
                self.pod, "Normal", "Pulled", f'Container image "{image}" already present on machine', c.name
            )
        c.image_id, c.pull_failures = info.id, 0
        return info

    def _start(self, c: Container) -> None:
        now = time.monotonic()
        try:
            env = self._env(c)
        except EnvError as exc:
            self._config_error(str(exc))
            return
        image = self._pull(c, now)
        if image is None:
            return
        log_path = self.log_path(c)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        message_file = self._termination_file(c)
        message_file.parent.mkdir(parents=True, exist_ok=True)
        message_file.write_bytes(b"")
        message_file.chmod(0o666)
        run = self._container_run(c, env)
        try:
            where = f'pod: "{self.pod_name}_{self.namespace}({self.uid})", container: {c.name}'
            self.agent.runtime.verify(run, image, where)
        except EnvError as exc:
            c.next_start = now + self.agent.restart_backoff_s
            self._config_error(str(exc))
            return
        c.run = run
        c.proc = self.agent.runtime.start(run)
        c.record = procs.record(
            self.agent.node_dir / "containers", f"{self.uid[:8]}-{c.name}-{c.restart_count}", c.proc.pid
        )
        c.started_at = now_rfc3339()
        c.started_mono = time.monotonic()
        c.state = {"running": {"startedAt": c.started_at}}
        c.kill_deadline = None
        if not c.init or c.sidecar:
            probes = c.spec
            c.startup = (
                ProbeState(probes["startupProbe"], c.started_mono) if "startupProbe" in probes else None
            )
            c.liveness = (
                ProbeState(probes["livenessProbe"], c.started_mono) if "livenessProbe" in probes else None
            )
            c.readiness = (
                ProbeState(probes["readinessProbe"], c.started_mono) if "readinessProbe" in probes else None
            )
        log.info(
            "pod %s/%s: started container %s (pid %d)", self.namespace, self.pod_name, c.name, c.proc.pid
        )
        self.agent.post_event(self.pod, "Normal", "Started", f"Started container {c.name}", c.name)
        failure = self._run_hook(c, "postStart", self._grace() or 30.0)
        if failure:
            # kubelet kills a container whose postStart hook failed; it restarts per policy.
            self.agent.post_event(self.pod, "Warning", "FailedPostStartHook", failure, c.name)
            self._kill(c, self._grace(), "postStart hook failed")

    def _reap(self, c: Container, now: float) -> None:
        """Notice a container that exited, record how, and schedule its restart."""
        if c.proc is None:
            return
        if c.proc.poll() is None:
            if c.kill_deadline is not None and now >= c.kill_deadline and c.run is not None:
                self.agent.runtime.signal(c.run, c.proc, signal.SIGKILL)
            return
        assert c.run is not None
        result = self.agent.runtime.reap(c.run, c.proc)
        exit_code = result.code
        if c.record:
            c.record.unlink(missing_ok=True)
        c.proc = None
        terminated = {
            "exitCode": exit_code,
            "reason": result.reason,
            "startedAt": c.started_at,
            "finishedAt": now_rfc3339(),
            "containerID": self.container_id(c),
        }
        message = self._termination_message(c, exit_code) or result.message
        if message:
            terminated["message"] = message
        c.state = {"terminated": terminated}
        c.readiness = c.liveness = c.startup = None
        killed_by_probe = bool(c.kill_reason) and not self.pod["metadata"].get("deletionTimestamp")
        c.kill_deadline, c.kill_reason = None, ""
        if c.init:
            c.succeeded = exit_code == 0
        restart = (
            c.sidecar
            or (c.init and exit_code != 0 and self.restart_policy != "Never")
            or (not c.init and self.restart_policy == "Always")
            or (not c.init and self.restart_policy == "OnFailure" and exit_code != 0)
            or (killed_by_probe and self.restart_policy != "Never")
        )
        if c.sidecar and self.completing:
            restart = False
        if (c.init and not c.sidecar and exit_code == 0) or not restart:
            c.finished = True
        else:
            delay = min(self.agent.restart_backoff_s * 2**c.restart_count, self.agent.max_restart_backoff_s)
            # Like kubelet, a container that ran long enough starts its backoff over.
            if now - c.started_mono > 2 * self.agent.max_restart_backoff_s:
                delay = self.agent.restart_backoff_s
            c.last_state = {"terminated": terminated}
            if delay >= 1:
                message = f"Back-off restarting failed container {c.name} in pod {self.pod_name}"
                self.agent.post_event(self.pod, "Warning", "BackOff", message, c.name)
            c.restart_count += 1
            c.next_start = now + delay
            c.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {delay:g}s restarting failed container={c.name}",
                }
            }
        log.info("pod %s/%s: container %s exited with %d", self.namespace, self.pod_name, c.name, exit_code)

    def _termination_message(self, c: Container, exit_code: int) -> str:
        path = self._termination_file(c)
        try:
            message = path.read_bytes()[:_MAX_MESSAGE].decode(errors="replace")
        except OSError:
            message = ""
        if (
            not message
            and exit_code != 0
            and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        ):
            try:
                lines = self.log_path(c).read_bytes().splitlines()[-_FALLBACK_LINES:]
                message = b"\n".join(lines)[-_FALLBACK_BYTES:].decode(errors="replace")
            except OSError:
                pass
        return message

    def container_id(self, c: Container) -> str:
        run_id = c.run.id if c.run is not None else f"kt-{self.uid[:8]}-{c.name}-{c.restart_count}"
        return f"{self.agent.runtime.name}://{run_id}"

    def _run_hook(self, c: Container, hook: str, timeout: float) -> str | None:
        """Run the container's ``lifecycle`` hook; return why it failed, or None."""
        handler = (c.spec.get("lifecycle") or {}).get(hook)
        if not handler or timeout <= 0:
            return None
        try:
            if "exec" in handler:
                code = self._exec(c, handler["exec"]["command"], timeout)
                return None if code == 0 else f"command exited with {code}"
            if "httpGet" in handler:
                ok, message = http_get(handler["httpGet"], self.reported_ip or "127.0.0.1", c.spec, timeout)
                return None if ok else message
            if "sleep" in handler:
                time.sleep(min(float(handler["sleep"]["seconds"]), timeout))
        except (subprocess.TimeoutExpired, OSError, ValueError) as exc:
            return str(exc)
        return None

    def _kill(self, c: Container, grace: float, reason: str) -> None:
        if c.proc is None or c.kill_deadline is not None:
            return
        started = time.monotonic()
        failure = self._run_hook(c, "preStop", grace)
        if failure:
            self.agent.post_event(self.pod, "Warning", "FailedPreStopHook", failure, c.name)
        # As in kubelet, the preStop hook's time comes out of the grace period.
        grace = max(0.0, grace - (time.monotonic() - started))
        if c.run is not None and c.proc is not None:
            self.agent.runtime.signal(c.run, c.proc, signal.SIGTERM)
        c.kill_deadline = time.monotonic() + grace
        c.kill_reason = reason
        self.agent.post_event(self.pod, "Normal", "Killing", f"Stopping container {c.name}: {reason}", c.name)

    def _probe(self, c: Container, now: float) -> None:
        if c.kill_deadline is not None:
            return
        host = self.reported_ip or "127.0.0.1"

        def run_exec(command: list[str], timeout: float) -> int:
            return self._exec(c, command, timeout)

        if c.startup is not None and c.startup.result is not True:
            if c.startup.due(now):
                self._run_probe(c, c.startup, "Startup", host, run_exec)
            return
        if c.liveness is not None and c.liveness.due(now):
            self._run_probe(c, c.liveness, "Liveness", host, run_exec)
        if c.readiness is not None and c.readiness.due(now):
            self._run_probe(c, c.readiness, "Readiness", host, run_exec)

    def _run_probe(
        self,
        c: Container,
        probe: ProbeState,
        kind: str,
        host: str,
        run_exec: Callable[[list[str], float], int],
    ) -> None:
        result = probe.run(host, c.spec, run_exec)
        if probe.message:
            self.agent.post_event(
                self.pod, "Warning", "Unhealthy", f"{kind} probe failed: {probe.message}", c.name
            )
        if result is False and kind != "Readiness":
            # Like kubelet: a failed liveness or startup probe restarts the container.
            self._kill(c, self._grace(), f"{kind.lower()} probe failed")

    def _exec(self, c: Container, command: list[str], timeout: float) -> int:
        """Run ``command`` in the container (its namespaces and environment)."""
        if c.run is None:
            return 1
        return self.agent.runtime.exec(c.run, command, timeout)

    def _grace(self) -> float:
        seconds = self.pod["metadata"].get("deletionGracePeriodSeconds")
        if seconds is None:
            seconds = self.spec.get("terminationGracePeriodSeconds", 30)
        return float(seconds)

    def _kill_all(self, grace: float) -> None:
        for c in self.containers:
            self._kill(c, grace, "pod deleted")
            if grace == 0 and c.proc is not None and c.run is not None:
                self.agent.runtime.signal(c.run, c.proc, signal.SIGKILL)

    def _terminate(self) -> None:
        """SIGTERM every container, SIGKILL after the grace period, then release the pod."""
        grace = (
            min(self._grace(), self.agent.shutdown_grace_s) if self.agent.stopping.is_set() else self._grace()
        )
        if self.gone:
            grace = 0
        self._kill_all(grace)
        while any(c.proc is not None for c in self.containers):
            now = time.monotonic()
            for c in self.containers:
                self._reap(c, now)
            time.sleep(0.05)
        if self.gone:
            return
        if self.terminal_phase is None and any(c.started_at for c in self.containers):
            codes = [c.state.get("terminated", {}).get("exitCode", 0) for c in self.containers if not c.init]
            self.terminal_phase = "Succeeded" if not any(codes) else "Failed"
        # As kubelet does, the final status and the release are retried while the apiserver is away
        # (restarted, overloaded): a pod left Terminating would never get its Job a replacement.
        delay = 0.5
        while not (self._publish_status() and self._release()):
            if self.gone or self.agent.stopping.is_set():
                return
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _release(self) -> bool:
        """Delete the pod object; False when the apiserver could not be reached (retry)."""
        try:
            # Grace 0 tells the apiserver the node is done with the pod; the UID precondition
            # keeps a same-named successor from being deleted by mistake.
            self.agent.api.delete(
                f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}",
                {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}},
            )
        except ApiError as exc:
            return not _transient(exc)
        except urllib3.exceptions.HTTPError as exc:
            log.warning("pod %s/%s: release failed, retrying: %s", self.namespace, self.pod_name, exc)
            return False
        return True

    # -- status --------------------------------------------------------------------------------

    def conditions_set(self, kind: str, ok: bool, reason: str = "", message: str = "") -> None:
        status = "True" if ok else "False"
        previous = self.conditions.get(kind)
        condition: JSON = {"type": kind, "status": status, "lastProbeTime": None}
        condition["lastTransitionTime"] = (
            previous["lastTransitionTime"] if previous and previous["status"] == status else now_rfc3339()
        )
        if reason:
            condition["reason"] = reason
        if message:
            condition["message"] = message
        self.conditions[kind] = condition

    def _container_status(self, c: Container) -> JSON:
        status: JSON = {
            "name": c.name,
            "image": c.spec.get("image", ""),
            "imageID": c.image_id,
            "ready": c.ready,
            "started": c.started,
            "restartCount": c.restart_count,
            "state": c.state,
            "lastState": c.last_state,
        }
        if c.started_at:
            status["containerID"] = self.container_id(c)
        return status

    def _phase(self) -> str:
        if self.terminal_phase:
            return self.terminal_phase
        if any(c.running for c in self.containers if not c.init) or any(
            c.restart_count for c in self.containers if not c.init
        ):
            return "Running"
        return "Pending"

    def _publish_status(self) -> bool:
        """Report the pod's status; False when it did not reach the apiserver and is worth retrying."""
        if self.gone:
            return True
        apps = [c for c in self.containers if not c.init]
        phase = self._phase()
        if phase in ("Succeeded", "Failed"):
            self.conditions_set("ContainersReady", False, "PodCompleted")
            self.conditions_set("Ready", False, "PodCompleted")
            self.conditions_set("PodReadyToStartContainers", False)
        else:
            unready = [c.name for c in apps + [c for c in self.containers if c.sidecar] if not c.ready]
            message = f"containers with unready status: [{' '.join(unready)}]" if unready else ""
            self.conditions_set(
                "ContainersReady", not unready, "ContainersNotReady" if unready else "", message
            )
            self.conditions_set("Ready", not unready, "ContainersNotReady" if unready else "", message)
        ours = {"PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready"}
        others = [c for c in self.pod.get("status", {}).get("conditions", []) if c["type"] not in ours]
        status: JSON = {
            "phase": phase,
            "conditions": others + [self.conditions[k] for k in sorted(self.conditions)],
            "hostIP": self.agent.gateway,
            "hostIPs": [{"ip": self.agent.gateway}],
            "startTime": self.start_time,
            "initContainerStatuses": [self._container_status(c) for c in self.containers if c.init],
            "containerStatuses": [self._container_status(c) for c in apps],
            "qosClass": self.pod.get("status", {}).get("qosClass", "BestEffort"),
        }
        if self.reported_ip:
            status["podIP"] = self.reported_ip
            status["podIPs"] = [{"ip": self.reported_ip}]
        comparable = json.dumps(status, sort_keys=True)
        if comparable == self.last_status:
            return True
        try:
            updated = self.agent.api.merge_patch(
                f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}/status", {"status": status}
            )
        except ApiError as exc:
            if exc.status == 404:
                self.gone = True
                return True
            log.warning("pod %s/%s: status update failed: %s", self.namespace, self.pod_name, exc)
            return not _transient(exc)
        except urllib3.exceptions.HTTPError as exc:
            # The apiserver is unreachable: the next pass sends the status again.
            log.warning("pod %s/%s: status update failed: %s", self.namespace, self.pod_name, exc)
            return False
        self.last_status = comparable
        if updated.get("metadata", {}).get("uid") == self.uid:
            self.pod = updated
        return True


def _transient(exc: ApiError) -> bool:
    """An answer worth retrying: the apiserver overloaded, timing out or not ready yet."""
    return exc.status == 429 or exc.status >= 500
