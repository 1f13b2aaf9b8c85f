"""Readiness, liveness and startup probes: httpGet, tcpSocket and exec."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]


def resolve_port(port: int | str, container: JSON) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise ValueError(f"named port {port!r} not declared by the container")


def http_get(probe: JSON, host: str, container: JSON, timeout: float) -> tuple[bool, str]:
    port = resolve_port(probe["port"], container)
    host = probe.get("host") or host
    if probe.get("scheme", "HTTP").upper() == "HTTPS":
        # kubelet does not verify probe certificates either.
        context = ssl._create_unverified_context()
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=context
        )
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {h["name"]: h["value"] for h in probe.get("httpHeaders", [])}
        headers.setdefault("User-Agent", "kube-probe/kubetune")
        conn.request("GET", probe.get("path", "/"), headers=headers)
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return False, f"Get http://{host}:{port}{probe.get('path', '/')}: {exc}"
    finally:
        conn.close()
    return 200 <= status < 400, f"HTTP probe failed with statuscode: {status}"


def tcp_socket(probe: JSON, host: str, container: JSON, timeout: float) -> tuple[bool, str]:
    port = resolve_port(probe["port"], container)
    try:
        with socket.create_connection((probe.get("host") or host, port), timeout=timeout):
            return True, ""
    except OSError as exc:
        return False, f"dial tcp {host}:{port}: {exc}"


@dataclass
class ProbeState:
    """Where one probe of one container stands (kubelet's prober worker, minus the goroutine)."""

    probe: JSON
    started_at: float
    successes: int = 0
    failures: int = 0
    result: bool | None = None
    message: str = ""
    next_at: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.next_at = self.started_at + self.probe.get("initialDelaySeconds", 0)

    @property
    def period(self) -> float:
        return float(self.probe.get("periodSeconds", 10))

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def run(self, host: str, container: JSON, run_exec: Callable[[list[str], float], int]) -> bool | None:
        """Run the probe; return the new result when it crossed a threshold, else None."""
        timeout = float(self.probe.get("timeoutSeconds", 1))
        if "httpGet" in self.probe:
            ok, message = http_get(self.probe["httpGet"], host, container, timeout)
        elif "tcpSocket" in self.probe:
            ok, message = tcp_socket(self.probe["tcpSocket"], host, container, timeout)
        elif "exec" in self.probe:
            try:
                code = run_exec(self.probe["exec"]["command"], timeout)
                ok, message = code == 0, f"command exited with {code}"
            except subprocess.TimeoutExpired:
                ok, message = False, f"command timed out after {timeout}s"
        else:
            ok, message = True, "unsupported probe type treated as success"
        self.next_at = time.monotonic() + self.period
        self.message = "" if ok else message
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.result is not True and self.successes >= self.probe.get("successThreshold", 1):
                self.result = True
                return True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.result is not False and self.failures >= self.probe.get("failureThreshold", 3):
                self.result = False
                return False
        return None
