"""Container runtimes: how the node agent starts, signals, reaps and execs into one container.

:class:`PodmanRuntime` is what kubelet does with a CRI runtime: the container runs from the image
the pod names (``imagePullPolicy`` against the local image store), in the pod's network
namespace, with its volumes bind-mounted, as the user and groups of its ``securityContext``
(``runAsNonRoot`` checked against the image), a read-only root filesystem when asked, dropped
capabilities, no privilege escalation, and memory and CPU limits enforced by cgroups. A
container killed for exceeding its memory limit is reported ``OOMKilled``.

:class:`ProcessRuntime` runs the command as a host process from the agent's Python environment
(images are recorded, never run, and nothing in ``securityContext`` or ``resources`` is
enforced). It starts in milliseconds, which is why the node agent's own tests use it.

Both are driven by :class:`~kubetune.localcluster.nodeagent.pod.PodWorker` through the same five
calls: :meth:`ensure_image`, :meth:`verify`, :meth:`start`, :meth:`signal`, :meth:`reap`, plus
:meth:`exec` for probes and hooks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from kubetune.localcluster import procs
from kubetune.localcluster.nodeagent.env import EnvError, parse_quantity

JSON = dict[str, Any]
log = logging.getLogger("kubetune.nodeagent")
LAUNCHER = Path(__file__).with_name("_launch.py")
#: The project's containers.conf: lower default ulimits (the sandbox lacks CAP_SYS_RESOURCE) and
#: runc (crun refuses hybrid cgroups). Used unless CONTAINERS_CONF is already set.
CONTAINERS_CONF = Path(__file__).with_name("containers.conf")
_MEMORY_CGROUP = Path("/sys/fs/cgroup/memory")
CLUSTER_LABEL = "io.kubetune.cluster"
_PULL_TIMEOUT_S = 120.0
_PODMAN_TIMEOUT_S = 60.0


class ImageError(Exception):
    """The image cannot be used: ``reason`` is kubelet's waiting reason (``ErrImagePull``,
    ``ErrImageNeverPull``, ``InvalidImageName``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ImageInfo:
    id: str = ""
    user: str = ""  # the image's USER ("" means root)


@dataclass(frozen=True)
class Security:
    """A container's effective security settings: the container's ``securityContext`` over the
    pod's, as kubelet merges them."""

    run_as_user: int | None = None
    run_as_group: int | None = None
    supplemental_groups: tuple[int, ...] = ()
    run_as_non_root: bool = False
    read_only_root: bool = False
    privileged: bool = False
    allow_privilege_escalation: bool | None = None
    capabilities_add: tuple[str, ...] = ()
    capabilities_drop: tuple[str, ...] = ()
    seccomp: str | None = None  # RuntimeDefault | Unconfined | Localhost

    @classmethod
    def of(cls, pod_spec: JSON, container: JSON) -> Security:
        pod = pod_spec.get("securityContext") or {}
        own = container.get("securityContext") or {}

        def pick(key: str) -> Any:
            return own[key] if own.get(key) is not None else pod.get(key)

        groups = [int(g) for g in pod.get("supplementalGroups") or []]
        if pod.get("fsGroup") is not None:
            # kubelet adds fsGroup to every container's groups so shared volumes are writable.
            groups.append(int(pod["fsGroup"]))
        capabilities = own.get("capabilities") or {}
        seccomp = (pick("seccompProfile") or {}).get("type")
        return cls(
            run_as_user=pick("runAsUser"),
            run_as_group=pick("runAsGroup"),
            supplemental_groups=tuple(dict.fromkeys(groups)),
            run_as_non_root=bool(pick("runAsNonRoot")),
            read_only_root=bool(own.get("readOnlyRootFilesystem")),
            privileged=bool(own.get("privileged")),
            allow_privilege_escalation=own.get("allowPrivilegeEscalation"),
            capabilities_add=tuple(capabilities.get("add") or ()),
            capabilities_drop=tuple(capabilities.get("drop") or ()),
            seccomp=seccomp,
        )


@dataclass
class ContainerRun:
    """One run (start) of one container: everything a runtime needs, resolved by the pod worker."""

    id: str  # unique per node: pod uid prefix, container name, restart count
    image: str
    pull_policy: str
    command: list[str] | None  # replaces the image's ENTRYPOINT (and drops its CMD)
    args: list[str] | None  # replaces the image's CMD
    env: dict[str, str]
    mounts: list[JSON]  # {"source", "target", "readOnly"}
    netns: str | None  # path of the pod's network namespace; None for hostNetwork
    hostname: str
    working_dir: str | None
    log_path: Path
    state_dir: Path  # the pod's directory on the node, for the runtime's own files
    security: Security = field(default_factory=Security)
    memory_limit: int | None = None  # bytes
    cpu_limit: Decimal | None = None  # cores
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def limits_of(cls, container: JSON) -> tuple[int | None, Decimal | None]:
        limits = (container.get("resources") or {}).get("limits") or {}
        memory = int(parse_quantity(str(limits["memory"]))) if "memory" in limits else None
        cpu = parse_quantity(str(limits["cpu"])) if "cpu" in limits else None
        return memory, cpu


@dataclass(frozen=True)
class Exit:
    """How a container ended: kubelet's ``state.terminated`` reason, exit code and message."""

    code: int
    reason: str  # Completed | Error | OOMKilled | StartError
    message: str = ""


class ContainerRuntime(Protocol):
    name: str  # the containerID scheme, e.g. "podman"

    @property
    def version(self) -> str:
        """The Node's ``containerRuntimeVersion``."""
        ...

    def ensure_image(self, image: str, pull_policy: str) -> ImageInfo: ...

    def verify(self, run: ContainerRun, image: ImageInfo, where: str) -> None: ...

    def start(self, run: ContainerRun) -> subprocess.Popen[bytes]: ...

    def signal(self, run: ContainerRun, proc: subprocess.Popen[bytes], sig: int) -> None: ...

    def reap(self, run: ContainerRun, proc: subprocess.Popen[bytes]) -> Exit: ...

    def exec(self, run: ContainerRun, command: list[str], timeout: float) -> int: ...

    def sweep(self) -> None: ...


def _exit_of(returncode: int) -> int:
    # A signal death is reported as 128 + signal, as container runtimes do.
    return 128 - returncode if returncode < 0 else returncode


class ProcessRuntime:
    """Containers as host processes in the pod's namespaces (see :mod:`._launch`)."""

    name = "kubetune"

    @property
    def version(self) -> str:
        return "kubetune://processes"

    def ensure_image(self, image: str, pull_policy: str) -> ImageInfo:
        return ImageInfo()

    def verify(self, run: ContainerRun, image: ImageInfo, where: str) -> None:
        if not (run.command or run.args):
            raise EnvError("container has no command: images are not run, so the command must be given")

    def _launch_spec(self, run: ContainerRun, argv: list[str], log_path: Path) -> Path:
        spec_file = run.state_dir / "specs" / f"{run.id}.json"
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        spec = {
            "argv": argv,
            "env": run.env,
            "log": str(log_path),
            "netns": run.netns,
            "hostname": run.hostname,
            "mounts": run.mounts,
            "workingDir": run.working_dir,
        }
        spec_file.write_text(json.dumps(spec))
        spec_file.chmod(0o600)  # the environment may hold Secret values
        return spec_file

    @staticmethod
    def _host_mounts(mounts: list[JSON]) -> list[JSON]:
        """The mounts a host process can take: one over a directory that holds the agent's own
        environment (a checkout or venv under /tmp, with an emptyDir at /tmp) would hide the very
        interpreter and code the container runs, so it is left out."""
        own = [Path(sys.executable).parent, Path(__file__).resolve().parents[3], Path.cwd()]
        own += [Path(os.path.realpath(p)) for p in own]
        return [m for m in mounts if not any(p.is_relative_to(m["target"]) for p in own)]

    def start(self, run: ContainerRun) -> subprocess.Popen[bytes]:
        run = replace(run, mounts=self._host_mounts(run.mounts))
        spec_file = self._launch_spec(run, [*(run.command or []), *(run.args or [])], run.log_path)
        return subprocess.Popen(
            [sys.executable, "-I", "-S", str(LAUNCHER), str(spec_file)],
            stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True,
        )  # fmt: skip

    def signal(self, run: ContainerRun, proc: subprocess.Popen[bytes], sig: int) -> None:
        if sig == signal.SIGKILL:
            procs.kill_group(proc.pid, sig)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)

    def reap(self, run: ContainerRun, proc: subprocess.Popen[bytes]) -> Exit:
        code = _exit_of(proc.returncode)
        # The main process is the container: whatever it left running dies with it.
        procs.kill_group(proc.pid, signal.SIGKILL)
        return Exit(code, "Completed" if code == 0 else "Error")

    def exec(self, run: ContainerRun, command: list[str], timeout: float) -> int:
        run = replace(run, mounts=self._host_mounts(run.mounts))
        spec_file = self._launch_spec(run, command, run.state_dir / "exec.log")
        return subprocess.run(
            [sys.executable, "-I", "-S", str(LAUNCHER), str(spec_file)], timeout=timeout, check=False
        ).returncode

    def sweep(self) -> None:
        """Processes are recorded and reaped by :mod:`kubetune.localcluster.procs`."""


class PodmanRuntime:
    """Containers run by podman (runc) from local images; see the module docstring.

    Memory limits are set on a per-run parent cgroup the agent owns (``--cgroup-parent``), not
    with ``--memory``: with cgroup v1 the OOM event is counted on the cgroup whose limit was hit,
    and the container's own cgroup is gone by the time its exit is seen. An eventfd registered
    on the parent's ``memory.oom_control`` tells an OOM kill from any other SIGKILL.
    """

    name = "podman"

    def __init__(self, cluster_name: str, node_name: str, *, podman: str = "podman") -> None:
        self.binary = shutil.which(podman) or podman
        # Several clusters may run at once, each with a "node-1": labels and cgroups name both.
        self.cluster_label = f"{CLUSTER_LABEL}={cluster_name}"
        self.label = f"io.kubetune.node={cluster_name}.{node_name}"
        self.cgroup_root = f"kubetune/{cluster_name}.{node_name}"
        self._oom_fds: dict[str, int] = {}
        self.env = podman_env()
        self._version = ""

    @property
    def version(self) -> str:
        if not self._version:
            try:
                proc = self._podman("version", "--format", "{{.Client.Version}}")
            except subprocess.TimeoutExpired:
                # podman waits for its store's lock while an image build commits a layer; the
                # version is only reported, so the node registers without it rather than fail.
                log.warning("podman version timed out; reporting the runtime version as unknown")
                return "podman://unknown"
            if proc.returncode != 0:
                raise RuntimeError(f"podman is not usable: {proc.stderr.strip()}")
            self._version = f"podman://{proc.stdout.strip()}"
        return self._version

    def _podman(
        self, *args: str, timeout: float = _PODMAN_TIMEOUT_S, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, *args],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    # -- images -----------------------------------------------------------------------------

    def _inspect_image(self, image: str) -> ImageInfo | None:
        proc = self._podman("image", "inspect", "--format", "{{.Id}}\t{{.Config.User}}", image)
        if proc.returncode != 0:
            return None
        image_id, _, user = proc.stdout.strip().partition("\t")
        return ImageInfo(f"sha256:{image_id}", user)

    def ensure_image(self, image: str, pull_policy: str) -> ImageInfo:
        if not image:
            raise ImageError("InvalidImageName", "container has no image")
        info = self._inspect_image(image)
        if pull_policy == "Never":
            if info is None:
                raise ImageError(
                    "ErrImageNeverPull", f'Container image "{image}" is not present with pull policy of Never'
                )
            return info
        if pull_policy == "IfNotPresent" and info is not None:
            return info
        try:
            proc = self._podman("pull", "--quiet", image, timeout=_PULL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ImageError(
                "ErrImagePull", f'Failed to pull image "{image}": timed out after {_PULL_TIMEOUT_S:g}s'
            ) from None
        if proc.returncode != 0:
            detail = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise ImageError("ErrImagePull", f'Failed to pull image "{image}": {detail}')
        pulled = self._inspect_image(image)
        if pulled is None:
            raise ImageError("ErrImagePull", f'Failed to pull image "{image}": not in the store after pull')
        return pulled

    def verify(self, run: ContainerRun, image: ImageInfo, where: str) -> None:
        """kubelet's ``verifyRunAsNonRoot``: refuse what would run as root under runAsNonRoot."""
        sec = run.security
        if not sec.run_as_non_root:
            return
        if sec.run_as_user is not None:
            if sec.run_as_user == 0:
                raise EnvError(f"container's runAsUser breaks non-root policy ({where})")
            return
        user = image.user.split(":", 1)[0]
        if user in ("", "root", "0"):
            raise EnvError(f"container has runAsNonRoot and image will run as root ({where})")
        if not user.isdigit():
            raise EnvError(
                f"container has runAsNonRoot and image has non-numeric user ({user}), "
                f"cannot verify user is non-root ({where})"
            )

    # -- cgroups ----------------------------------------------------------------------------

    def _cgroup(self, run: ContainerRun) -> Path:
        return _MEMORY_CGROUP / self.cgroup_root / run.id

    def _prepare_cgroup(self, run: ContainerRun) -> None:
        path = self._cgroup(run)
        path.mkdir(parents=True, exist_ok=True)
        if run.memory_limit is None:
            return
        limit = str(run.memory_limit)
        (path / "memory.limit_in_bytes").write_text(limit)
        # No swap beyond the limit, as kubelet (swap is off on Kubernetes nodes by default).
        with contextlib.suppress(OSError):
            (path / "memory.memsw.limit_in_bytes").write_text(limit)
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        ofd = os.open(path / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        try:
            (path / "cgroup.event_control").write_text(f"{efd} {ofd}")
        finally:
            os.close(ofd)
        self._oom_fds[run.id] = efd

    def _oom_killed(self, run: ContainerRun) -> bool:
        efd = self._oom_fds.pop(run.id, None)
        if efd is None:
            return False
        try:
            return os.eventfd_read(efd) > 0
        except BlockingIOError:
            return False
        finally:
            os.close(efd)

    def _remove_cgroup(self, run: ContainerRun) -> None:
        for controller in _MEMORY_CGROUP.parent.iterdir():
            path = controller / self.cgroup_root / run.id
            # Children first (podman's libpod-<id> and conmon); rmdir fails while in use.
            for child in sorted(path.glob("**/"), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    child.rmdir()

    # -- containers -------------------------------------------------------------------------

    def _run_argv(self, run: ContainerRun) -> tuple[list[str], dict[str, str]]:
        sec = run.security
        argv = [
            self.binary, "run", "--name", run.id, "--pull", "never", "--log-driver", "none",
            "--label", self.label, "--label", self.cluster_label, "--http-proxy=false", "--no-hosts",
            "--uts", "private", "--hostname", run.hostname,
            "--cgroup-parent", f"/{self.cgroup_root}/{run.id}",
        ]  # fmt: skip
        argv += ["--network", f"ns:{run.netns}" if run.netns else "host"]
        for key, value in run.labels.items():
            argv += ["--label", f"{key}={value}"]
        for mount in run.mounts:
            options = "ro" if mount.get("readOnly") else "rw"
            argv += ["--volume", f"{mount['source']}:{mount['target']}:{options},rbind"]
        if sec.run_as_user is not None or sec.run_as_group is not None:
            user = str(sec.run_as_user) if sec.run_as_user is not None else "0"
            argv += ["--user", user if sec.run_as_group is None else f"{user}:{sec.run_as_group}"]
        for group in sec.supplemental_groups:
            argv += ["--group-add", str(group)]
        if sec.read_only_root:
            # kubelet mounts no tmpfs of its own: every writable path must be a volume.
            argv += ["--read-only", "--read-only-tmpfs=false"]
        if sec.privileged:
            argv.append("--privileged")
        for cap in sec.capabilities_drop:
            argv += ["--cap-drop", cap.lower()]
        for cap in sec.capabilities_add:
            argv += ["--cap-add", cap.lower()]
        if sec.allow_privilege_escalation is False:
            argv += ["--security-opt", "no-new-privileges"]
        if sec.seccomp != "RuntimeDefault" and not sec.privileged:
            # Kubernetes' default is Unconfined unless the pod asks for the runtime's profile.
            argv += ["--security-opt", "seccomp=unconfined"]
        if run.cpu_limit is not None:
            argv += ["--cpus", str(run.cpu_limit)]
        if run.working_dir:
            argv += ["--workdir", run.working_dir]
        # Values reach podman through its environment, never its argv (Secrets must not show in ps).
        env = dict(self.env)
        for key, value in run.env.items():
            if key in self.env:
                argv += ["--env", f"{key}={value}"]  # a name podman itself needs (PATH, HOME)
            else:
                argv += ["--env", key]
                env[key] = value
        if run.command is not None:
            argv += ["--entrypoint", json.dumps(run.command)]
        argv.append(run.image)
        argv += run.args or []
        return argv, env

    def start(self, run: ContainerRun) -> subprocess.Popen[bytes]:
        # A run of the same id left by a crashed agent would block the name.
        self._podman("rm", "--force", "--ignore", run.id)
        self._prepare_cgroup(run)
        argv, env = self._run_argv(run)
        with run.log_path.open("ab") as log_file:
            # In the pod's directory: conmon writes a file named "oom" into its working directory
            # when the container is OOM-killed, which would otherwise land in the agent's.
            return subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                start_new_session=True, close_fds=True, cwd=run.state_dir,
            )  # fmt: skip

    def signal(self, run: ContainerRun, proc: subprocess.Popen[bytes], sig: int) -> None:
        if sig == signal.SIGKILL:
            self._podman("kill", "--signal", "KILL", run.id)
            procs.kill_group(proc.pid, sig)
        else:
            # `podman run` forwards signals to the container's main process (--sig-proxy).
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)

    def reap(self, run: ContainerRun, proc: subprocess.Popen[bytes]) -> Exit:
        oom = self._oom_killed(run)
        inspected = self._podman("container", "inspect", "--format", "json", run.id)
        state: JSON = {}
        if inspected.returncode == 0:
            with contextlib.suppress(ValueError, IndexError, KeyError):
                state = json.loads(inspected.stdout)[0]["State"]
        self._podman("rm", "--force", "--ignore", run.id)
        self._remove_cgroup(run)
        if not state or state.get("Status") == "created" or state.get("Error"):
            # Never ran: podman refused before a container existed (bad mount, bad option) or
            # runc could not exec the command. kubelet says StartError with exit code 128.
            return Exit(128, "StartError", str(state.get("Error") or "") or _tail(run.log_path))
        code = int(state.get("ExitCode", _exit_of(proc.returncode)))
        if oom or state.get("OOMKilled"):
            return Exit(code or 137, "OOMKilled")
        return Exit(code, "Completed" if code == 0 else "Error")

    def exec(self, run: ContainerRun, command: list[str], timeout: float) -> int:
        return self._podman("exec", run.id, *command, timeout=timeout).returncode

    def sweep(self) -> None:
        """Remove every container this node started (after a crash, or at shutdown)."""
        listed = self._podman("ps", "--all", "--quiet", "--filter", f"label={self.label}")
        ids = listed.stdout.split()
        if ids:
            self._podman("rm", "--force", "--time", "0", *ids)
        for controller in _MEMORY_CGROUP.parent.iterdir():
            root = controller / self.cgroup_root
            for child in sorted(root.glob("**/"), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    child.rmdir()


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def sweep_cluster(cluster_name: str) -> None:
    """Remove every container of a cluster whose node agents are gone (a killed test session)."""
    podman = shutil.which("podman")
    if podman is None:
        return
    env = podman_env()
    listed = subprocess.run(
        [podman, "ps", "--all", "--quiet", "--filter", f"label={CLUSTER_LABEL}={cluster_name}"],
        env=env, capture_output=True, text=True, timeout=_PODMAN_TIMEOUT_S, check=False,
    )  # fmt: skip
    if listed.stdout.split():
        subprocess.run(
            [podman, "rm", "--force", "--time", "0", *listed.stdout.split()],
            env=env, capture_output=True, timeout=_PODMAN_TIMEOUT_S, check=False,
        )  # fmt: skip


def make_runtime(kind: str, cluster_name: str, node_name: str) -> ContainerRuntime:
    if kind == "process":
        return ProcessRuntime()
    if kind == "podman":
        return PodmanRuntime(cluster_name, node_name)
    raise ValueError(f"unknown container runtime {kind!r} (process | podman)")
