"""The node agent's pure parts, without a cluster.

Aspects tested:
- ``$(VAR)`` expansion, ``$$`` escapes and unknown references left as they are;
- env resolution order (envFrom, then env, later wins), optional and missing references,
  fieldRef and resourceFieldRef (rounded up in divisor units);
- a container without a command is a configuration error, not a silent no-op;
- log selection for ``kubectl logs --tail/--limit-bytes``;
- probe thresholds: success and failure only flip the result after their threshold;
- the provisioner's PersistentVolume is pre-bound to its claim.
"""

from __future__ import annotations

import base64
import socket
from pathlib import Path
from typing import Any

import pytest

from kubetune.localcluster.nodeagent.env import EnvError, container_command, container_env, expand
from kubetune.localcluster.nodeagent.probes import ProbeState
from kubetune.localcluster.nodeagent.provisioner import volume_for
from kubetune.localcluster.nodeagent.server import select

POD: dict[str, Any] = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "web"}},
    "spec": {"nodeName": "node-1", "serviceAccountName": "default"},
    "status": {"podIP": "10.200.1.2", "hostIP": "10.200.0.1"},
}
OBJECTS: dict[tuple[str, str], dict[str, Any]] = {
    ("configmap", "cfg"): {"data": {"A": "from-cm", "B": "b"}},
    ("secret", "sec"): {"data": {"A": base64.b64encode(b"from-secret").decode()}},
}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return container_env(
        POD,
        container,
        get_object=lambda kind, name: OBJECTS.get((kind, name)),
        base_env={"PATH": "/bin"},
        service_env={"KUBERNETES_SERVICE_HOST": "10.200.0.1"},
    )


def test_expand() -> None:
    env = {"A": "1"}
    assert expand("$(A)-$(B)-$$(A)", env) == "1-$(B)-$(A)"


def test_env_order_and_sources() -> None:
    env = env_of(
        {
            "envFrom": [{"configMapRef": {"name": "cfg"}}, {"secretRef": {"name": "sec"}, "prefix": "S_"}],
            "env": [
                {"name": "B", "value": "$(A)+"},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {
                    "name": "MEM",
                    "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
                },
                {
                    "name": "X",
                    "valueFrom": {"configMapKeyRef": {"name": "missing", "key": "x", "optional": True}},
                },
            ],
            "resources": {"limits": {"memory": "1500Ki"}},
        }
    )
    assert (env["A"], env["S_A"], env["B"], env["IP"], env["APP"], env["MEM"]) == (
        "from-cm",
        "from-secret",
        "from-cm+",
        "10.200.1.2",
        "web",
        "2",
    )
    assert "X" not in env and env["KUBERNETES_SERVICE_HOST"] == "10.200.0.1"


def test_missing_reference_is_a_config_error() -> None:
    with pytest.raises(EnvError, match="not found"):
        env_of({"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "x"}}}]})
    with pytest.raises(EnvError, match="couldn't find key"):
        env_of({"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "zz"}}}]})


def test_command_and_args_expand_and_default_to_the_image() -> None:
    assert container_command({"command": ["python"], "args": ["-c", "$(A)"]}, {"A": "pass"}) == (
        ["python"],
        ["-c", "pass"],
    )
    assert container_command({"image": "nginx", "args": ["$(A)"]}, {"A": "x"}) == (None, ["x"])
    assert container_command({"image": "nginx"}, {}) == (None, None)


def test_log_selection() -> None:
    text = b"a\nb\nc\n"
    assert select(text, 2, None) == b"b\nc\n"
    assert select(text, 0, None) == b""
    assert select(text, None, 3) == b"a\nb"


def test_probe_thresholds() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        probe = ProbeState({"tcpSocket": {"port": port}, "successThreshold": 2}, started_at=0.0)
        assert probe.run("127.0.0.1", {}, lambda *_: 0) is None
        assert probe.run("127.0.0.1", {}, lambda *_: 0) is True
    failing = ProbeState({"exec": {"command": ["false"]}, "failureThreshold": 2}, started_at=0.0)
    assert failing.run("127.0.0.1", {}, lambda *_: 1) is None
    assert failing.run("127.0.0.1", {}, lambda *_: 1) is False
    assert failing.result is False


def test_provisioned_volume_is_prebound(tmp_path: Path) -> None:
    claim = {
        "metadata": {"name": "data", "namespace": "ns", "uid": "abc"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}},
    }
    volume = volume_for(claim, tmp_path)
    assert volume["spec"]["claimRef"]["uid"] == "abc"
    assert volume["spec"]["capacity"] == {"storage": "2Gi"}
    assert volume["spec"]["hostPath"]["path"] == str(tmp_path / "pvc-abc")
