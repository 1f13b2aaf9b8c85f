"""Host networking for pods: one Linux bridge per cluster and a network namespace per pod.

The bridge holds the cluster's gateway address; the host reaches every pod directly on that
subnet and pods reach the host (and so the apiserver) at the gateway. Nothing is NATed or
forwarded, so pod traffic never leaves the machine. Everything here needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import fcntl
import ipaddress
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Candidate /16 networks, tried in order; one already present on the host is skipped so two
# clusters (or a cluster and a VPN) never share a subnet.
_CANDIDATE_SECOND_OCTETS = range(200, 250)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _used_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    used: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for line in ip("-o", "-4", "addr", "show").stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            used.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    for line in ip("-4", "route", "show").stdout.splitlines():
        dest = line.split()[0]
        if dest != "default":
            used.append(ipaddress.ip_network(dest, strict=False))
    return used


@contextmanager
def host_lock(lock_dir: Path) -> Iterator[None]:
    """Serialise subnet choice between clusters starting at the same time."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / ".network.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def create_bridge(name: str, lock_dir: Path) -> ipaddress.IPv4Interface:
    """Create bridge ``name`` on a free 10.x.0.0/16 and return its gateway interface address."""
    with host_lock(lock_dir):
        used = _used_networks()
        for octet in _CANDIDATE_SECOND_OCTETS:
            net = ipaddress.ip_network(f"10.{octet}.0.0/16")
            if not any(net.overlaps(u) for u in used):
                break
        else:
            raise RuntimeError("no free 10.x.0.0/16 network for the cluster bridge")
        gateway = ipaddress.IPv4Interface(f"10.{octet}.0.1/16")
        ip("link", "add", name, "type", "bridge")
        ip("addr", "add", str(gateway), "dev", name)
        ip("link", "set", name, "up")
    return gateway


def delete_link(name: str) -> None:
    ip("link", "del", name, check=False)


def create_pod_netns(
    netns: str, host_veth: str, bridge: str, address: ipaddress.IPv4Interface, gateway: str
) -> None:
    """Create ``netns`` with ``eth0`` at ``address`` plugged into ``bridge``."""
    peer = host_veth + "p"
    ip("netns", "add", netns)
    try:
        ip("link", "add", host_veth, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", netns)
        ip("link", "set", host_veth, "master", bridge, "up")
        ip("-n", netns, "link", "set", peer, "name", "eth0")
        ip("-n", netns, "addr", "add", str(address), "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "route", "add", "default", "via", gateway)
    except Exception:
        delete_pod_netns(netns, host_veth)
        raise


def delete_pod_netns(netns: str, host_veth: str) -> None:
    # Deleting the namespace destroys the veth end inside it, and with it the host end.
    ip("netns", "del", netns, check=False)
    delete_link(host_veth)


def list_netns() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines() if line]
