"""A small JSON client for the local cluster's apiserver, used by the node agent.

The agent handles pods as plain dicts and patches status with merge patches, the way
kubelet does; the generated ``kubernetes`` models would cost CPU on every watch event and
lose unknown fields. Only client-certificate credentials are supported: the agent only ever
talks to a cluster this package started.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import urllib3

JSON = dict[str, Any]


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Credentials:
    server: str
    ca_file: str
    cert_file: str
    key_file: str


class KubeAPI:
    def __init__(self, creds: Credentials, timeout: float = 30.0) -> None:
        self.server = creds.server.rstrip("/")
        context = ssl.create_default_context(cafile=creds.ca_file)
        context.load_cert_chain(creds.cert_file, creds.key_file)
        self._http = urllib3.PoolManager(ssl_context=context, maxsize=16, retries=False)
        self._timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> JSON:
        url = self.server + path + ("?" + urlencode(params) if params else "")
        data = None if body is None else json.dumps(body).encode()
        resp = self._http.request(
            method, url, body=data, headers={"Content-Type": content_type, "Accept": "application/json"},
            timeout=self._timeout,
        )  # fmt: skip
        text = resp.data.decode(errors="replace")
        if resp.status >= 400:
            raise ApiError(resp.status, text)
        result: JSON = json.loads(text) if text else {}
        return result

    def get(self, path: str, **params: Any) -> JSON:
        return self.request("GET", path, params=params or None)

    def create(self, path: str, body: JSON) -> JSON:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: JSON) -> JSON:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def delete(self, path: str, body: JSON | None = None) -> JSON:
        return self.request("DELETE", path, body)

    def watch(self, path: str, resource_version: str, timeout_s: int = 300, **params: Any) -> Iterator[JSON]:
        """Yield watch events until the server ends the watch (after about ``timeout_s``)."""
        query = {
            **params,
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        resp = self._http.request(
            "GET", f"{self.server}{path}?{urlencode(query)}", preload_content=False,
            timeout=urllib3.Timeout(connect=self._timeout, read=timeout_s + 30),
        )  # fmt: skip
        try:
            if resp.status >= 400:
                raise ApiError(resp.status, resp.read().decode(errors="replace"))
            buffer = b""
            for chunk in resp.stream(64 * 1024):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        finally:
            resp.release_conn()


def wake_on_changes(api: KubeAPI, path: str, wake: threading.Event, stopping: threading.Event) -> None:
    """Set ``wake`` whenever something under the collection ``path`` changes, until ``stopping``.

    For loops that recompute from a fresh list anyway: a watch is cheaper than polling the
    apiserver several times a second, and reacts sooner.
    """
    while not stopping.is_set():
        try:
            version = api.get(path, limit=1)["metadata"]["resourceVersion"]
            wake.set()
            for event in api.watch(path, version, timeout_s=60):
                if event["type"] == "ERROR":
                    break
                if event["type"] != "BOOKMARK":
                    wake.set()
                if stopping.is_set():
                    return
        except Exception:
            stopping.wait(1.0)


def resync_loop(
    api: KubeAPI,
    paths: tuple[str, ...],
    sync: Callable[[], None],
    stopping: threading.Event,
    *,
    name: str,
    resync_s: float = 10.0,
) -> None:
    """Run ``sync`` whenever something under ``paths`` changes, and at least every ``resync_s``
    seconds, until ``stopping``. A failing pass is logged and retried on the next wake-up."""
    changed = threading.Event()
    for path in paths:
        threading.Thread(target=wake_on_changes, args=(api, path, changed, stopping), daemon=True).start()
    while not stopping.is_set():
        changed.wait(resync_s)
        changed.clear()
        try:
            sync()
        except Exception as exc:
            logging.getLogger("kubetune.localcluster").warning("%s: %s", name, exc)
