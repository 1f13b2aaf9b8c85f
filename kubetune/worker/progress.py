"""Live progress for the operator: an HTTP endpoint and an atomically rewritten JSON file (rank 0 only).

``GET /progress`` returns the current :class:`~kubetune.worker.plan.ProgressReport` as JSON,
``GET /metrics`` the same numbers in the Prometheus text format (``kubetune_train_*``), and
``GET /healthz`` ``ok``. The file is replaced with write + rename, so a reader never sees half a
document. Standard library only: the server thread must not depend on the training stack.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kubetune.worker.plan import ProgressReport

logger = logging.getLogger(__name__)

_GAUGES = {
    "step": "Optimizer steps done.",
    "total_steps": "Optimizer steps planned.",
    "epoch": "Epochs done (fractional).",
    "loss": "Mean training loss over the last logging window (nats/token).",
    "eval_loss": "Latest evaluation loss (nats/token).",
    "learning_rate": "Current learning rate.",
    "tokens_per_second": "Real (non-padding) training tokens per second, all ranks.",
    "eta_seconds": "Estimated seconds to the end of training.",
    "world_size": "Training processes.",
}


def prometheus_text(report: ProgressReport) -> str:
    """Render a report as Prometheus exposition text."""
    lines: list[str] = []
    for field, help_text in _GAUGES.items():
        value = getattr(report, field)
        if value is None:
            continue
        name = f"kubetune_train_{field}"
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {float(value)}"]
    lines += [
        "# HELP kubetune_train_phase Current phase (1 for the active one).",
        "# TYPE kubetune_train_phase gauge",
    ]
    lines.append(f'kubetune_train_phase{{phase="{report.phase}"}} 1')
    return "\n".join(lines) + "\n"


class ProgressReporter:
    """Holds the latest report and publishes it. Inactive (all no-ops) on ranks other than 0."""

    def __init__(self, *, file: Path | None, port: int, host: str = "0.0.0.0", active: bool = True) -> None:
        self.active = active
        self.file = file
        self._report = ProgressReport()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        if active and port:
            self._server = self._serve(host, port)

    @property
    def report(self) -> ProgressReport:
        with self._lock:
            return self._report

    @property
    def port(self) -> int | None:
        """The port the server listens on, or ``None`` when it is off."""
        return self._server.server_address[1] if self._server else None

    def update(self, **fields: Any) -> ProgressReport:
        """Merge ``fields`` into the report, stamp it, and rewrite the file."""
        if not self.active:
            return self._report
        with self._lock:
            merged = self._report.model_dump() | fields
            merged["updated_at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self._report = ProgressReport.model_validate(merged)
            report = self._report
        if self.file is not None:
            try:
                self.file.parent.mkdir(parents=True, exist_ok=True)
                temporary = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
                temporary.write_text(report.model_dump_json(), encoding="utf-8")
                os.replace(temporary, self.file)
            except OSError as exc:  # progress must never fail the training run
                logger.warning("cannot write progress file %s: %s", self.file, exc)
        return report

    def _serve(self, host: str, port: int) -> ThreadingHTTPServer | None:
        reporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/progress":
                    body, kind = reporter.report.model_dump_json().encode(), "application/json"
                elif path == "/metrics":
                    body, kind = prometheus_text(reporter.report).encode(), "text/plain; version=0.0.4"
                elif path == "/healthz":
                    body, kind = b"ok", "text/plain"
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # scrapes would flood the log
                pass

        try:
            server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:  # a taken port must not stop training; the file still works
            logger.warning("progress server not started on %s:%s: %s", host, port, exc)
            return None
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="kubetune-progress", daemon=True).start()
        logger.info("progress on http://%s:%s/progress and /metrics", host, server.server_address[1])
        return server

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def read_progress_file(path: Path) -> ProgressReport | None:
    """The report in a progress file, or ``None`` if there is none yet."""
    try:
        return ProgressReport.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None
