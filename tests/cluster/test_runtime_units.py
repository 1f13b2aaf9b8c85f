"""The container runtimes' pure parts, without a cluster or podman.

Aspects:
- the effective security settings merge the container's securityContext over the pod's, with
  fsGroup and supplementalGroups as groups;
- podman's command line carries the user, read-only root without podman's own tmpfs, dropped
  capabilities, no_new_privs, the CPU limit, the pod's network namespace and the image's
  ENTRYPOINT/CMD rules; environment values (Secrets) never appear in it;
- runAsNonRoot is checked as kubelet does: numeric image users only, never uid 0;
- the process runtime refuses a container without a command (it cannot read an image).
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest

from kubetune.localcluster.nodeagent.env import EnvError
from kubetune.localcluster.nodeagent.runtime import (
    ContainerRun,
    ImageInfo,
    PodmanRuntime,
    ProcessRuntime,
    Security,
)


def _run(tmp_path: Path, **fields: object) -> ContainerRun:
    base: dict[str, object] = {
        "id": "kt-1234abcd-main-0",
        "image": "localhost/kubetune/worker:0.1.0",
        "pull_policy": "IfNotPresent",
        "command": None,
        "args": None,
        "env": {},
        "mounts": [],
        "netns": "/run/netns/kt-x",
        "hostname": "pod-a",
        "working_dir": None,
        "log_path": tmp_path / "0.log",
        "state_dir": tmp_path,
    }
    base.update(fields)
    return ContainerRun(**base)  # type: ignore[arg-type]


def test_security_merges_container_over_pod() -> None:
    pod = {
        "securityContext": {
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "runAsNonRoot": True,
            "fsGroup": 2000,
            "supplementalGroups": [3000],
            "seccompProfile": {"type": "RuntimeDefault"},
        }
    }
    container = {
        "securityContext": {
            "runAsUser": 1001,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
        }
    }
    sec = Security.of(pod, container)
    assert (sec.run_as_user, sec.run_as_group, sec.run_as_non_root) == (1001, 1000, True)
    assert sec.supplemental_groups == (3000, 2000)
    assert sec.read_only_root and sec.allow_privilege_escalation is False
    assert (sec.capabilities_drop, sec.capabilities_add) == (("ALL",), ("NET_BIND_SERVICE",))
    assert sec.seccomp == "RuntimeDefault"
    assert Security.of({}, {}) == Security()


def test_podman_command_line(tmp_path: Path) -> None:
    runtime = PodmanRuntime("c1", "node-1", podman="podman")
    run = _run(
        tmp_path,
        command=["python", "-m", "kubetune"],
        args=["train"],
        env={"HF_TOKEN": "s3cr3t-value", "PATH": "/opt/kubetune/bin:/usr/bin"},
        mounts=[{"source": "/host/plan", "target": "/etc/kubetune", "readOnly": True}],
        security=Security.of(
            {"securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}},
            {
                "securityContext": {
                    "readOnlyRootFilesystem": True,
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                }
            },
        ),
        cpu_limit=Decimal("0.5"),
        memory_limit=256 * 2**20,
    )
    argv, env = runtime._run_argv(run)
    line = " ".join(argv)
    assert "s3cr3t-value" not in line and env["HF_TOKEN"] == "s3cr3t-value"
    assert argv[argv.index("--user") + 1] == "1000:1000"
    assert argv[argv.index("--group-add") + 1] == "1000"
    assert "--read-only --read-only-tmpfs=false" in line
    assert "--cap-drop all" in line and "--security-opt no-new-privileges" in line
    # No RuntimeDefault asked: Kubernetes' default is unconfined.
    assert "seccomp=unconfined" in line
    assert argv[argv.index("--cpus") + 1] == "0.5"
    assert "--memory" not in argv  # enforced on the parent cgroup, where the OOM is counted
    assert argv[argv.index("--cgroup-parent") + 1] == "/kubetune/c1.node-1/kt-1234abcd-main-0"
    assert argv[argv.index("--network") + 1] == "ns:/run/netns/kt-x"
    assert "/host/plan:/etc/kubetune:ro,rbind" in argv
    assert argv[argv.index("--entrypoint") + 1] == '["python", "-m", "kubetune"]'
    assert argv[-2:] == ["localhost/kubetune/worker:0.1.0", "train"]
    assert "io.kubetune.cluster=c1" in argv and "io.kubetune.node=c1.node-1" in argv

    image_only, _ = runtime._run_argv(_run(tmp_path, netns=None))
    assert "--entrypoint" not in image_only and image_only[-1] == "localhost/kubetune/worker:0.1.0"
    assert image_only[image_only.index("--network") + 1] == "host"


@pytest.mark.parametrize(
    ("image_user", "run_as_user", "refusal"),
    [
        ("1000:1000", None, None),
        ("", None, "image will run as root"),
        ("root", None, "image will run as root"),
        ("0", None, "image will run as root"),
        ("kubetune", None, "non-numeric user (kubetune)"),
        ("kubetune", 1000, None),
        ("1000", 0, "runAsUser breaks non-root policy"),
    ],
)
def test_run_as_non_root(
    tmp_path: Path, image_user: str, run_as_user: int | None, refusal: str | None
) -> None:
    runtime = PodmanRuntime("c1", "node-1", podman="podman")
    run = _run(tmp_path, security=Security(run_as_user=run_as_user, run_as_non_root=True))
    if refusal is None:
        runtime.verify(run, ImageInfo("sha256:x", image_user), "pod: p")
    else:
        with pytest.raises(EnvError, match=re.escape(refusal)):
            runtime.verify(run, ImageInfo("sha256:x", image_user), "pod: p")


def test_process_runtime_needs_a_command(tmp_path: Path) -> None:
    runtime = ProcessRuntime()
    runtime.verify(_run(tmp_path, args=["python", "-c", "pass"]), ImageInfo(), "pod: p")
    with pytest.raises(EnvError, match="no command"):
        runtime.verify(_run(tmp_path), ImageInfo(), "pod: p")


def test_projected_token_is_readable_by_the_pods_user_only() -> None:
    from kubetune.localcluster.nodeagent.volumes import File, _token_file

    def pod(security: dict[str, object], *containers: dict[str, object]) -> dict[str, object]:
        return {"spec": {"securityContext": security, "containers": list(containers) or [{"name": "a"}]}}

    assert _token_file(pod({}), b"t", 0o644) == File(b"t", 0o644)
    assert _token_file(pod({"runAsUser": 1000}), b"t", 0o644) == File(b"t", 0o600, 1000, -1)
    assert _token_file(pod({"runAsUser": 1000, "fsGroup": 2000}), b"t", 0o644) == File(
        b"t", 0o640, 1000, 2000
    )
    # Containers as different users share the token through fsGroup only.
    mixed = pod(
        {"fsGroup": 2000}, {"securityContext": {"runAsUser": 1}}, {"securityContext": {"runAsUser": 2}}
    )
    assert _token_file(mixed, b"t", None) == File(b"t", 0o640, -1, 2000)
