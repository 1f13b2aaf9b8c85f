"""The local cluster's podman node runs pods as kubelet would, and enforces what they ask for.

Aspects:
- the container runs from its image as the pod's user and groups (fsGroup included), with a
  read-only root filesystem, no capabilities and no privilege escalation; env and volumes arrive,
  the termination message and `kubectl logs` work, and the status names the runtime's container
  and image ids;
- exceeding the memory limit ends in OOMKilled with exit code 137;
- a missing image waits with kubelet's reason and message (ErrImageNeverPull; ErrImagePull then
  ImagePullBackOff), never hangs or falls back to the host;
- runAsNonRoot refuses an image that would run as root (CreateContainerConfigError);
- a command the image lacks is a StartError (exit code 128), with runc's words.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.localcluster.testing import ClusterHandle, wait_for

pytestmark = [pytest.mark.cluster]

_PROBE = """
import json, os
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
       "greeting": os.environ.get("GREETING"), "path": os.environ.get("PATH")}
try:
    open("/rootfile", "w")
    out["root_write"] = "allowed"
except OSError as exc:
    out["root_write"] = exc.strerror
with open("/scratch/f", "w") as f:
    f.write("x")
out["status"] = {k: v.strip() for k, v in (l.split(":", 1) for l in open("/proc/self/status"))
                 if k in ("CapEff", "NoNewPrivs")}
print(json.dumps(out), flush=True)
with open("/dev/termination-log", "w") as f:
    f.write("probe done")
"""


def _pod(name: str, image: str, command: list[str], **extra: Any) -> dict[str, Any]:
    container = {"name": "main", "image": image, "imagePullPolicy": "Never", "command": command}
    container.update(extra.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container], **extra},
    }


def _create(cluster: ClusterHandle, namespace: str, pod: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))


def _status(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    pod = json.loads(cluster.kubectl("get", "pod", "-n", namespace, name, "-o", "json").stdout)
    status: dict[str, Any] = pod.get("status", {})
    return status


def _container_state(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    statuses = _status(cluster, namespace, name).get("containerStatuses") or [{}]
    state: dict[str, Any] = statuses[0].get("state") or {}
    return state


def _terminated(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    terminated: dict[str, Any] = wait_for(
        lambda: _container_state(cluster, namespace, name).get("terminated"),
        180,
        interval=0.5,
        description=lambda: f"{name} to terminate; status: {json.dumps(_status(cluster, namespace, name))}",
    )
    return terminated


def _waiting(cluster: ClusterHandle, namespace: str, name: str, reason: str) -> dict[str, Any]:
    def waiting() -> dict[str, Any] | None:
        state = _container_state(cluster, namespace, name).get("waiting") or {}
        return state if state.get("reason") == reason else None

    found: dict[str, Any] = wait_for(
        waiting,
        60,
        interval=0.5,
        description=lambda: f"{name} waiting with {reason}; status: {_status(cluster, namespace, name)}",
    )
    return found


def test_security_context_volumes_env_and_termination_message(
    cluster: ClusterHandle, namespace: str, base_image: str
) -> None:
    pod = _pod(
        "secure",
        base_image,
        ["python3", "-c", _PROBE],
        securityContext={"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000},
        volumes=[{"name": "scratch", "emptyDir": {}}],
        container={
            "env": [{"name": "GREETING", "value": "hello"}],
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            "resources": {"limits": {"memory": "256Mi", "cpu": "500m"}},
            "securityContext": {
                "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            },
        },
    )
    _create(cluster, namespace, pod)
    terminated = _terminated(cluster, namespace, "secure")
    log = cluster.kubectl("logs", "-n", namespace, "secure").stdout
    assert terminated["exitCode"] == 0, (terminated, log)
    assert terminated["reason"] == "Completed"
    assert terminated["message"] == "probe done"
    assert terminated["containerID"].startswith("podman://")
    out = json.loads(log.strip().splitlines()[-1])
    assert (out["uid"], out["gid"]) == (1000, 1000)
    assert 2000 in out["groups"]
    assert out["greeting"] == "hello"
    # The image's PATH, not the host's virtualenv: this is the image running, not the host.
    assert ".venv" not in out["path"] and "kubetune/venv" not in out["path"]
    assert out["root_write"] == "Read-only file system"
    assert out["status"] == {"CapEff": "0000000000000000", "NoNewPrivs": "1"}
    status = _status(cluster, namespace, "secure")
    assert status["containerStatuses"][0]["imageID"].startswith("sha256:")


def test_memory_limit_ends_in_oomkilled(cluster: ClusterHandle, namespace: str, base_image: str) -> None:
    hog = "x = bytearray(768 * 2**20); print('survived', flush=True)"
    pod = _pod(
        "hog",
        base_image,
        ["python3", "-c", hog],
        container={"resources": {"limits": {"memory": "96Mi"}}},
    )
    _create(cluster, namespace, pod)
    terminated = _terminated(cluster, namespace, "hog")
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137), terminated
    # The same allocation fits without the limit: the limit, not the machine, killed it.
    _create(cluster, namespace, _pod("fits", base_image, ["python3", "-c", hog]))
    assert _terminated(cluster, namespace, "fits")["exitCode"] == 0


def test_missing_image_waits_with_a_reason(cluster: ClusterHandle, namespace: str, base_image: str) -> None:
    missing = "localhost/kubetune/no-such-image:0"
    _create(cluster, namespace, _pod("never", missing, ["true"]))
    waiting = _waiting(cluster, namespace, "never", "ErrImageNeverPull")
    assert missing in waiting["message"] and "pull policy of Never" in waiting["message"]

    _create(
        cluster, namespace, _pod("pull", missing, ["true"], container={"imagePullPolicy": "IfNotPresent"})
    )
    first = _waiting(cluster, namespace, "pull", "ErrImagePull")
    assert f'Failed to pull image "{missing}"' in first["message"]
    backoff = _waiting(cluster, namespace, "pull", "ImagePullBackOff")
    assert missing in backoff["message"]
    assert _status(cluster, namespace, "pull")["phase"] == "Pending"


def test_run_as_non_root_refuses_a_root_image(
    cluster: ClusterHandle, namespace: str, base_image: str
) -> None:
    # The base image has no USER: it would run as root.
    _create(cluster, namespace, _pod("rooty", base_image, ["true"], securityContext={"runAsNonRoot": True}))
    waiting = _waiting(cluster, namespace, "rooty", "CreateContainerConfigError")
    assert "runAsNonRoot and image will run as root" in waiting["message"]


def test_a_command_missing_from_the_image_is_a_start_error(
    cluster: ClusterHandle, namespace: str, base_image: str
) -> None:
    _create(cluster, namespace, _pod("nocmd", base_image, ["/no/such/binary"]))
    terminated = _terminated(cluster, namespace, "nocmd")
    assert (terminated["reason"], terminated["exitCode"]) == ("StartError", 128), terminated
    assert "/no/such/binary" in terminated["message"]
