"""The part of kubelet's HTTPS API that ``kubectl logs`` uses: ``/containerLogs``.

The apiserver proxies ``kubectl logs`` to the node's ``daemonEndpoints.kubeletEndpoint``
port at its InternalIP. The server only accepts clients presenting a certificate signed by
the cluster CA (the apiserver's ``--kubelet-client-certificate``): pods share the bridge and
must not read each other's logs. ``exec``, ``attach`` and ``portForward`` are not served.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

_FOLLOW_POLL_S = 0.2


def log_files(pods_dir: Path, namespace: str, pod: str, container: str) -> list[Path]:
    """A container's log files, newest run first, for the newest pod of that name."""
    candidates = sorted(pods_dir.glob(f"{namespace}_{pod}_*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for pod_dir in candidates:
        runs = [p for p in (pod_dir / container).glob("*.log") if p.stem.isdigit()]
        if runs:
            return sorted(runs, key=lambda p: int(p.stem), reverse=True)
    return []


def select(text: bytes, tail_lines: int | None, limit_bytes: int | None) -> bytes:
    if tail_lines is not None:
        lines = text.splitlines(keepends=True)
        text = b"".join(lines[-tail_lines:]) if tail_lines > 0 else b""
    if limit_bytes is not None:
        text = text[:limit_bytes]
    return text


class LogServer:
    def __init__(
        self,
        host: str,
        pods_dir: Path,
        *,
        cert_file: str,
        key_file: str,
        ca_file: str,
        is_running: Callable[[str, str, str], bool],
    ) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        context.load_verify_locations(ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.handle(self)

        self.pods_dir = pods_dir
        self.is_running = is_running
        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port: int = self.httpd.server_address[1]

    def start(self) -> None:
        threading.Thread(target=self.httpd.serve_forever, name="log-server", daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        url = urlparse(request.path)
        parts = url.path.strip("/").split("/")
        if parts == ["healthz"]:
            self._reply(request, 200, b"ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._reply(request, 404, b"only /containerLogs is served by the kubetune node agent\n")
            return
        _, namespace, pod, container = parts
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        files = log_files(self.pods_dir, namespace, pod, container)
        index = 1 if query.get("previous") == "true" else 0
        if len(files) <= index:
            # kubelet's answer, which kubectl shows as is.
            what = "previous terminated container" if index else "container"
            self._reply(request, 400, f'{what} "{container}" in pod "{pod}" not found\n'.encode())
            return
        path = files[index]
        tail = int(query["tailLines"]) if "tailLines" in query else None
        limit = int(query["limitBytes"]) if "limitBytes" in query else None
        data = select(path.read_bytes(), tail, limit)
        if query.get("follow") != "true" or index:
            self._reply(request, 200, data)
            return
        request.send_response(200)
        request.send_header("Content-Type", "text/plain")
        request.end_headers()
        offset = path.stat().st_size
        try:
            request.wfile.write(data)
            request.wfile.flush()
            while True:
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                if chunk:
                    request.wfile.write(chunk)
                    request.wfile.flush()
                elif not self.is_running(namespace, pod, container):
                    return
                else:
                    time.sleep(_FOLLOW_POLL_S)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            return

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, code: int, body: bytes) -> None:
        request.send_response(code)
        request.send_header("Content-Type", "text/plain")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)
