"""Services without kube-proxy: a userspace TCP proxy on each ClusterIP.

Each ClusterIP is added as a /32 to the cluster bridge. ClusterIPs lie inside the bridge's
network, so pods reach them on-link (the host answers ARP for its own addresses) and the
host reaches them locally. A listener on every ``ClusterIP:port`` forwards each connection
to a ready endpoint from the Service's EndpointSlices, round-robin. Only TCP is proxied.

The same pass hands the lists to the cluster DNS (:mod:`.dns`), which pods find through
their ``/etc/resolv.conf``; their environment also carries kubelet's
``<SVC>_SERVICE_HOST/PORT`` variables for their namespace.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import socket
import threading
from typing import Any

from kubetune.localcluster import network
from kubetune.localcluster.kubeapi import KubeAPI, resync_loop
from kubetune.localcluster.nodeagent.dns import Resolver, Zone

JSON = dict[str, Any]
log = logging.getLogger("kubetune.nodeagent")
# Watches wake the loop on every change; this is only the safety net.
_RESYNC_S = 10.0
_CONNECT_TIMEOUT_S = 5.0


def cluster_ip(service: JSON) -> str | None:
    ip = service.get("spec", {}).get("clusterIP")
    return ip if ip and ip != "None" else None


def service_env(services: list[JSON]) -> dict[str, str]:
    """kubelet's service links: ``<NAME>_SERVICE_HOST``, ``<NAME>_SERVICE_PORT[_<PORT>]``, ..."""
    env: dict[str, str] = {}
    for service in services:
        ip = cluster_ip(service)
        ports = service.get("spec", {}).get("ports") or []
        if ip is None or not ports:
            continue
        prefix = re.sub(r"[^A-Z0-9]", "_", service["metadata"]["name"].upper())
        env[f"{prefix}_SERVICE_HOST"] = ip
        env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        env[f"{prefix}_PORT"] = f"{ports[0].get('protocol', 'TCP').lower()}://{ip}:{ports[0]['port']}"
        for port in ports:
            protocol = port.get("protocol", "TCP")
            if port.get("name"):
                env[f"{prefix}_SERVICE_PORT_{re.sub(r'[^A-Z0-9]', '_', port['name'].upper())}"] = str(
                    port["port"]
                )
            base = f"{prefix}_PORT_{port['port']}_{protocol}"
            env[base] = f"{protocol.lower()}://{ip}:{port['port']}"
            env[f"{base}_PROTO"] = protocol.lower()
            env[f"{base}_PORT"] = str(port["port"])
            env[f"{base}_ADDR"] = ip
    return env


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


class _Listener:
    """Accepts on one ClusterIP:port and forwards to whatever ``backends()`` returns."""

    def __init__(self, ip: str, port: int, proxy: ServiceProxy, key: tuple[str, str, int]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen(128)
        self.proxy = proxy
        self.key = key
        self.counter = itertools.count()
        threading.Thread(target=self._accept, name=f"svc-{ip}:{port}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        backends = self.proxy.backends.get(self.key, [])
        if not backends:
            client.close()  # like kube-proxy's REJECT for a Service without ready endpoints
            return
        start = next(self.counter)
        for i in range(len(backends)):
            host, port = backends[(start + i) % len(backends)]
            try:
                upstream = socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S)
            except OSError:
                continue
            upstream.settimeout(None)
            threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
            _pump(client, upstream)
            return
        client.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class ServiceProxy:
    def __init__(
        self, api: KubeAPI, bridge: str, stopping: threading.Event, resolver: Resolver | None = None
    ) -> None:
        self.api = api
        self.resolver = resolver
        self.bridge = bridge
        self.stopping = stopping
        # (namespace, service, port) -> ready (ip, targetPort) pairs
        self.backends: dict[tuple[str, str, int], list[tuple[str, int]]] = {}
        self.listeners: dict[tuple[str, int], _Listener] = {}
        self.addresses: set[str] = set()

    def run(self) -> None:
        paths = ("/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices")
        resync_loop(self.api, paths, self.sync, self.stopping, name="service proxy", resync_s=_RESYNC_S)
        for listener in self.listeners.values():
            listener.close()

    def sync(self) -> None:
        services = self.api.get("/api/v1/services")["items"]
        slices = self.api.get("/apis/discovery.k8s.io/v1/endpointslices")["items"]
        if self.resolver is not None:
            # First: pods waiting on a peer's name should not wait for listeners to be set up.
            self.resolver.zone = Zone.build(services, slices)
        ready: dict[tuple[str, str], list[JSON]] = {}
        for endpoint_slice in slices:
            meta = endpoint_slice["metadata"]
            owner = (meta.get("labels") or {}).get("kubernetes.io/service-name")
            if owner:
                ready.setdefault((meta["namespace"], owner), []).append(endpoint_slice)
        wanted: dict[tuple[str, int], tuple[str, str, int]] = {}
        backends: dict[tuple[str, str, int], list[tuple[str, int]]] = {}
        for service in services:
            ip = cluster_ip(service)
            if ip is None:
                continue
            ns, name = service["metadata"]["namespace"], service["metadata"]["name"]
            for port in service["spec"].get("ports") or []:
                if port.get("protocol", "TCP") != "TCP":
                    continue
                key = (ns, name, int(port["port"]))
                wanted[(ip, int(port["port"]))] = key
                backends[key] = [
                    (address, int(slice_port["port"]))
                    for endpoint_slice in ready.get((ns, name), [])
                    for slice_port in endpoint_slice.get("ports") or []
                    if slice_port.get("name", "") == port.get("name", "")
                    for endpoint in endpoint_slice.get("endpoints") or []
                    if (endpoint.get("conditions") or {}).get("ready", True)
                    for address in endpoint.get("addresses", [])
                ]
        self.backends = backends
        for addr in set(self.listeners) - set(wanted):
            self.listeners.pop(addr).close()
        for ip in {ip for ip, _ in wanted} - self.addresses:
            network.ip("addr", "add", f"{ip}/32", "dev", self.bridge, check=False)
            self.addresses.add(ip)
        for ip in self.addresses - {ip for ip, _ in wanted}:
            network.ip("addr", "del", f"{ip}/32", "dev", self.bridge, check=False)
        self.addresses &= {ip for ip, _ in wanted}
        for (ip, port), key in wanted.items():
            if (ip, port) not in self.listeners:
                try:
                    self.listeners[(ip, port)] = _Listener(ip, port, self, key)
                except OSError as exc:
                    log.warning("service proxy: cannot listen on %s:%d: %s", ip, port, exc)
            else:
                self.listeners[(ip, port)].key = key
