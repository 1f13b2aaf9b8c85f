"""The node agent rides out an apiserver outage, as kubelet does.

Aspect tested: a pod whose container is still stopping when the apiserver goes away finishes
terminating during the outage; the agent keeps retrying its final status and the release, and the
pod object is gone once the apiserver is back. (Before, the pod's worker died on the refused
connection and the pod stayed Terminating for good, so its Job never got a replacement.)
"""

from __future__ import annotations

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kubetune.localcluster.testing import ClusterHandle, wait_for
from tests.cluster import manifests

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# Takes SIGTERM, says so, and exits 3 s later: while the apiserver is down.
SLOW_STOP = """
import signal, sys, time
def stop(*_):
    print("term", flush=True)
    time.sleep(3)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("up", flush=True)
time.sleep(600)
"""


def test_pod_stopping_during_an_outage_is_released_when_the_apiserver_returns(
    cluster: ClusterHandle, namespace: str
) -> None:
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_pod(
        namespace, manifests.pod("slow-stop", manifests.python_container("main", SLOW_STOP))
    )
    wait_for(lambda: "up" in cluster.read_log(namespace, "slow-stop"), 60, ignore=(ApiException, OSError))
    core.delete_namespaced_pod("slow-stop", namespace)
    # Only once the agent has acted on the deletion, so the container's exit falls in the outage.
    wait_for(lambda: "term" in cluster.read_log(namespace, "slow-stop"), 30, ignore=(ApiException, OSError))
    try:
        cluster.restart_apiserver(down_s=6)
    except NotImplementedError:
        pytest.skip("needs the embedded local cluster")

    def gone() -> bool:
        try:
            core.read_namespaced_pod("slow-stop", namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(gone, 90, interval=0.5, description="the pod to be released after the outage", ignore=(OSError,))
