"""The node agent: kubelet's job for one Node of the local cluster.

It registers the Node (Ready, with cpu/memory/pods and an optional fake ``nvidia.com/gpu``
capacity), renews the node Lease, watches the pods bound to it and hands each to a
:class:`~kubetune.localcluster.nodeagent.pod.PodWorker`. Containers run through the node's
container runtime (:mod:`~kubetune.localcluster.nodeagent.runtime`): real containers from
images with podman, or host processes for fast tests.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune.localcluster import network, procs
from kubetune.localcluster.kubeapi import ApiError, Credentials, KubeAPI
from kubetune.localcluster.nodeagent.dns import DNSServer, Resolver, host_nameservers
from kubetune.localcluster.nodeagent.pod import PodWorker, now_rfc3339
from kubetune.localcluster.nodeagent.provisioner import Provisioner
from kubetune.localcluster.nodeagent.runtime import ContainerRuntime, make_runtime
from kubetune.localcluster.nodeagent.server import LogServer
from kubetune.localcluster.nodeagent.services import ServiceProxy

JSON = dict[str, Any]
log = logging.getLogger("kubetune.nodeagent")

LEASE_DURATION_S = 40
LEASE_RENEW_S = 10.0
NOT_READY_TAINT = "node.kubernetes.io/not-ready"


def _micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NodeAgent:
    def __init__(self, config: JSON) -> None:
        self.config = config
        self.node_name: str = config["node_name"]
        self.api = KubeAPI(
            Credentials(config["server"], config["ca_file"], config["cert_file"], config["key_file"])
        )
        self.cluster_state = Path(config["cluster_state_dir"])
        self.cluster_name = self.cluster_state.name
        self.node_dir = Path(config["node_dir"])
        self.bridge: str = config["bridge"]
        self.gateway: str = config["gateway"]
        self.prefix_len: int = config["prefix_len"]
        self.pod_cidr = ipaddress.ip_network(config["pod_cidr"])
        self.restart_backoff_s: float = config["restart_backoff_s"]
        self.max_restart_backoff_s: float = config["max_restart_backoff_s"]
        # On agent shutdown pods get at most this long to exit after SIGTERM.
        self.shutdown_grace_s: float = config.get("shutdown_grace_s", 2.0)
        self.service_env = {
            "KUBERNETES_SERVICE_HOST": config["api_host"],
            "KUBERNETES_SERVICE_PORT": str(config["api_port"]),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(config["api_port"]),
            "KUBERNETES_PORT": f"tcp://{config['api_host']}:{config['api_port']}",
            "KUBERNETES_PORT_443_TCP": f"tcp://{config['api_host']}:{config['api_port']}",
            "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
            "KUBERNETES_PORT_443_TCP_PORT": str(config["api_port"]),
            "KUBERNETES_PORT_443_TCP_ADDR": config["api_host"],
        }
        self.runtime: ContainerRuntime = make_runtime(
            config.get("runtime", "process"), self.cluster_name, self.node_name
        )
        # Host processes find `python` in the agent's own environment first; containers keep the
        # image's PATH, as under kubelet.
        self.container_path = os.pathsep.join(
            [str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")]
        )
        self.stopping = threading.Event()
        self.workers: dict[str, PodWorker] = {}
        self._lock = threading.Lock()
        self._ips: dict[str, str] = {}
        # pod uid -> (netns, host veth) of every live sandbox, swept on shutdown.
        self.sandboxes: dict[str, tuple[str, str]] = {}
        # What dnsPolicy: Default pods get, and where the cluster DNS forwards other names.
        try:
            self.host_resolv_conf = Path("/etc/resolv.conf").read_text()
        except OSError:
            self.host_resolv_conf = ""

    def base_env(self, hostname: str) -> dict[str, str]:
        """Variables every container starts from; the pod's own ``env`` may override them."""
        if self.runtime.name != "kubetune":
            return {"HOSTNAME": hostname}
        return {
            "PATH": self.container_path,
            "HOSTNAME": hostname,
            "HOME": "/root",
            # Logs are files read by tests and `kubectl logs`: block buffering would hide them.
            "PYTHONUNBUFFERED": "1",
        }

    # -- node registration ---------------------------------------------------------------------

    def _resources(self) -> JSON:
        resources = {
            "cpu": self.config["cpu"],
            "memory": self.config["memory"],
            "pods": str(self.config["max_pods"]),
            "ephemeral-storage": "100Gi",
        }
        if self.config["gpus"]:
            resources["nvidia.com/gpu"] = str(self.config["gpus"])
        return resources

    def _node_status(self) -> JSON:
        now = now_rfc3339()

        def condition(kind: str, status: str, reason: str, message: str) -> JSON:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": now, "lastTransitionTime": self._started}  # fmt: skip

        return {
            "capacity": self._resources(),
            "allocatable": self._resources(),
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "enough memory"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "enough PIDs"),
                condition("NetworkUnavailable", "False", "RouteCreated", "pods share the cluster bridge"),
                condition("Ready", "True", "KubeletReady", "kubetune node agent is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.gateway},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_server.port}},
            "nodeInfo": {
                "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": os.uname().release,
                "osImage": "kubetune local node", "containerRuntimeVersion": self.runtime.version,
                "kubeletVersion": self._version, "kubeProxyVersion": "", "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }  # fmt: skip

    def register(self) -> None:
        self._started = now_rfc3339()
        self._version = self.api.get("/version").get("gitVersion", "v0.0.0")
        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "node.kubernetes.io/instance-type": "kubetune-local",
        }
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": labels},
            "spec": {"podCIDR": str(self.pod_cidr), "podCIDRs": [str(self.pod_cidr)]},
        }
        try:
            created = self.api.create("/api/v1/nodes", node)
        except ApiError as exc:
            if exc.status != 409:
                raise
            created = self.api.get(f"/api/v1/nodes/{self.node_name}")
        self.node_uid = created["metadata"]["uid"]
        self.api.merge_patch(f"/api/v1/nodes/{self.node_name}/status", {"status": self._node_status()})
        # Admission taints every new Node not-ready; kube-controller-manager's node lifecycle
        # controller would lift it seconds later, but it is not run, so the agent lifts it.
        taints = [t for t in created.get("spec", {}).get("taints", []) or [] if t["key"] != NOT_READY_TAINT]
        self.api.merge_patch(f"/api/v1/nodes/{self.node_name}", {"spec": {"taints": taints or None}})
        self._renew_lease()

    def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        spec = {
            "holderIdentity": self.node_name,
            "leaseDurationSeconds": LEASE_DURATION_S,
            "renewTime": _micro_time(),
        }
        try:
            self.api.merge_patch(path, {"spec": spec})
        except ApiError as exc:
            if exc.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.node_name, "uid": self.node_uid}
            self.api.create(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                {"metadata": {"name": self.node_name, "ownerReferences": [owner]}, "spec": spec},
            )

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(LEASE_RENEW_S):
            try:
                self._renew_lease()
                self.api.merge_patch(
                    f"/api/v1/nodes/{self.node_name}/status", {"status": self._node_status()}
                )
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)

    # -- pods ------------------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        selector = f"spec.nodeName={self.node_name}"
        while not self.stopping.is_set():
            try:
                listing = self.api.get("/api/v1/pods", fieldSelector=selector)
                seen = {p["metadata"]["uid"] for p in listing["items"]}
                for pod in listing["items"]:
                    self._dispatch(pod)
                for uid, worker in list(self.workers.items()):
                    if uid not in seen:
                        worker.update(None)
                version = listing["metadata"]["resourceVersion"]
                while not self.stopping.is_set():
                    for event in self.api.watch(
                        "/api/v1/pods", version, timeout_s=60, fieldSelector=selector
                    ):
                        if event["type"] == "ERROR":
                            raise ApiError(event["object"].get("code", 500), json.dumps(event["object"]))
                        obj = event["object"]
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] == "BOOKMARK":
                            continue
                        if event["type"] == "DELETED":
                            deleted = self.workers.get(obj["metadata"]["uid"])
                            if deleted:
                                deleted.update(None)
                        else:
                            self._dispatch(obj)
            except Exception as exc:
                if self.stopping.is_set():
                    return
                # 410 Gone and dropped connections end up here: list again and carry on.
                log.info("pod watch restarting: %s", exc)
                time.sleep(0.5)

    def _dispatch(self, pod: JSON) -> None:
        uid = pod["metadata"]["uid"]
        with self._lock:
            worker = self.workers.get(uid)
            if worker is None:
                if self.stopping.is_set():
                    return
                worker = self.workers[uid] = PodWorker(self, pod)
                worker.start()
                return
        worker.update(pod)

    def worker_done(self, worker: PodWorker) -> None:
        with self._lock:
            if self.workers.get(worker.uid) is worker:
                del self.workers[worker.uid]

    def allocate_ip(self, uid: str) -> str:
        with self._lock:
            used = set(self._ips.values())
            for host in list(self.pod_cidr.hosts())[1:]:
                if str(host) not in used:
                    self._ips[uid] = str(host)
                    return str(host)
        raise RuntimeError(f"node {self.node_name}: pod CIDR {self.pod_cidr} exhausted")

    def release_ip(self, uid: str) -> None:
        with self._lock:
            self._ips.pop(uid, None)

    def get_object(self, namespace: str, kind: str, name: str) -> JSON | None:
        plural = {"configmap": "configmaps", "secret": "secrets"}[kind]
        try:
            return self.api.get(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def request_token(self, pod: JSON, service_account: str, source: JSON) -> str:
        meta = pod["metadata"]
        spec: JSON = {
            "expirationSeconds": source.get("expirationSeconds", 3607),
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]},
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        result = self.api.create(
            f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{service_account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        token: str = result["status"]["token"]
        return token

    def post_event(
        self, pod: JSON, kind: str, reason: str, message: str, container: str | None = None
    ) -> None:
        """Record an Event on ``pod`` as kubelet does (``kubectl describe`` shows them)."""
        meta = pod["metadata"]
        now = now_rfc3339()
        involved: JSON = {
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta["uid"],
        }
        if container:
            involved["fieldPath"] = f"spec.containers{{{container}}}"
        event = {
            "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": meta["namespace"]},
            "involvedObject": involved,
            "type": kind,
            "reason": reason,
            "message": message,
            "source": {"component": "kubelet", "host": self.node_name},
            "reportingComponent": "kubelet",
            "reportingInstance": self.node_name,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.api.create(f"/api/v1/namespaces/{meta['namespace']}/events", event)
        except ApiError as exc:
            # Events are best effort: a namespace being deleted refuses them.
            log.debug("event %s on %s/%s not recorded: %s", reason, meta["namespace"], meta["name"], exc)

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """A PVC's data: its bound PV's local/hostPath path, else a directory per claim."""
        pvc = self.api.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
        volume_name = pvc.get("spec", {}).get("volumeName")
        if volume_name:
            pv = self.api.get(f"/api/v1/persistentvolumes/{volume_name}")
            for kind in ("hostPath", "local"):
                if kind in pv.get("spec", {}):
                    path = Path(pv["spec"][kind]["path"])
                    path.mkdir(parents=True, exist_ok=True)
                    return path
        path = self.cluster_state / "volumes" / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        return path

    # -- lifecycle -------------------------------------------------------------------------------

    def _container_running(self, namespace: str, pod: str, container: str) -> bool:
        with self._lock:
            workers = list(self.workers.values())
        return any(
            c.running
            for w in workers
            if (w.namespace, w.pod_name) == (namespace, pod)
            for c in w.containers
            if c.name == container
        )

    def run(self) -> None:
        self.node_dir.mkdir(parents=True, exist_ok=True)
        # Containers an earlier agent of this node left behind (it crashed) are not ours to adopt.
        self.runtime.sweep()
        self.log_server = LogServer(
            self.gateway,
            self.node_dir / "pods",
            cert_file=self.config["serving_cert_file"],
            key_file=self.config["serving_key_file"],
            ca_file=self.config["ca_file"],
            is_running=self._container_running,
        )
        self.log_server.start()
        self.register()
        threads = [
            threading.Thread(target=self._watch_loop, name="pod-watch", daemon=True),
            threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True),
        ]
        if self.config.get("cluster_services"):
            provisioner = Provisioner(self.api, self.cluster_state / "volumes" / "pv", self.stopping)
            threads.append(threading.Thread(target=provisioner.run, name="provisioner", daemon=True))
            resolver = Resolver(
                ipaddress.IPv4Network(f"{self.gateway}/{self.prefix_len}", strict=False),
                host_nameservers(self.host_resolv_conf, exclude=self.gateway),
            )
            # Pods' resolv.conf names the bridge address: every node's pods reach it on-link.
            dns = DNSServer(resolver, self.gateway, self.config.get("dns_port", 53))
            dns.start()
            proxy = ServiceProxy(self.api, self.bridge, self.stopping, resolver)
            threads.append(threading.Thread(target=proxy.run, name="service-proxy", daemon=True))
        for thread in threads:
            thread.start()
        self.stopping.wait()
        self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.wake.set()
        for worker in workers:
            worker.join(self.shutdown_grace_s + 10)
        # Workers that did not finish in time must not leave namespaces or processes behind.
        procs.kill_recorded(self.node_dir / "containers", grace=0)
        self.runtime.sweep()
        for netns, veth in list(self.sandboxes.values()):
            network.delete_pod_netns(netns, veth)
            (self.cluster_state / "netns" / netns).unlink(missing_ok=True)
        stopped = {
            "type": "Ready",
            "status": "Unknown",
            "reason": "NodeStatusUnknown",
            "message": "kubetune node agent stopped",
            "lastHeartbeatTime": now_rfc3339(),
            "lastTransitionTime": now_rfc3339(),
        }
        with contextlib.suppress(Exception):
            self.api.merge_patch(
                f"/api/v1/nodes/{self.node_name}/status", {"status": {"conditions": [stopped]}}
            )
