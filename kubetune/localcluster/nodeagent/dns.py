"""Cluster DNS: what CoreDNS answers in a real cluster, from the apiserver's Services and
EndpointSlices, plus the ``/etc/resolv.conf`` and ``/etc/hosts`` kubelet writes into each pod.

Records (``cluster.local``, TTL 5 s as CoreDNS):

* ``<svc>.<ns>.svc.cluster.local``: the ClusterIP; for a headless Service (``clusterIP:
  None``) the addresses of its ready endpoints, or of all of them with
  ``publishNotReadyAddresses``.
* ``<hostname>.<svc>.<ns>.svc.cluster.local``: an endpoint of a headless Service that has a
  ``hostname`` (the endpoint-slice controller sets it for a pod whose ``spec.subdomain`` is the
  Service's name and which has ``spec.hostname``, as an Indexed Job's pods do).
* ``a-b-c-d.<ns>.pod.cluster.local``: ``a.b.c.d`` (CoreDNS's ``pods insecure``).
* PTR for every address above; other names under ``cluster.local`` or inside the cluster
  network's reverse zone: NXDOMAIN. A name that exists but has no record of the asked type
  (AAAA, SRV, ...) gets an empty NOERROR answer, so resolvers do not give up on its A record.

Everything else is forwarded to the host's nameservers (``REFUSED`` when there are none):
pods that run as host processes keep resolving what the host resolves.

The wire format is the small subset of RFC 1035 this needs (one question, A and PTR
answers, truncation over UDP with TCP as the fallback), written on the standard library.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]
log = logging.getLogger("kubetune.nodeagent")

DOMAIN = "cluster.local"
TTL_S = 5
_UDP_LIMIT = 512
_FORWARD_TIMEOUT_S = 2.0

TYPE_A, TYPE_PTR, TYPE_AAAA = 1, 12, 28
CLASS_IN = 1
RCODE_OK, RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN, RCODE_REFUSED = 0, 1, 2, 3, 5


# -- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Zone:
    """Every name the cluster DNS answers for, as of one list of Services and EndpointSlices."""

    addresses: dict[str, tuple[str, ...]] = field(default_factory=dict)  # fqdn -> A records
    pointers: dict[str, str] = field(default_factory=dict)  # address -> fqdn

    @classmethod
    def build(cls, services: Iterable[JSON], slices: Iterable[JSON], domain: str = DOMAIN) -> Zone:
        by_service: dict[tuple[str, str], list[JSON]] = {}
        for endpoint_slice in slices:
            meta = endpoint_slice["metadata"]
            owner = (meta.get("labels") or {}).get("kubernetes.io/service-name")
            if owner:
                by_service.setdefault((meta["namespace"], owner), []).append(endpoint_slice)
        addresses: dict[str, list[str]] = {}
        pointers: dict[str, str] = {}

        def add(name: str, address: str) -> None:
            found = addresses.setdefault(name.lower(), [])
            if address not in found:
                found.append(address)
            pointers.setdefault(address, name.lower())

        for service in services:
            meta, spec = service["metadata"], service.get("spec") or {}
            if spec.get("type") == "ExternalName":
                continue  # a CNAME in a real cluster; not served here
            base = f"{meta['name']}.{meta['namespace']}.svc.{domain}"
            cluster_ip = spec.get("clusterIP")
            if cluster_ip and cluster_ip != "None":
                add(base, cluster_ip)
                continue
            publish_all = bool(spec.get("publishNotReadyAddresses"))
            for endpoint_slice in by_service.get((meta["namespace"], meta["name"]), []):
                if endpoint_slice.get("addressType", "IPv4") != "IPv4":
                    continue
                for endpoint in endpoint_slice.get("endpoints") or []:
                    ready = (endpoint.get("conditions") or {}).get("ready")
                    if not (publish_all or ready is None or ready):
                        continue
                    hostname = endpoint.get("hostname")
                    for address in endpoint.get("addresses") or []:
                        if hostname:
                            # The pod's own name comes first in its PTR record, as in CoreDNS.
                            add(f"{hostname}.{base}", address)
                        add(base, address)
        return cls({k: tuple(v) for k, v in addresses.items()}, pointers)

    def lookup(self, name: str, domain: str = DOMAIN) -> tuple[str, ...] | None:
        """The A records of ``name`` (lower case, no trailing dot); None when it does not exist."""
        if name in self.addresses:
            return self.addresses[name]
        # a-b-c-d.<ns>.pod.<domain>
        labels = name.split(".")
        if name.endswith(f".pod.{domain}") and len(labels) == 3 + len(domain.split(".")):
            with contextlib.suppress(ValueError):
                return (str(ipaddress.IPv4Address(labels[0].replace("-", "."))),)
        return None


def reverse_address(name: str) -> str | None:
    """``4.3.2.1.in-addr.arpa`` -> ``1.2.3.4``; None for anything else."""
    labels = name.split(".")
    if len(labels) != 6 or labels[4:] != ["in-addr", "arpa"]:
        return None
    try:
        return str(ipaddress.IPv4Address(".".join(reversed(labels[:4]))))
    except ValueError:
        return None


# -- wire format -------------------------------------------------------------------------


class FormatError(ValueError):
    pass


@dataclass(frozen=True)
class Question:
    id: int
    flags: int
    name: str  # lower case, no trailing dot
    qtype: int
    qclass: int
    raw: bytes  # the question section as received, echoed in the answer


def parse_query(data: bytes) -> Question:
    if len(data) < 12:
        raise FormatError("short header")
    ident, flags, qdcount = struct.unpack("!HHH", data[:6])
    if qdcount != 1:
        raise FormatError(f"{qdcount} questions")
    labels, offset = [], 12
    while True:
        if offset >= len(data):
            raise FormatError("truncated name")
        length = data[offset]
        offset += 1
        if length == 0:
            break
        if length & 0xC0:
            raise FormatError("compressed name in a question")
        labels.append(data[offset : offset + length].decode("ascii", errors="replace"))
        offset += length
    if offset + 4 > len(data):
        raise FormatError("truncated question")
    qtype, qclass = struct.unpack("!HH", data[offset : offset + 4])
    return Question(ident, flags, ".".join(labels).lower(), qtype, qclass, data[12 : offset + 4])


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        raw = label.encode("ascii")
        if not 0 < len(raw) < 64:
            raise FormatError(f"bad label in {name!r}")
        out += bytes([len(raw)]) + raw
    return out + b"\0"


def build_response(
    question: Question, rcode: int, answers: Sequence[tuple[int, bytes]] = (), *, limit: int | None = None
) -> bytes:
    """A response to ``question`` with ``answers`` as (type, rdata) for the question's name.

    Over ``limit`` bytes the answers are dropped and TC is set, so the client asks over TCP.
    """
    opcode_rd = question.flags & 0x7900  # opcode and RD, copied
    flags = 0x8000 | opcode_rd | 0x0080 | rcode  # QR, RA
    if rcode in (RCODE_OK, RCODE_NXDOMAIN):
        flags |= 0x0400  # AA: the zone is ours
    records = b"".join(
        struct.pack("!HHHIH", 0xC00C, rtype, CLASS_IN, TTL_S, len(rdata)) + rdata for rtype, rdata in answers
    )
    count = len(answers)
    if limit is not None and 12 + len(question.raw) + len(records) > limit:
        flags |= 0x0200
        records, count = b"", 0
    header = struct.pack("!HHHHHH", question.id, flags, 1, count, 0, 0)
    return header + question.raw + records


def error_response(data: bytes, rcode: int) -> bytes:
    """FORMERR-style answer to something that did not parse: the header echoed, no sections."""
    ident, flags = struct.unpack("!HH", data[:4]) if len(data) >= 4 else (0, 0)
    return struct.pack("!HHHHHH", ident, 0x8000 | (flags & 0x7900) | rcode, 0, 0, 0, 0)


# -- the server ------------------------------------------------------------------------------


class Resolver:
    """Answers one query at a time from the current :class:`Zone` (swapped in by the agent)."""

    def __init__(
        self,
        cluster_network: ipaddress.IPv4Network,
        upstreams: list[str],
        domain: str = DOMAIN,
    ) -> None:
        self.zone = Zone()
        self.cluster_network = cluster_network
        self.upstreams = upstreams
        self.domain = domain

    def answer(self, data: bytes, *, limit: int | None = None) -> bytes:
        try:
            question = parse_query(data)
        except FormatError:
            return error_response(data, RCODE_FORMERR)
        if question.flags & 0x7800 or question.qclass != CLASS_IN:
            return build_response(question, RCODE_REFUSED)  # only standard IN queries
        name = question.name
        if name == self.domain or name.endswith("." + self.domain):
            found = self.zone.lookup(name, self.domain)
            if found is None:
                return build_response(question, RCODE_NXDOMAIN)
            answers = (
                [(TYPE_A, socket.inet_aton(address)) for address in found] if question.qtype == TYPE_A else []
            )
            return build_response(question, RCODE_OK, answers, limit=limit)
        address = reverse_address(name)
        if address is not None and ipaddress.IPv4Address(address) in self.cluster_network:
            target = self.zone.pointers.get(address)
            if target is None:
                return build_response(question, RCODE_NXDOMAIN)
            answers = [(TYPE_PTR, encode_name(target))] if question.qtype == TYPE_PTR else []
            return build_response(question, RCODE_OK, answers, limit=limit)
        return self.forward(question, data)

    def forward(self, question: Question, data: bytes) -> bytes:
        if not self.upstreams:
            return build_response(question, RCODE_REFUSED)
        for upstream in self.upstreams:
            with socket.socket(
                socket.AF_INET6 if ":" in upstream else socket.AF_INET, socket.SOCK_DGRAM
            ) as sock:
                sock.settimeout(_FORWARD_TIMEOUT_S)
                try:
                    sock.sendto(data, (upstream, 53))
                    while True:
                        reply, _ = sock.recvfrom(65535)
                        if reply[:2] == data[:2]:
                            return reply
                except OSError:
                    continue
        return build_response(question, RCODE_SERVFAIL)


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(self.server.resolver.answer(data, limit=_UDP_LIMIT), self.client_address)


class _TCPHandler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(10)
        with contextlib.suppress(OSError):
            while header := _recv_exact(conn, 2):
                data = _recv_exact(conn, struct.unpack("!H", header)[0])
                if data is None:
                    return
                reply = self.server.resolver.answer(data)
                conn.sendall(struct.pack("!H", len(reply)) + reply)


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class _UDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], resolver: Resolver) -> None:
        self.resolver = resolver
        super().__init__(address, _UDPHandler)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], resolver: Resolver) -> None:
        self.resolver = resolver
        super().__init__(address, _TCPHandler)


class DNSServer:
    """UDP and TCP on ``address:port``, answering through ``resolver``."""

    def __init__(self, resolver: Resolver, address: str, port: int = 53) -> None:
        self.resolver = resolver
        self.udp = _UDPServer((address, port), resolver)
        # Port 0 picks a free UDP port; TCP takes the same number.
        self.port = self.udp.server_address[1]
        self.tcp = _TCPServer((address, self.port), resolver)

    def start(self) -> None:
        for server in (self.udp, self.tcp):
            threading.Thread(
                target=server.serve_forever, name=f"dns-{server.socket_type}", daemon=True
            ).start()

    def stop(self) -> None:
        for server in (self.udp, self.tcp):
            server.shutdown()
            server.server_close()


def host_nameservers(resolv_conf: str, exclude: str) -> list[str]:
    """The ``nameserver`` lines of the host's resolv.conf, less the cluster DNS itself."""
    servers = []
    for line in resolv_conf.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver" and fields[1] != exclude:
            servers.append(fields[1])
    return servers


# -- what a pod sees -------------------------------------------------------------------------


def pod_resolv_conf(pod: JSON, nameserver: str, host_resolv_conf: str, domain: str = DOMAIN) -> str:
    """kubelet's ``/etc/resolv.conf`` for ``pod``: its ``dnsPolicy`` and ``dnsConfig``."""
    spec = pod["spec"]
    namespace = pod["metadata"]["namespace"]
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    host_servers: list[str] = []
    host_search: list[str] = []
    host_options: list[str] = []
    for line in host_resolv_conf.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith(("#", ";")):
            continue
        if fields[0] == "nameserver" and len(fields) > 1:
            host_servers.append(fields[1])
        elif fields[0] in ("search", "domain"):
            host_search = fields[1:]
        elif fields[0] == "options":
            host_options += fields[1:]
    if policy == "ClusterFirst" and spec.get("hostNetwork"):
        policy = "Default"  # kubelet: ClusterFirst on the host network falls back to the node's
    if policy in ("ClusterFirst", "ClusterFirstWithHostNet"):
        servers = [nameserver]
        search = [f"{namespace}.svc.{domain}", f"svc.{domain}", domain, *host_search]
        options = ["ndots:5"]
    elif policy == "Default":
        servers, search, options = host_servers, host_search, host_options
    else:  # None: only what dnsConfig says
        servers, search, options = [], [], []
    config = spec.get("dnsConfig") or {}
    servers += config.get("nameservers") or []
    search += config.get("searches") or []
    merged: dict[str, str] = {}
    for option in options:
        key, _, value = option.partition(":")
        merged[key] = option
    for option in config.get("options") or []:
        value = option.get("value")
        merged[option["name"]] = option["name"] + (f":{value}" if value is not None else "")
    lines = [f"nameserver {server}" for server in dict.fromkeys(servers)]
    if search:
        lines.append("search " + " ".join(dict.fromkeys(search)))
    if merged:
        lines.append("options " + " ".join(merged.values()))
    return "\n".join(lines) + "\n"


def pod_hosts(pod: JSON, pod_ip: str, domain: str = DOMAIN) -> str:
    """kubelet's managed ``/etc/hosts``: localhost, and the pod's own name (with its FQDN under
    a ``subdomain``) and ``hostAliases``. Services are found through DNS, not here."""
    spec = pod["spec"]
    hostname = (spec.get("hostname") or pod["metadata"]["name"])[:63]
    names = [hostname]
    if spec.get("subdomain"):
        names.insert(0, f"{hostname}.{spec['subdomain']}.{pod['metadata']['namespace']}.svc.{domain}")
    lines = [
        "# Kubernetes-managed hosts file (kubetune node agent).",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "\t".join([pod_ip, *names]),
    ]
    for alias in spec.get("hostAliases") or []:
        lines.append("\t".join([alias["ip"], *(alias.get("hostnames") or [])]))
    return "\n".join(lines) + "\n"
