"""Two node agents as two Nodes: the shape multi-node training needs.

Aspects tested:
- a second node agent registers its own Node; a pod bound to it reaches a pod on the first node by
  pod IP and by the first pod's ``hostname.subdomain`` DNS name;
- a 2-pod Indexed Job under a headless Service (``publishNotReadyAddresses``, as JobSet and
  Kubeflow Trainer make it), spread over both nodes by pod anti-affinity: the Job controller gives
  each pod the hostname ``<job>-<index>``, and index 1 connects to index 0 at ``<job>-0.<svc>``
  over TCP (a plain rendezvous in the shape of torchrun's c10d store), then the Job completes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes import client

from kubetune.localcluster.testing import ClusterHandle, condition_status, wait_for
from tests.cluster import manifests

pytestmark = pytest.mark.cluster

SECOND_NODE = "node-b"


@pytest.fixture(scope="module")
def two_nodes(cluster: ClusterHandle) -> Iterator[tuple[str, str]]:
    if not cluster.is_local:
        pytest.skip("adds a node agent")
    first = client.CoreV1Api(cluster.api_client()).list_node().items[0].metadata.name
    with cluster.add_node(SECOND_NODE) as second:
        yield first, second


SERVE = """
import http.server, socket
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(socket.gethostname().encode())
    def log_message(self, *args): pass
http.server.ThreadingHTTPServer(('0.0.0.0', 8000), Handler).serve_forever()
"""

FETCH = """
import os, time, urllib.request
deadline = time.time() + 60
for target in (os.environ['SERVER_IP'], 'srv.grp', 'srv.grp.' + os.environ['NS'] + '.svc.cluster.local'):
    while True:
        try:
            print(target, urllib.request.urlopen(f'http://{target}:8000/', timeout=3).read().decode())
            break
        except OSError:
            assert time.time() < deadline, target
            time.sleep(0.3)
"""


def test_second_node_reaches_first_by_ip_and_name(
    cluster: ClusterHandle, namespace: str, two_nodes: tuple[str, str]
) -> None:
    first, second = two_nodes
    core = client.CoreV1Api(cluster.api_client())
    node = core.read_node(second)
    assert condition_status(node, "Ready") == "True"
    assert node.spec.pod_cidr != core.read_node(first).spec.pod_cidr
    core.create_namespaced_service(
        namespace,
        {"metadata": {"name": "grp"}, "spec": {"clusterIP": "None", "selector": {"app": "srv"}}},
    )
    server = manifests.pod(
        "srv",
        manifests.python_container(
            "main", SERVE, readinessProbe={"tcpSocket": {"port": 8000}, "periodSeconds": 1}
        ),
        nodeName=first,
        hostname="srv",
        subdomain="grp",
    )
    server["metadata"]["labels"] = {"app": "srv"}
    core.create_namespaced_pod(namespace, server)
    wait_for(
        lambda: core.read_namespaced_pod("srv", namespace).status.pod_ip, 60, description="server pod IP"
    )
    server_ip = core.read_namespaced_pod("srv", namespace).status.pod_ip
    env = [{"name": "SERVER_IP", "value": server_ip}, {"name": "NS", "value": namespace}]
    fetch = manifests.pod("fetch", manifests.python_container("main", FETCH, env=env), nodeName=second)
    core.create_namespaced_pod(namespace, fetch)
    wait_for(
        lambda: core.read_namespaced_pod("fetch", namespace).status.phase in ("Succeeded", "Failed"),
        90,
        description=lambda: f"fetch to finish: {cluster.read_log(namespace, 'fetch')}",
        ignore=(FileNotFoundError,),
    )
    out = cluster.read_log(namespace, "fetch")
    fetched = core.read_namespaced_pod("fetch", namespace)
    assert fetched.status.phase == "Succeeded", out
    assert fetched.status.pod_ip != server_ip and fetched.spec.node_name == second
    assert out.splitlines() == [
        f"{server_ip} srv",
        "srv.grp srv",
        f"srv.grp.{namespace}.svc.cluster.local srv",
    ]


# Index 0 listens like torchrun's c10d store; index 1 finds it by name and says who it is.
RENDEZVOUS = """
import os, socket, time
index = int(os.environ['JOB_COMPLETION_INDEX'])
master = os.environ['MASTER_ADDR']
if index == 0:
    server = socket.create_server(('0.0.0.0', 29500))
    server.settimeout(120)
    conn, (peer_ip, _) = server.accept()
    hello = conn.recv(100).decode()
    conn.sendall(b'welcome ' + socket.gethostname().encode()); conn.close()
    print('rank 0 accepted', hello, 'from', peer_ip)
else:
    deadline = time.time() + 120
    while True:
        try:
            with socket.create_connection((master, 29500), timeout=3) as s:
                s.sendall(f'rank {index} {socket.gethostname()}'.encode())
                print('rank', index, 'joined', s.getpeername()[0], s.recv(100).decode())
            break
        except OSError:
            assert time.time() < deadline, 'rendezvous never reachable'
            time.sleep(0.3)
"""


def test_indexed_job_rendezvous_across_two_nodes(
    cluster: ClusterHandle, namespace: str, two_nodes: tuple[str, str]
) -> None:
    core = client.CoreV1Api(cluster.api_client())
    batch = client.BatchV1Api(cluster.api_client())
    core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "rdzv"},
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": {"job-name": "train"},
            },
        },
    )
    container = manifests.python_container(
        "main", RENDEZVOUS, env=[{"name": "MASTER_ADDR", "value": "train-0.rdzv"}]
    )
    job = manifests.job("train", container)
    job["spec"].update(completionMode="Indexed", completions=2, parallelism=2)
    job["spec"]["template"]["spec"].update(
        subdomain="rdzv",
        affinity={
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "labelSelector": {"matchLabels": {"job-name": "train"}},
                        "topologyKey": "kubernetes.io/hostname",
                    }
                ]
            }
        },
    )
    batch.create_namespaced_job(namespace, job)

    def complete() -> bool:
        return condition_status(batch.read_namespaced_job_status("train", namespace), "Complete") == "True"

    def state() -> str:
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=train").items
        return str([(p.metadata.name, p.spec.node_name, p.status.phase) for p in pods])

    wait_for(complete, 150, description=lambda: f"Job train Complete; pods: {state()}")
    pods = {
        int(p.metadata.annotations["batch.kubernetes.io/job-completion-index"]): p
        for p in core.list_namespaced_pod(namespace, label_selector="job-name=train").items
        if p.status.phase == "Succeeded"
    }
    assert sorted(pods) == [0, 1]
    assert {pods[0].spec.node_name, pods[1].spec.node_name} == set(two_nodes)
    assert [pods[i].spec.hostname for i in (0, 1)] == ["train-0", "train-1"]
    rank0 = cluster.read_log(namespace, pods[0].metadata.name)
    rank1 = cluster.read_log(namespace, pods[1].metadata.name)
    assert rank0.strip() == f"rank 0 accepted rank 1 train-1 from {pods[1].status.pod_ip}", rank0
    assert rank1.strip() == f"rank 1 joined {pods[0].status.pod_ip} welcome train-0", rank1
