"""Starting and stopping clusters from the command line, side by side and after a crash.

Aspects tested:
- ``python -m kubetune.localcluster up`` starts a second cluster beside the session's (own
  bridge subnet, own ports) and prints its kubeconfig; ``down`` removes its processes, bridge
  and state directory;
- a cluster whose owner was SIGKILLed loses its control plane and node agent (parent-death
  signal); the next start reaps the rest: container processes, network namespaces, bridge and
  state directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import ip_network
from urllib.parse import urlparse

import pytest

from kubetune.localcluster import network, procs
from kubetune.localcluster.controlplane import default_run_dir
from kubetune.localcluster.testing import ClusterHandle, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune.localcluster", *args], capture_output=True, text=True, timeout=180
    )


def bridges() -> set[str]:
    return {
        line.split(":")[1].strip()
        for line in network.ip("-o", "link", "show", "type", "bridge").stdout.splitlines()
    }


@pytest.fixture
def cli_cluster(cluster: ClusterHandle) -> Iterator[str]:
    if not cluster.is_local:
        pytest.skip("starts local clusters")
    name = f"t{os.getpid()}"
    yield name
    cli("down", "--name", name)


def test_up_and_down_beside_the_session_cluster(cluster: ClusterHandle, cli_cluster: str) -> None:
    assert cluster.local is not None
    up = cli("up", "--name", cli_cluster)
    assert up.returncode == 0, up.stderr
    state = default_run_dir() / cli_cluster
    kubeconfig = state / "kubeconfig"
    assert f"export KUBECONFIG={kubeconfig}" in up.stdout
    server = urlparse(json.loads(kubeconfig.read_text())["clusters"][0]["cluster"]["server"])
    assert server.hostname is not None
    assert ip_network(f"{server.hostname}/16", strict=False) != ip_network(
        f"{cluster.local.gateway}/16", strict=False
    )
    nodes = subprocess.run(
        ["kubectl", "get", "nodes", "-o", "name"],
        env={**cluster.env(), "KUBECONFIG": str(kubeconfig)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert nodes.stdout.strip() == "node/node-1"
    bridge = (state / "bridge").read_text()
    assert cli("down", "--name", cli_cluster).returncode == 0
    assert not state.exists()
    assert bridge not in bridges()


def test_cluster_of_a_killed_owner_is_reaped(cluster: ClusterHandle, cli_cluster: str) -> None:
    # Process containers: the reaper must find and kill their recorded processes.
    assert cli("up", "--name", cli_cluster, "--runtime", "process").returncode == 0
    state = default_run_dir() / cli_cluster
    env = {**cluster.env(), "KUBECONFIG": str(state / "kubeconfig")}
    subprocess.run(
        ["kubectl", "run", "sleeper", "--image=python", "--restart=Never", "--command", "--",
         "python", "-c", "import time; time.sleep(600)"],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    containers = state / "nodes" / "node-1" / "containers"
    record = wait_for(
        lambda: next(containers.glob("*"), None), 60, description="the sleeper container to start"
    )
    container = procs.read_record(record)
    assert container is not None
    owner = procs.read_record(state / "owner")
    assert owner is not None
    components = [r for p in (state / "pids").iterdir() if (r := procs.read_record(p))]
    bridge = (state / "bridge").read_text()
    netns = [p.name for p in (state / "netns").iterdir()]
    assert netns
    os.kill(owner[0], signal.SIGKILL)
    wait_for(
        lambda: not any(procs.alive(*c) for c in components),
        30,
        description="components to die with their owner",
    )
    # Containers are not children of the dead: only the reaper can end them.
    assert procs.alive(*container)
    assert state in procs.reap_stale(default_run_dir())
    assert not procs.alive(*container)
    assert not state.exists()
    assert bridge not in bridges()
    assert not set(netns) & set(network.list_netns())
