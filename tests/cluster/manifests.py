"""Small manifest builders shared by the cluster tests (plain dicts, as kubectl would send)."""

from __future__ import annotations

from typing import Any

JSON = dict[str, Any]


def python_container(name: str, code: str, **extra: Any) -> JSON:
    """A container running ``python -c code``; the image is recorded, never pulled."""
    return {"name": name, "image": "python:3.11-slim", "command": ["python", "-c", code], **extra}


def pod(name: str, *containers: JSON, restart_policy: str = "Never", **spec: Any) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": restart_policy, "containers": list(containers), **spec},
    }


def job(name: str, container: JSON, *, backoff_limit: int = 0, restart_policy: str = "Never") -> JSON:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {"spec": {"restartPolicy": restart_policy, "containers": [container]}},
        },
    }


def deployment(name: str, replicas: int, container: JSON, **pod_spec: Any) -> JSON:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container], **pod_spec}},
        },
    }


# An HTTP server answering with its pod name; used where pods must be reachable.
HTTP_SERVER = """
import http.server, os
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = os.environ.get("POD_NAME", "?").encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Handler).serve_forever()
"""
