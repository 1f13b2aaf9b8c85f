"""Start and stop one local cluster: etcd, the three control-plane components and node agents.

Each cluster gets its own state directory (certificates, etcd data, logs, pid records), its
own free ports and its own bridge network, so two clusters can run side by side. Every
process is started in its own process group with a parent-death signal, and recorded, so
nothing outlives the cluster even when its owner is killed (see :mod:`.procs`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.localcluster import binaries, kueue, network, pki, procs
from kubetune.localcluster.nodeagent.provisioner import storage_class

# Controllers the tests and the operator rely on; everything else in kube-controller-manager
# stays off to keep the control plane light on a 2-core machine.
CONTROLLERS = (
    "job-controller",
    "cronjob-controller",
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "endpointslice-controller",
    "ttl-after-finished-controller",
    "pod-garbage-collector-controller",
    "persistentvolume-binder-controller",
    "disruption-controller",
)


def service_cidr(gateway: str) -> str:
    """Each cluster's ClusterIPs sit inside its own bridge network (10.x.128.0/20), so pods
    reach them on-link and two clusters never share one."""
    return ".".join(gateway.split(".")[:2]) + ".128.0/20"


def first_service_ip(gateway: str) -> str:
    return ".".join(gateway.split(".")[:2]) + ".128.1"


# The issuer every Kubernetes distribution uses by default; in-cluster clients never check it.
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
API_SERVER_NAMES = [
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
]


def default_run_dir() -> Path:
    return binaries.cache_dir() / "run"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class NodeOptions:
    """One node agent. ``gpus`` is the fake ``nvidia.com/gpu`` capacity it advertises.
    ``runtime`` is ``process`` (commands as host processes, images ignored) or ``podman`` (real
    containers from local images, security context and limits enforced)."""

    name: str = "node-1"
    gpus: int = 0
    runtime: str = "process"
    cpu: str = "8"
    memory: str = "32Gi"
    max_pods: int = 110


@dataclass
class ClusterOptions:
    """How to start a cluster.

    ``name`` names the state directory (``<run_dir>/<name>``); a random one is picked when
    unset. ``restart_backoff_s`` is the first delay before a crashed container is restarted
    (kubelet uses 10 s; tests want it short); it doubles up to ``max_restart_backoff_s``.
    ``kueue`` adds Kueue's controller and webhooks (built apart: ``make kueue-build``).
    """

    name: str | None = None
    run_dir: Path = field(default_factory=default_run_dir)
    nodes: list[NodeOptions] = field(default_factory=lambda: [NodeOptions()])
    restart_backoff_s: float = 10.0
    max_restart_backoff_s: float = 300.0
    startup_timeout_s: float = 120.0
    kueue: bool = False


class ClusterError(RuntimeError):
    pass


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Component:
    """One started process with its log file."""

    def __init__(
        self, name: str, argv: list[str], state_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.state_dir = state_dir
        self.log_path = state_dir / "logs" / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._record = state_dir / "pids" / name
        self.proc = self._launch()

    def _launch(self) -> subprocess.Popen[bytes]:
        # The parent-death signal makes a component die with its owner even on SIGKILL.
        prefix = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                prefix + self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=self.env,
            )  # fmt: skip
        procs.record(self.state_dir / "pids", self.name, proc.pid)
        return proc

    def restart(self, down_s: float = 0.0, grace: float = 10.0) -> None:
        """Stop the process, wait ``down_s`` seconds, and start it again with the same command
        line (its log continues)."""
        self.stop(grace)
        time.sleep(down_s)
        self.proc = self._launch()

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise ClusterError(
                f"{self.name} exited with code {self.proc.returncode}; last log lines "
                f"({self.log_path}):\n{_tail(self.log_path)}"
            )

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            procs.kill_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                procs.kill_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Children that ignored SIGTERM in the group are not left behind.
        procs.kill_group(self.proc.pid, signal.SIGKILL)
        self._record.unlink(missing_ok=True)


class LocalCluster:
    """A running local cluster. Use :meth:`start` (or ``with LocalCluster(...) as c``)."""

    def __init__(self, options: ClusterOptions | None = None) -> None:
        self.options = options or ClusterOptions()
        self.name = self.options.name or "c" + secrets.token_hex(3)
        self.state_dir = self.options.run_dir / self.name
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.components: dict[str, Component] = {}
        self.nodes: dict[str, Component] = {}
        self.bridge = "ktbr" + secrets.token_hex(3)
        self.gateway = ""
        self.api_port = 0
        self.pki: pki.ClusterPKI | None = None
        self._next_node_index = 1
        self.binaries: dict[str, Path] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def server(self) -> str:
        return f"https://{self.gateway}:{self.api_port}"

    def start(self) -> LocalCluster:
        if os.geteuid() != 0:
            raise ClusterError("the local cluster needs root (network and mount namespaces for pods)")
        started = time.monotonic()
        self.binaries = binaries.find()
        if self.options.kueue:
            self.binaries["kueue"] = binaries.find_kueue()
        procs.reap_stale(self.options.run_dir)
        if self.state_dir.exists():
            raise ClusterError(f"a cluster named {self.name!r} is already running ({self.state_dir})")
        self.state_dir.mkdir(parents=True)
        procs.record(self.state_dir, "owner", os.getpid())
        try:
            self._start_control_plane()
            for node in self.options.nodes:
                self.add_node(node, wait=False)
            for node in self.options.nodes:
                self.wait_node_ready(node.name)
            if self.options.kueue:
                # After the nodes: the apiserver reaches Kueue's webhooks through the first node
                # agent's service proxy.
                self._start_kueue()
        except BaseException:
            self.stop()
            raise
        (self.state_dir / "startup-seconds").write_text(f"{time.monotonic() - started:.1f}\n")
        return self

    def stop(self) -> None:
        for name in list(self.nodes):
            self.remove_node(name, delete_node=False)
        for name in ("kueue", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            component = self.components.pop(name, None)
            if component:
                component.stop()
        if self.state_dir.exists():
            # KUBETUNE_KEEP_CLUSTER_STATE=1 keeps logs and etcd data for a post-mortem.
            procs.cleanup_state(self.state_dir, remove=not os.environ.get("KUBETUNE_KEEP_CLUSTER_STATE"))

    # -- control plane -----------------------------------------------------------------------

    def _start_control_plane(self) -> None:
        state = self.state_dir
        # Recorded first, so a crash right after creating it still gets the bridge reaped.
        (state / "bridge").write_text(self.bridge)
        gateway = network.create_bridge(self.bridge, self.options.run_dir)
        self.gateway = str(gateway.ip)
        etcd_port, etcd_peer_port = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{etcd_peer_port}"
        self.components["etcd"] = Component(
            "etcd",
            [
                str(self.binaries["etcd"]),
                "--name=default",
                f"--data-dir={state / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                # A test cluster is thrown away; fsync would dominate its latency.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            state,
        )
        # Certificates are made while etcd starts.
        self.pki = cluster_pki = pki.create_pki(
            state / "pki",
            server_ips=[self.gateway, "127.0.0.1", first_service_ip(self.gateway)],
            server_names=API_SERVER_NAMES,
        )
        self.api_port = free_port(self.gateway)
        self.components["kube-apiserver"] = Component(
            "kube-apiserver",
            [
                str(self.binaries["kube-apiserver"]),
                f"--etcd-servers={etcd_url}",
                # Pods reach the host only at the bridge address, so the apiserver listens there.
                f"--bind-address={self.gateway}",
                f"--advertise-address={self.gateway}",
                f"--secure-port={self.api_port}",
                f"--cert-dir={state / 'pki'}",
                f"--tls-cert-file={cluster_pki.serving_cert}",
                f"--tls-private-key-file={cluster_pki.serving_key}",
                f"--client-ca-file={cluster_pki.ca_cert}",
                "--authorization-mode=RBAC",
                # `kubectl logs` goes through the node agent's log server, which wants a client
                # certificate from the cluster CA and serves on the bridge address.
                f"--kubelet-client-certificate={cluster_pki.admin_cert}",
                f"--kubelet-client-key={cluster_pki.admin_key}",
                f"--kubelet-certificate-authority={cluster_pki.ca_cert}",
                "--kubelet-preferred-address-types=InternalIP",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={cluster_pki.sa_pub}",
                f"--service-account-signing-key-file={cluster_pki.sa_key}",
                f"--service-cluster-ip-range={service_cidr(self.gateway)}",
                "--allow-privileged=true",
                # Flow control only adds latency and CPU to a single-user test cluster.
                "--enable-priority-and-fairness=false",
                "--max-requests-inflight=0",
                "--max-mutating-requests-inflight=0",
                "--profiling=false",
                "--v=1",
            ],
            state,
        )
        self._write_kubeconfig()
        self._wait_apiserver_ready()
        self.api_request("POST", "/apis/storage.k8s.io/v1/storageclasses", storage_class())
        kubeconfig = str(self.kubeconfig)
        self.components["kube-controller-manager"] = Component(
            "kube-controller-manager",
            [
                str(self.binaries["kube-controller-manager"]),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                f"--service-account-private-key-file={cluster_pki.sa_key}",
                f"--root-ca-file={cluster_pki.ca_cert}",
                f"--controllers={','.join(CONTROLLERS)}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={state / 'pki' / 'kcm'}",
                "--v=1",
            ],
            state,
        )
        self.components["kube-scheduler"] = Component(
            "kube-scheduler",
            [
                str(self.binaries["kube-scheduler"]),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={state / 'pki' / 'scheduler'}",
                "--v=1",
            ],
            state,
        )

    def _start_kueue(self) -> None:
        binary = self.binaries["kueue"]
        state = self.state_dir / "kueue"
        webhook_port, health_port = free_port(self.gateway), free_port()
        overlay = kueue.install(
            binary.parent / "config", self.api_request, endpoint_ip=self.gateway, webhook_port=webhook_port
        )
        config = overlay.controller_config(
            webhook_host=self.gateway,
            webhook_port=webhook_port,
            health_port=health_port,
            cert_dir=state / "certs",
        )
        config_path = kueue.write_config(state / "config.yaml", config)
        self.components["kueue"] = Component(
            "kueue",
            # The visibility API would need an aggregated APIService and a fixed port; tests read
            # Workload objects instead.
            [str(binary), f"--config={config_path}", "--feature-gates=VisibilityOnDemand=false"],
            self.state_dir,
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
        )
        self._wait("Kueue to be ready with its webhook certificates injected",
                   lambda: kueue.ready(health_port, self.api_request, overlay, state / "certs"))  # fmt: skip

    def _write_kubeconfig(self) -> None:
        assert self.pki is not None

        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        context = f"kubetune-{self.name}"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": context,
                    "cluster": {"server": self.server, "certificate-authority-data": b64(self.pki.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": context,
                    "user": {
                        "client-certificate-data": b64(self.pki.admin_cert),
                        "client-key-data": b64(self.pki.admin_key),
                    },
                }
            ],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
            "current-context": context,
        }
        # JSON is valid YAML, and keeps this module free of a yaml import.
        self.kubeconfig.write_text(json.dumps(config, indent=2) + "\n")
        self.kubeconfig.chmod(0o600)

    def _ssl_context(self) -> ssl.SSLContext:
        assert self.pki is not None
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return context

    def api_get(self, path: str) -> Any:
        """GET ``path`` as the admin and decode the JSON answer (for readiness checks)."""
        return self.api_request("GET", path)

    def api_request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.server + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, context=self._ssl_context(), timeout=10) as resp:
            answer = resp.read()
        return json.loads(answer) if answer[:1] in (b"{", b"[") else answer.decode()

    def _wait(self, what: str, check: Any, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.options.startup_timeout_s)
        last_error: object = None
        while time.monotonic() < deadline:
            for component in [*self.components.values(), *self.nodes.values()]:
                component.check_running()
            try:
                if check():
                    return
            except (OSError, urllib.error.URLError, ValueError) as exc:
                last_error = exc
            time.sleep(0.1)
        raise ClusterError(f"timed out waiting for {what} (last error: {last_error})")

    def _wait_apiserver_ready(self) -> None:
        self._wait("kube-apiserver /readyz", lambda: self.api_get("/readyz") == "ok")

    def restart_apiserver(self, down_s: float = 0.0) -> None:
        """Stop kube-apiserver (SIGTERM, as a rolling control-plane upgrade does), keep it down for
        ``down_s`` seconds, start it again on the same address and etcd, and wait for ``/readyz``.
        Every client's watch breaks meanwhile; the others must re-establish theirs."""
        self.components["kube-apiserver"].restart(down_s)
        self._wait_apiserver_ready()

    def wait_node_ready(self, name: str, timeout: float | None = None) -> None:
        def ready() -> bool:
            node = self.api_get(f"/api/v1/nodes/{name}")
            return any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in node.get("status", {}).get("conditions", [])
            )

        self._wait(f"node {name} to be Ready", ready, timeout)

    # -- nodes -------------------------------------------------------------------------------

    def add_node(self, node: NodeOptions, *, wait: bool = True) -> None:
        """Start a node agent (the kubelet stand-in) registering ``node.name``."""
        assert self.pki is not None
        if node.name in self.nodes:
            raise ClusterError(f"node {node.name} already exists")
        index = self._next_node_index
        self._next_node_index += 1
        node_dir = self.state_dir / "nodes" / node.name
        node_dir.mkdir(parents=True, exist_ok=True)
        prefix = ".".join(self.gateway.split(".")[:2])
        config = {
            "node_name": node.name,
            "server": self.server,
            "ca_file": str(self.pki.ca_cert),
            "cert_file": str(self.pki.admin_cert),
            "key_file": str(self.pki.admin_key),
            "serving_cert_file": str(self.pki.serving_cert),
            "serving_key_file": str(self.pki.serving_key),
            "api_host": self.gateway,
            "api_port": self.api_port,
            "bridge": self.bridge,
            "gateway": self.gateway,
            "pod_cidr": f"{prefix}.{index}.0/24",
            "prefix_len": 16,
            "cluster_state_dir": str(self.state_dir),
            "node_dir": str(node_dir),
            "gpus": node.gpus,
            "runtime": node.runtime,
            "cpu": node.cpu,
            "memory": node.memory,
            "max_pods": node.max_pods,
            "restart_backoff_s": self.options.restart_backoff_s,
            "max_restart_backoff_s": self.options.max_restart_backoff_s,
            # One agent provisions volumes and proxies Services for the whole cluster.
            "cluster_services": index == 1,
        }
        config_path = node_dir / "config.json"
        config_path.write_text(json.dumps(config, indent=2))
        self.nodes[node.name] = Component(
            f"node-{node.name}",
            [sys.executable, "-m", "kubetune.localcluster.nodeagent", str(config_path)],
            self.state_dir,
        )
        if wait:
            self.wait_node_ready(node.name)

    def remove_node(self, name: str, *, delete_node: bool = True) -> None:
        """Stop a node agent; it stops its pods first. ``delete_node`` also deletes the Node."""
        component = self.nodes.pop(name)
        # The agent needs time to SIGTERM its pods and wait their grace periods.
        component.stop(grace=40.0)
        if delete_node:
            # Already gone is fine; urllib's HTTPError is an OSError.
            with contextlib.suppress(OSError):
                self.api_request("DELETE", f"/api/v1/nodes/{name}")

    def node_dir(self, name: str) -> Path:
        return self.state_dir / "nodes" / name
