"""Cluster DNS on the local cluster (process runtime): pods find each other and Services by name.

Aspects tested:
- two pods with ``hostname``/``subdomain`` under a headless Service, started together, reach each
  other at ``<hostname>.<subdomain>`` through the search path; the endpoint-slice controller
  (the real kube-controller-manager) writes each pod's ``hostname`` into the EndpointSlice;
- a Service created after the pods started resolves (no longer a start-time ``/etc/hosts``);
- an unknown name is "not found", the pod's FQDN comes from its managed ``/etc/hosts``, and its
  ``/etc/resolv.conf`` is kubelet's (cluster nameserver, ``<ns>.svc.cluster.local`` search
  path, ``ndots:5``);
- the same holds for a real container on a podman node (an extra node agent, the operator image
  from ``_out/images.env``) meeting a host-process pod on the first node.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from kubernetes import client

from kubetune.localcluster.testing import BuiltImages, ClusterHandle, wait_for
from tests.cluster import manifests

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]

# Serves its hostname on :7000, reaches its PEER by name until both directions worked, then
# waits for the Service `late` (created by the test once both pods run) to resolve.
PEER = """
import os, socket, threading, time
peer = os.environ['PEER']
contacted = threading.Event()
server = socket.create_server(('0.0.0.0', 7000))
def serve():
    while True:
        conn, _ = server.accept()
        conn.sendall(socket.gethostname().encode()); conn.close(); contacted.set()
threading.Thread(target=serve, daemon=True).start()
deadline = time.time() + 90
while True:
    try:
        with socket.create_connection((peer, 7000), timeout=2) as s:
            print('peer', peer, s.getpeername()[0], s.recv(100).decode(), flush=True)
        break
    except OSError:
        assert time.time() < deadline, 'peer never reachable'
        time.sleep(0.2)
assert contacted.wait(90), 'peer never came'
while True:
    try:
        print('late', socket.gethostbyname('late'), flush=True)
        break
    except OSError:
        assert time.time() < deadline, 'late never resolved'
        time.sleep(0.2)
try:
    socket.gethostbyname('nope')
    print('nope resolved')
except socket.gaierror:
    print('nope not found')
print('fqdn', socket.getfqdn())
print(open('/etc/resolv.conf').read())
"""


def group_pod(hostname: str, peer: str) -> manifests.JSON:
    pod = manifests.pod(
        hostname,
        manifests.python_container("main", PEER, env=[{"name": "PEER", "value": peer}]),
        hostname=hostname,
        subdomain="grp",
    )
    pod["metadata"]["labels"] = {"group": "grp"}
    return pod


def test_headless_service_names_resolve_between_pods(cluster: ClusterHandle, namespace: str) -> None:
    if not cluster.is_local:
        pytest.skip("checks the node agent's resolv.conf")
    core = client.CoreV1Api(cluster.api_client())
    discovery = client.DiscoveryV1Api(cluster.api_client())
    headless = {
        "metadata": {"name": "grp"},
        "spec": {"clusterIP": "None", "selector": {"group": "grp"}, "ports": [{"port": 7000}]},
    }
    core.create_namespaced_service(namespace, headless)
    core.create_namespaced_pod(namespace, group_pod("a", "b.grp"))
    core.create_namespaced_pod(namespace, group_pod("b", "a.grp"))

    def running() -> bool:
        return all(core.read_namespaced_pod(p, namespace).status.phase == "Running" for p in "ab")

    wait_for(running, 60, description="pods a and b running")
    ips = {p: core.read_namespaced_pod(p, namespace).status.pod_ip for p in "ab"}

    # What the real endpoint-slice controller writes: each pod's hostname on its endpoint (the
    # pods leave the slice once they have finished).
    def hostnames() -> dict[str, str]:
        slices = discovery.list_namespaced_endpoint_slice(
            namespace, label_selector="kubernetes.io/service-name=grp"
        ).items
        return {e.addresses[0]: e.hostname for s in slices for e in s.endpoints or []}

    wait_for(lambda: len(hostnames()) == 2, 30, description=lambda: f"two endpoints: {hostnames()}")
    assert hostnames() == {ips["a"]: "a", ips["b"]: "b"}
    late = {"metadata": {"name": "late"}, "spec": {"ports": [{"port": 80}], "selector": {"none": "x"}}}
    late_ip = core.create_namespaced_service(namespace, late).spec.cluster_ip

    def finished() -> bool:
        return all(
            core.read_namespaced_pod(p, namespace).status.phase in ("Succeeded", "Failed") for p in "ab"
        )

    wait_for(finished, 120, description=lambda: f"a: {cluster.read_log(namespace, 'a')}")
    for me, peer in (("a", "b"), ("b", "a")):
        out = cluster.read_log(namespace, me)
        assert core.read_namespaced_pod(me, namespace).status.phase == "Succeeded", out
        assert f"peer {peer}.grp {ips[peer]} {peer}\n" in out, out
        assert f"late {late_ip}\n" in out, out
        assert "nope not found\n" in out, out
        assert f"fqdn {me}.grp.{namespace}.svc.cluster.local\n" in out, out
        assert f"search {namespace}.svc.cluster.local svc.cluster.local cluster.local" in out, out
        assert "options ndots:5" in out, out
        gateway = cluster.local.gateway if cluster.local else ""
        assert f"nameserver {gateway}\n" in out, out


def test_podman_pods_use_the_cluster_dns(cluster: ClusterHandle, namespace: str) -> None:
    """A real container (podman node) and a host-process pod (the first node) find each other."""
    if not cluster.is_local or shutil.which("podman") is None:
        pytest.skip("needs the local cluster and podman")
    try:
        image = BuiltImages.read(ROOT / "_out" / "images.env").operator
    except (FileNotFoundError, KeyError) as exc:
        pytest.skip(f"no image to run (make images): {exc}")
    core = client.CoreV1Api(cluster.api_client())
    headless = {
        "metadata": {"name": "grp"},
        "spec": {"clusterIP": "None", "selector": {"group": "grp"}, "ports": [{"port": 7000}]},
    }
    core.create_namespaced_service(namespace, headless)
    first = core.list_node().items[0].metadata.name
    with cluster.add_node("podman-node", runtime="podman") as podman_node:
        host_pod = group_pod("a", "b.grp")
        host_pod["spec"]["nodeName"] = first
        container_pod = group_pod("b", "a.grp")
        container_pod["spec"]["nodeName"] = podman_node
        (container,) = container_pod["spec"]["containers"]
        container.update(image=image, imagePullPolicy="Never")
        core.create_namespaced_pod(namespace, host_pod)
        core.create_namespaced_pod(namespace, container_pod)

        def running() -> bool:
            return all(core.read_namespaced_pod(p, namespace).status.phase == "Running" for p in "ab")

        wait_for(running, 90, description="pods a and b running")
        core.create_namespaced_service(
            namespace,
            {"metadata": {"name": "late"}, "spec": {"ports": [{"port": 80}], "selector": {"x": "y"}}},
        )

        def finished() -> bool:
            phases = [core.read_namespaced_pod(p, namespace).status.phase for p in "ab"]
            return all(phase in ("Succeeded", "Failed") for phase in phases)

        wait_for(
            finished, 120, description=lambda: f"b: {cluster.read_log(namespace, 'b')}", ignore=(OSError,)
        )
        ips = {p: core.read_namespaced_pod(p, namespace).status.pod_ip for p in "ab"}
        out = cluster.read_log(namespace, "b")
        assert (
            core.read_namespaced_pod("b", namespace)
            .status.container_statuses[0]
            .container_id.startswith("podman://")
        )
        assert core.read_namespaced_pod("b", namespace).status.phase == "Succeeded", out
        assert f"peer a.grp {ips['a']} a\n" in out, out
        assert f"fqdn b.grp.{namespace}.svc.cluster.local\n" in out, out
        assert f"search {namespace}.svc.cluster.local svc.cluster.local cluster.local" in out, out
        assert f"peer b.grp {ips['b']} b\n" in cluster.read_log(namespace, "a")
