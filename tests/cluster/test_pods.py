"""What the node agent does for a single pod, as kubelet would.

Aspects tested:
- init containers run in order before the app container and share emptyDir volumes;
- environment: ``value`` with ``$(VAR)`` expansion, ``fieldRef`` (incl. ``status.podIP``),
  ``configMapKeyRef``, ``secretKeyRef``, ``envFrom`` with a prefix, ``KUBERNETES_SERVICE_*``;
- volumes: configMap (with items), secret, downwardAPI, mounted read-only at their paths;
- a running pod sees a ConfigMap update in its mounted volume within seconds;
- a missing ConfigMap holds the container in CreateContainerConfigError until it appears;
- ``restartPolicy: Always`` restarts a crashing container with backoff, counting restarts
  and keeping the previous run's exit code and log;
- a failing liveness probe gets the container killed and restarted, with kubelet's Events;
- a preStop hook runs before the container gets SIGTERM;
- a sidecar (restartable init container) starts before the main container, serves it on
  localhost, and is stopped once the main container is done;
- a ``hostNetwork`` pod gets the node's address as its IP;
- a PersistentVolumeClaim of the default StorageClass is provisioned, bound, and keeps data
  from one pod to the next;
- ``kubectl logs`` (and ``--tail``) is served from the node agent's log files;
- ``kubectl`` and ``helm`` are on hand and the apiserver reports its stamped version.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubernetes import client

from kubetune.localcluster.testing import ClusterHandle, condition_status, wait_for
from tests.cluster import manifests

pytestmark = pytest.mark.cluster


def phase_of(core: client.CoreV1Api, namespace: str, name: str) -> str:
    phase: str = core.read_namespaced_pod(name, namespace).status.phase
    return phase


def test_init_containers_env_and_volumes(cluster: ClusterHandle, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "settings"}, "data": {"mode": "fast", "file.txt": "from configmap"}}
    )
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}}
    )
    report = """
import json, os, pathlib
shared = pathlib.Path('/shared')
print(json.dumps({
    'order': (shared / 'order').read_text(),
    'env': {k: v for k, v in os.environ.items() if k.isupper() or k.startswith('CFG_')},
    'config': open('/etc/config/renamed.txt').read(),
    'secret': open('/etc/creds/token').read(),
    'labels': open('/etc/podinfo/labels').read(),
}))
"""
    init = [
        manifests.python_container(
            f"init-{i}",
            f"open('/shared/order', 'a').write('{i}')",
            volumeMounts=[{"name": "shared", "mountPath": "/shared"}],
        )
        for i in (1, 2)
    ]
    main = manifests.python_container(
        "main",
        report,
        env=[
            {"name": "NAME", "value": "world"},
            {"name": "GREETING", "value": "hello $(NAME)"},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        ],
        envFrom=[{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
        volumeMounts=[
            {"name": "shared", "mountPath": "/shared"},
            {"name": "config", "mountPath": "/etc/config", "readOnly": True},
            {"name": "creds", "mountPath": "/etc/creds", "readOnly": True},
            {"name": "podinfo", "mountPath": "/etc/podinfo"},
        ],
    )
    pod = manifests.pod(
        "features",
        main,
        initContainers=init,
        volumes=[
            {"name": "shared", "emptyDir": {}},
            {
                "name": "config",
                "configMap": {"name": "settings", "items": [{"key": "file.txt", "path": "renamed.txt"}]},
            },
            {"name": "creds", "secret": {"secretName": "creds"}},
            {
                "name": "podinfo",
                "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]},
            },
        ],
    )
    pod["metadata"]["labels"] = {"tier": "test"}
    core.create_namespaced_pod(namespace, pod)
    wait_for(
        lambda: phase_of(core, namespace, "features") in ("Succeeded", "Failed"),
        60,
        description="pod features to finish",
    )
    log = cluster.read_log(namespace, "features")
    assert phase_of(core, namespace, "features") == "Succeeded", log
    result = json.loads(log)
    status = core.read_namespaced_pod("features", namespace).status
    assert result["order"] == "12"
    assert result["env"]["GREETING"] == "hello world"
    assert result["env"]["POD_IP"] == status.pod_ip
    assert (result["env"]["MODE"], result["env"]["TOKEN"], result["env"]["CFG_mode"]) == (
        "fast",
        "s3cret",
        "fast",
    )
    assert result["env"]["KUBERNETES_SERVICE_HOST"] and result["env"]["KUBERNETES_SERVICE_PORT"]
    assert (result["config"], result["secret"], result["labels"]) == (
        "from configmap",
        "s3cret",
        'tier="test"',
    )
    assert [s.state.terminated.exit_code for s in status.init_container_statuses] == [0, 0]


def test_missing_configmap_blocks_until_created(cluster: ClusterHandle, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api_client())
    env = [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "late", "key": "x"}}}]
    core.create_namespaced_pod(
        namespace,
        manifests.pod(
            "late", manifests.python_container("main", "import os; print(os.environ['X'])", env=env)
        ),
    )

    def waiting_reason() -> str | None:
        statuses = core.read_namespaced_pod("late", namespace).status.container_statuses or []
        return statuses[0].state.waiting.reason if statuses and statuses[0].state.waiting else None

    wait_for(
        lambda: waiting_reason() == "CreateContainerConfigError", 30, description="CreateContainerConfigError"
    )
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "late"}, "data": {"x": "arrived"}})
    wait_for(lambda: phase_of(core, namespace, "late") == "Succeeded", 30, description="pod late to succeed")
    assert cluster.read_log(namespace, "late").strip() == "arrived"


def test_crashing_container_restarts_with_backoff(cluster: ClusterHandle, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api_client())
    code = "import sys; print('run'); sys.exit(7)"
    core.create_namespaced_pod(
        namespace, manifests.pod("crash", manifests.python_container("main", code), restart_policy="Always")
    )

    def restarted_twice() -> bool:
        statuses = core.read_namespaced_pod("crash", namespace).status.container_statuses or []
        return bool(statuses) and statuses[0].restart_count >= 2

    wait_for(restarted_twice, 30, description="two restarts")
    status = core.read_namespaced_pod("crash", namespace).status
    assert status.phase == "Running"
    assert status.container_statuses[0].last_state.terminated.exit_code == 7
    assert cluster.read_log(namespace, "crash", previous=True).strip() == "run"


def test_failing_liveness_probe_restarts_container(cluster: ClusterHandle, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api_client())
    container = manifests.python_container(
        "main",
        "import time; time.sleep(3600)",
        livenessProbe={
            "exec": {"command": ["python", "-c", "raise SystemExit(1)"]},
            "periodSeconds": 1,
            "failureThreshold": 1,
        },
    )
    core.create_namespaced_pod(
        namespace, manifests.pod("live", container, restart_policy="Always", terminationGracePeriodSeconds=1)
    )

    def restarted() -> bool:
        statuses = core.read_namespaced_pod("live", namespace).status.container_statuses or []
        return bool(statuses) and statuses[0].restart_count >= 1

    wait_for(restarted, 30, description="a liveness restart")
    assert condition_status(core.read_namespaced_pod("live", namespace), "Ready") is not None
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=live").items
    reasons = {e.reason for e in events}
    assert {"Started", "Unhealthy", "Killing"} <= reasons, reasons


def test_kubectl_and_helm_are_available(cluster: ClusterHandle) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.")
    if cluster.is_local:
        pinned = (Path(__file__).parents[2] / "hack" / "localcluster" / "k8s" / "VERSION").read_text().strip()
        assert version["serverVersion"]["gitVersion"] == pinned
        assert cluster.helm("version", "--short").stdout.startswith("v3.")


def test_persistent_volume_claim_outlives_its_pods(cluster: ClusterHandle, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api_client())
    claim = {
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    core.create_namespaced_persistent_volume_claim(namespace, claim)
    mount = {"volumeMounts": [{"name": "data", "mountPath": "/data"}]}
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
    writer = manifests.python_container("main", "open('/data/model.bin', 'w').write('weights')", **mount)
    core.create_namespaced_pod(namespace, manifests.pod("writer", writer, volumes=volumes))
    wait_for(lambda: phase_of(core, namespace, "writer") == "Succeeded", 60, description="writer to succeed")
    assert (
        core.read_namespaced_persistent_volume_claim(namespace=namespace, name="data").status.phase == "Bound"
    )
    reader = manifests.python_container("main", "print(open('/data/model.bin').read())", **mount)
    core.create_namespaced_pod(namespace, manifests.pod("reader", reader, volumes=volumes))
    wait_for(lambda: phase_of(core, namespace, "reader") == "Succeeded", 60, description="reader to succeed")
    assert cluster.read_log(namespace, "reader").strip() == "weights"


def test_kubectl_logs_reads_the_node_agents_files(cluster: ClusterHandle, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api_client())
    code = "print('line 1'); print('line 2')"
    core.create_namespaced_pod(namespace, manifests.pod("talker", manifests.python_container("main", code)))
    wait_for(lambda: phase_of(core, namespace, "talker") == "Succeeded", 60, description="talker to succeed")
    assert cluster.kubectl("logs", "-n", namespace, "talker").stdout == "line 1\nline 2\n"
    assert cluster.kubectl("logs", "-n", namespace, "talker", "--tail=1").stdout == "line 2\n"


def test_configmap_volume_follows_updates(cluster: ClusterHandle, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "adapters"}, "data": {"list": "v1"}})
    code = (
        "import time\n"
        "while open('/etc/adapters/list').read() != 'v2':\n"
        "    time.sleep(0.1)\n"
        "print('saw v2')\n"
    )
    container = manifests.python_container(
        "main", code, volumeMounts=[{"name": "a", "mountPath": "/etc/adapters"}]
    )
    pod = manifests.pod("watcher", container, volumes=[{"name": "a", "configMap": {"name": "adapters"}}])
    core.create_namespaced_pod(namespace, pod)
    wait_for(lambda: phase_of(core, namespace, "watcher") == "Running", 30, description="watcher to run")
    core.patch_namespaced_config_map("adapters", namespace, {"data": {"list": "v2"}})
    wait_for(lambda: phase_of(core, namespace, "watcher") == "Succeeded", 30, description="watcher to see v2")


def test_prestop_hook_runs_before_sigterm(cluster: ClusterHandle, namespace: str, tmp_path: Path) -> None:
    if not cluster.is_local:
        pytest.skip("observes the container through a hostPath on the node")
    core = client.CoreV1Api(cluster.api_client())
    code = (
        "import os, signal, sys, time\n"
        "def term(*_):\n"
        "    seen = 'after preStop' if os.path.exists('/out/prestop') else 'no preStop'\n"
        "    open('/out/term', 'w').write(seen)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "open('/out/started', 'w').write('yes')\n"
        "while True: time.sleep(1)\n"
    )
    hook = {"exec": {"command": ["python", "-c", "open('/out/prestop', 'w').write('ran')"]}}
    container = manifests.python_container(
        "main", code, lifecycle={"preStop": hook}, volumeMounts=[{"name": "out", "mountPath": "/out"}]
    )
    volumes = [{"name": "out", "hostPath": {"path": str(tmp_path)}}]
    core.create_namespaced_pod(namespace, manifests.pod("hooked", container, volumes=volumes))
    wait_for(lambda: (tmp_path / "started").exists(), 30, description="the container to start")
    core.delete_namespaced_pod("hooked", namespace)
    term = tmp_path / "term"
    seen = wait_for(lambda: term.exists() and term.read_text(), 30, description="SIGTERM to arrive")
    assert seen == "after preStop"


def test_sidecar_runs_beside_a_job_and_is_stopped_after_it(cluster: ClusterHandle, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api_client())
    sidecar = manifests.python_container(
        "proxy",
        manifests.HTTP_SERVER,
        restartPolicy="Always",
        env=[{"name": "POD_NAME", "value": "sidecar"}],
        startupProbe={"tcpSocket": {"port": 8000}, "periodSeconds": 1},
    )
    main = manifests.python_container(
        "main",
        "import urllib.request; print(urllib.request.urlopen('http://localhost:8000/').read().decode())",
    )
    core.create_namespaced_pod(namespace, manifests.pod("with-sidecar", main, initContainers=[sidecar]))
    wait_for(
        lambda: phase_of(core, namespace, "with-sidecar") in ("Succeeded", "Failed"),
        60,
        description="pod to finish",
    )
    assert phase_of(core, namespace, "with-sidecar") == "Succeeded", cluster.read_log(
        namespace, "with-sidecar"
    )
    assert cluster.read_log(namespace, "with-sidecar", "main").strip() == "sidecar"
    (proxy,) = core.read_namespaced_pod("with-sidecar", namespace).status.init_container_statuses
    assert proxy.state.terminated is not None and proxy.restart_count == 0


def test_host_network_pod_shares_the_node_address(cluster: ClusterHandle, namespace: str) -> None:
    if not cluster.is_local:
        pytest.skip("compares with the local node's address")
    core = client.CoreV1Api(cluster.api_client())
    env = [{"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    container = manifests.python_container("main", "import os; print(os.environ['IP'])", env=env)
    core.create_namespaced_pod(namespace, manifests.pod("hostnet", container, hostNetwork=True))
    wait_for(
        lambda: phase_of(core, namespace, "hostnet") == "Succeeded", 30, description="hostnet to succeed"
    )
    pod = core.read_namespaced_pod("hostnet", namespace)
    assert pod.status.pod_ip == pod.status.host_ip == cluster.read_log(namespace, "hostnet").strip()
