"""The cluster DNS without a cluster: records, the wire format, and what pods are given.

Aspects tested:
- the zone: a ClusterIP Service's name, a headless Service's ready endpoints (all of them with
  ``publishNotReadyAddresses``), ``hostname.subdomain`` records from EndpointSlices' ``hostname``,
  pod-IP names, PTR records; ExternalName Services and unknown names are absent;
- answers for a hand-written query (bytes from RFC 1035's layout, not from the encoder under test):
  A, NODATA for AAAA of an existing name, NXDOMAIN under ``cluster.local`` and for unknown
  reverse names in the cluster network, REFUSED when nothing is forwarded to, FORMERR for garbage,
  TC over UDP when the answer does not fit in 512 bytes;
- glibc's own resolver (``getent``) reaches the server through a resolv.conf the way a pod's
  process does, following the search path and ``ndots:5``, and sees NXDOMAIN as "not found";
- kubelet's resolv.conf per ``dnsPolicy``/``dnsConfig`` and its managed ``/etc/hosts``.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kubetune.localcluster.nodeagent.dns import (
    DNSServer,
    Resolver,
    Zone,
    host_nameservers,
    pod_hosts,
    pod_resolv_conf,
)

JSON = dict[str, Any]


def service(name: str, ns: str = "ns", cluster_ip: str = "None", **spec: Any) -> JSON:
    return {"metadata": {"name": name, "namespace": ns}, "spec": {"clusterIP": cluster_ip, **spec}}


def endpoint_slice(svc: str, *endpoints: JSON, ns: str = "ns") -> JSON:
    return {
        "metadata": {"name": f"{svc}-x", "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": list(endpoints),
    }


def endpoint(ip: str, hostname: str | None = None, ready: bool | None = True) -> JSON:
    ep: JSON = {"addresses": [ip], "conditions": {} if ready is None else {"ready": ready}}
    if hostname:
        ep["hostname"] = hostname
    return ep


SERVICES = [
    service("web", cluster_ip="10.200.128.7"),
    service("train"),  # headless, as an Indexed Job's
    service("peers", publishNotReadyAddresses=True),
    service("ext", type="ExternalName", externalName="example.com"),
]
SLICES = [
    endpoint_slice(
        "train",
        endpoint("10.200.1.5", "train-0"),
        endpoint("10.200.2.5", "train-1", ready=None),  # no condition: ready, per the API
        endpoint("10.200.2.6", "train-2", ready=False),
    ),
    endpoint_slice("peers", endpoint("10.200.1.9", "p-0", ready=False)),
]


def test_zone_records() -> None:
    zone = Zone.build(SERVICES, SLICES)
    assert zone.lookup("web.ns.svc.cluster.local") == ("10.200.128.7",)
    assert zone.lookup("train.ns.svc.cluster.local") == ("10.200.1.5", "10.200.2.5")
    assert zone.lookup("train-0.train.ns.svc.cluster.local") == ("10.200.1.5",)
    assert zone.lookup("train-1.train.ns.svc.cluster.local") == ("10.200.2.5",)
    assert zone.lookup("train-2.train.ns.svc.cluster.local") is None  # not ready
    assert zone.lookup("p-0.peers.ns.svc.cluster.local") == ("10.200.1.9",)  # published anyway
    assert zone.lookup("ext.ns.svc.cluster.local") is None
    assert zone.lookup("web.other.svc.cluster.local") is None
    assert zone.lookup("10-200-3-4.ns.pod.cluster.local") == ("10.200.3.4",)
    assert zone.lookup("nonsense.ns.pod.cluster.local") is None
    assert zone.pointers["10.200.1.5"] == "train-0.train.ns.svc.cluster.local"
    assert zone.pointers["10.200.128.7"] == "web.ns.svc.cluster.local"


def query(name: str, qtype: int = 1, ident: int = 0x1234) -> bytes:
    """A standard query with RD set, laid out by hand from RFC 1035 section 4.1."""
    header = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return header + qname + struct.pack("!HH", qtype, 1)


def decode(reply: bytes) -> tuple[int, int, list[str]]:
    """(rcode, flags, A addresses) of a reply whose answers point back at the question."""
    _, flags, qd, an, _, _ = struct.unpack("!HHHHHH", reply[:12])
    offset = 12
    if qd:
        while reply[offset]:
            offset += reply[offset] + 1
        offset += 5
    addresses = []
    for _ in range(an):
        _, rtype, _, _, length = struct.unpack("!HHHIH", reply[offset : offset + 12])
        offset += 12
        if rtype == 1:
            addresses.append(socket.inet_ntoa(reply[offset : offset + length]))
        offset += length
    return flags & 0xF, flags, addresses


@pytest.fixture
def resolver() -> Resolver:
    r = Resolver(ipaddress.ip_network("10.200.0.0/16"), upstreams=[])
    r.zone = Zone.build(SERVICES, SLICES)
    return r


def test_answers(resolver: Resolver) -> None:
    reply = resolver.answer(query("Train-0.train.ns.svc.cluster.local"))
    assert reply[:2] == b"\x12\x34"
    rcode, flags, addresses = decode(reply)
    assert (rcode, addresses) == (0, ["10.200.1.5"])
    assert flags & 0x8000 and flags & 0x0400  # a response, authoritative
    assert decode(resolver.answer(query("train.ns.svc.cluster.local", qtype=28)))[::2] == (0, [])
    assert decode(resolver.answer(query("nope.ns.svc.cluster.local")))[0] == 3
    assert decode(resolver.answer(query("5.1.200.10.in-addr.arpa", qtype=12)))[0] == 0
    assert decode(resolver.answer(query("99.1.200.10.in-addr.arpa", qtype=12)))[0] == 3
    assert decode(resolver.answer(query("example.org")))[0] == 5  # no upstream: refused
    assert decode(resolver.answer(b"\x00\x01garbage"))[0] == 1


def test_udp_truncates_what_does_not_fit(resolver: Resolver) -> None:
    many = [endpoint(f"10.200.3.{i}") for i in range(1, 60)]
    resolver.zone = Zone.build([service("big")], [endpoint_slice("big", *many)])
    big = query("big.ns.svc.cluster.local")
    _, flags, addresses = decode(resolver.answer(big, limit=512))
    assert flags & 0x0200 and addresses == []
    assert len(decode(resolver.answer(big))[2]) == 59  # over TCP there is no limit


def test_host_nameservers_skip_the_cluster_dns() -> None:
    text = "# comment\nnameserver 10.200.0.1\nnameserver 192.0.2.53\nsearch example\n"
    assert host_nameservers(text, exclude="10.200.0.1") == ["192.0.2.53"]


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for a mount namespace"
)
def test_glibc_resolves_through_the_server(resolver: Resolver, tmp_path: Path) -> None:
    # A loopback address of its own, so port 53 is free whatever else the host runs.
    server = DNSServer(resolver, "127.53.0.1", 53)
    server.start()
    try:
        pod = {"metadata": {"name": "p", "namespace": "ns"}, "spec": {}}
        resolv = tmp_path / "resolv.conf"
        resolv.write_text(pod_resolv_conf(pod, "127.53.0.1", ""))

        def getent(name: str) -> subprocess.CompletedProcess[str]:
            script = f"mount --bind {resolv} /etc/resolv.conf && exec getent ahostsv4 {name}"
            return subprocess.run(
                ["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=30
            )

        # Short names go through the search path, as in a pod.
        found = getent("train-1.train")
        assert found.returncode == 0 and found.stdout.split()[0] == "10.200.2.5", found
        found = getent("web")
        assert found.returncode == 0 and found.stdout.split()[0] == "10.200.128.7", found
        missing = getent("train-2.train")
        assert missing.returncode == 2 and missing.stdout == "", missing  # 2: not found
    finally:
        server.stop()


def test_resolv_conf_follows_dns_policy() -> None:
    host = "nameserver 192.0.2.53\nsearch corp.example\noptions rotate\n"
    pod: JSON = {"metadata": {"name": "p", "namespace": "team"}, "spec": {}}
    assert pod_resolv_conf(pod, "10.200.0.1", host) == (
        "nameserver 10.200.0.1\n"
        "search team.svc.cluster.local svc.cluster.local cluster.local corp.example\n"
        "options ndots:5\n"
    )
    pod["spec"] = {"hostNetwork": True}
    assert pod_resolv_conf(pod, "10.200.0.1", host) == (
        "nameserver 192.0.2.53\nsearch corp.example\noptions rotate\n"
    )
    pod["spec"] = {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"}
    assert pod_resolv_conf(pod, "10.200.0.1", host).startswith("nameserver 10.200.0.1\n")
    pod["spec"] = {
        "dnsPolicy": "None",
        "dnsConfig": {
            "nameservers": ["192.0.2.1"],
            "searches": ["a.example"],
            "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}],
        },
    }
    assert pod_resolv_conf(pod, "10.200.0.1", host) == (
        "nameserver 192.0.2.1\nsearch a.example\noptions ndots:2 edns0\n"
    )
    pod["spec"] = {"dnsConfig": {"options": [{"name": "ndots", "value": "1"}]}}
    assert pod_resolv_conf(pod, "10.200.0.1", "").endswith("options ndots:1\n")


def test_hosts_file_names_the_pod() -> None:
    pod: JSON = {
        "metadata": {"name": "train-0-abcde", "namespace": "ns"},
        "spec": {
            "hostname": "train-0",
            "subdomain": "train",
            "hostAliases": [{"ip": "192.0.2.9", "hostnames": ["a", "b"]}],
        },
    }
    lines = pod_hosts(pod, "10.200.1.5").splitlines()
    assert "10.200.1.5\ttrain-0.train.ns.svc.cluster.local\ttrain-0" in lines
    assert "192.0.2.9\ta\tb" in lines
    assert "127.0.0.1\tlocalhost" in lines
    pod["spec"] = {}
    assert pod_hosts(pod, "10.200.1.6").splitlines()[-1] == "10.200.1.6\ttrain-0-abcde"
