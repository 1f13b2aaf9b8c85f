"""Workloads on the real control plane and the node agent.

Aspects tested:
- a Job whose pod runs ``python -c`` completes (exit code 0, phase Succeeded, Complete);
- a failing Job is retried up to ``backoffLimit`` and then Failed (BackoffLimitExceeded),
  every attempt reporting its exit code and termination message;
- a 2-replica Deployment with an httpGet readiness probe becomes Available and both pod IPs
  answer HTTP from the host on the same port;
- deleting a namespace SIGTERMs its processes and removes every object in it, and deleting a
  Deployment garbage-collects its ReplicaSet and pods through owner references.
- a Service's ClusterIP spreads connections over the ready replicas (from the host and from a
  pod), and pods find it by name (cluster DNS) and by ``<SVC>_SERVICE_*`` variables.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from kubernetes import client

from kubetune.localcluster.testing import ClusterHandle, condition_status, wait_for
from tests.cluster import manifests

pytestmark = pytest.mark.cluster


def job_pods(core: client.CoreV1Api, namespace: str, job: str) -> list[client.V1Pod]:
    return core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items


def test_job_completes(cluster: ClusterHandle, namespace: str) -> None:
    batch = client.BatchV1Api(cluster.api_client())
    core = client.CoreV1Api(cluster.api_client())
    container = manifests.python_container("main", "import sys; print('hello from', sys.version_info[:2])")
    batch.create_namespaced_job(namespace, manifests.job("ok", container))

    def complete() -> bool:
        return condition_status(batch.read_namespaced_job_status("ok", namespace), "Complete") == "True"

    wait_for(
        complete,
        60,
        description=lambda: f"Job ok Complete: {batch.read_namespaced_job_status('ok', namespace).status}",
    )
    (pod,) = job_pods(core, namespace, "ok")
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0
    assert "hello from" in cluster.read_log(namespace, pod.metadata.name)


def test_failing_job_is_retried_up_to_backoff_limit(cluster: ClusterHandle, namespace: str) -> None:
    batch = client.BatchV1Api(cluster.api_client())
    core = client.CoreV1Api(cluster.api_client())
    code = "open('/dev/termination-log', 'w').write('bad input'); raise SystemExit(3)"
    batch.create_namespaced_job(
        namespace, manifests.job("bad", manifests.python_container("main", code), backoff_limit=1)
    )

    def failed() -> bool:
        return condition_status(batch.read_namespaced_job_status("bad", namespace), "Failed") == "True"

    # The job controller waits 10 s before the retry; that is its fixed backoff, not ours.
    wait_for(failed, 60, description="Job bad Failed")
    job = batch.read_namespaced_job_status("bad", namespace)
    assert job.status.failed == 2  # the first attempt plus backoffLimit=1 retry
    assert any(c.reason == "BackoffLimitExceeded" for c in job.status.conditions)
    for pod in job_pods(core, namespace, "bad"):
        terminated = pod.status.container_statuses[0].state.terminated
        assert (pod.status.phase, terminated.exit_code, terminated.message) == ("Failed", 3, "bad input")


def test_deployment_with_readiness_probe_becomes_available(cluster: ClusterHandle, namespace: str) -> None:
    apps = client.AppsV1Api(cluster.api_client())
    core = client.CoreV1Api(cluster.api_client())
    container = manifests.python_container(
        "web",
        manifests.HTTP_SERVER,
        env=[{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        ports=[{"name": "http", "containerPort": 8000}],
        readinessProbe={"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    )
    apps.create_namespaced_deployment(namespace, manifests.deployment("web", 2, container))

    def available() -> bool:
        return (
            condition_status(apps.read_namespaced_deployment_status("web", namespace), "Available") == "True"
        )

    wait_for(
        available,
        60,
        description=lambda: (
            f"Deployment web Available: {apps.read_namespaced_deployment_status('web', namespace).status}"
        ),
    )
    pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
    assert len(pods) == 2 and all(condition_status(p, "Ready") == "True" for p in pods)
    answers = {}
    for pod in pods:
        with urllib.request.urlopen(f"http://{pod.status.pod_ip}:8000/", timeout=5) as resp:
            answers[pod.status.pod_ip] = resp.read().decode()
    assert sorted(answers.values()) == sorted(p.metadata.name for p in pods)


def test_namespace_deletion_terminates_processes_and_collects_objects(
    cluster: ClusterHandle, namespace: str, tmp_path: Path
) -> None:
    if not cluster.is_local:
        pytest.skip("observes processes through a hostPath on the node")
    apps = client.AppsV1Api(cluster.api_client())
    core = client.CoreV1Api(cluster.api_client())
    code = """
import os, signal, sys, time, pathlib
out = pathlib.Path('/out') / os.environ['HOSTNAME']
def term(*_):
    out.write_text('SIGTERM'); sys.exit(0)
signal.signal(signal.SIGTERM, term)
out.write_text('running')
while True: time.sleep(1)
"""
    container = manifests.python_container(
        "sleeper", code, volumeMounts=[{"name": "out", "mountPath": "/out"}]
    )
    volumes = [{"name": "out", "hostPath": {"path": str(tmp_path)}}]
    # Garbage collection through owner references: Deployment -> ReplicaSet -> Pods.
    apps.create_namespaced_deployment(namespace, manifests.deployment("gc", 1, container, volumes=volumes))
    wait_for(
        lambda: core.list_namespaced_pod(namespace, label_selector="app=gc").items, 30, description="gc pod"
    )
    apps.delete_namespaced_deployment("gc", namespace, propagation_policy="Background")
    wait_for(
        lambda: (
            not apps.list_namespaced_replica_set(namespace).items
            and not core.list_namespaced_pod(namespace, label_selector="app=gc").items
        ),
        60,
        description="ReplicaSet and pods of the deleted Deployment to be garbage collected",
    )

    apps.create_namespaced_deployment(namespace, manifests.deployment("term", 2, container, volumes=volumes))
    markers = lambda: {p.name: p.read_text() for p in tmp_path.iterdir() if p.name.startswith("term-")}  # noqa: E731
    wait_for(
        lambda: list(markers().values()) == ["running"] * 2,
        60,
        description=lambda: f"two running pods: {markers()}",
    )
    core.delete_namespace(namespace)
    wait_for(
        lambda: list(markers().values()) == ["SIGTERM"] * 2,
        60,
        description=lambda: f"SIGTERM seen by both: {markers()}",
    )

    def namespace_gone() -> bool:
        return namespace not in {n.metadata.name for n in core.list_namespace().items}

    wait_for(namespace_gone, 60, description=f"namespace {namespace} to be deleted")


def test_service_cluster_ip_and_name_reach_ready_pods(cluster: ClusterHandle, namespace: str) -> None:
    if not cluster.is_local:
        pytest.skip("ClusterIPs are not reachable from outside a real cluster")
    apps = client.AppsV1Api(cluster.api_client())
    core = client.CoreV1Api(cluster.api_client())
    container = manifests.python_container(
        "web",
        manifests.HTTP_SERVER,
        env=[{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        readinessProbe={"tcpSocket": {"port": 8000}, "periodSeconds": 1},
    )
    apps.create_namespaced_deployment(namespace, manifests.deployment("web", 2, container))
    service = {
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8000}]},
    }
    ip = core.create_namespaced_service(namespace, service).spec.cluster_ip

    def both_replicas_answer() -> set[str] | None:
        seen = set()
        for _ in range(6):
            with urllib.request.urlopen(f"http://{ip}/", timeout=2) as resp:
                seen.add(resp.read().decode())
        return seen if len(seen) == 2 else None

    seen = wait_for(both_replicas_answer, 60, description=f"both replicas behind {ip}", ignore=(OSError,))
    assert all(name.startswith("web-") for name in seen)
    code = (
        "import os, urllib.request;"
        "print(urllib.request.urlopen('http://web/').read().decode(), os.environ['WEB_SERVICE_PORT'])"
    )
    core.create_namespaced_pod(namespace, manifests.pod("client", manifests.python_container("main", code)))
    wait_for(
        lambda: core.read_namespaced_pod("client", namespace).status.phase in ("Succeeded", "Failed"),
        60,
        description="client pod to finish",
    )
    out = cluster.read_log(namespace, "client")
    assert core.read_namespaced_pod("client", namespace).status.phase == "Succeeded", out
    assert out.startswith("web-") and out.split()[-1] == "80", out
