"""Plumbing shared by the benchmarks: the tiny model and data, running ``kubetune train``, writing results.

Every benchmark runs ``kubetune train`` as a subprocess, exactly as a worker pod does, and reads the numbers
the engine reports in its ``kubetune.json`` manifest. Subprocesses get the same thread count
(``OMP_NUM_THREADS``), so runs compared in one benchmark see the same CPU budget.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from kubetune.worker.testing import deep_merge

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "kubetune-benchmarks"


def thread_env(threads: int) -> dict[str, str]:
    """The environment for a subprocess limited to ``threads`` intra-op threads."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    # Progress bars and hub lookups are noise in a timing run; the model is local anyway.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def environment(threads: int) -> dict[str, Any]:
    """What the numbers were measured on; stored beside them."""
    import peft
    import torch
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    cores_available: int | None
    try:
        cores_available = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores_available = os.cpu_count()
    return {
        "measured_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": commit,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_available": cores_available,
        "threads_per_run": threads,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


ModelSize = Literal["tiny", "small"]


def prepare_model(work_dir: Path, *, size: ModelSize, pretrain_steps: int, seed: int) -> Path:
    """The tiny Llama of ``kubetune.worker.testing``, built once per (size, pretraining, seed), reused."""
    from kubetune.worker.testing import make_tiny_model

    directory = work_dir / f"model-{size}-pre{pretrain_steps}-seed{seed}"
    marker = directory / ".complete"
    if not marker.is_file():
        shutil.rmtree(directory, ignore_errors=True)
        make_tiny_model(directory, size=size, seed=seed, pretrain_steps=pretrain_steps)
        marker.write_text("")
    return directory


def plan_for(
    *,
    model_dir: Path,
    train_file: Path,
    output: Path,
    method: Mapping[str, Any],
    training: Mapping[str, Any],
    dataset: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A TrainingPlan document for a benchmark run: no checkpoints, no progress server, quiet logging."""
    plan: dict[str, Any] = {
        "name": "benchmark",
        "model": {"uri": str(model_dir)},
        "dataset": deep_merge({"uri": str(train_file)}, dataset or {}),
        "method": dict(method),
        "training": deep_merge(
            {
                "gradient_checkpointing": False,
                "checkpoint_every_steps": 0,
                "precision": "auto",
                "seed": 0,
            },
            training,
        ),
        "output": {"uri": str(output), "work_dir": str(output.parent / f".{output.name}.work")},
        "progress": {
            "port": 0,
            "termination_message_path": str(output.parent / f"{output.name}.termination"),
        },
    }
    # Validated here so a typo fails before a subprocess is started.
    from kubetune.worker.plan import TrainingPlan

    TrainingPlan.model_validate(plan)
    return plan


@dataclass(frozen=True)
class KubetuneRun:
    """One ``kubetune train`` subprocess: its manifest and the wall time of the whole process (seconds)."""

    manifest: dict[str, Any]
    process_seconds: float
    output: Path

    @property
    def metrics(self) -> dict[str, Any]:
        metrics: dict[str, Any] = self.manifest["metrics"]
        return metrics


class BenchmarkError(RuntimeError):
    """A benchmark subprocess failed; the message carries the tail of its stderr, ``reason`` one line."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message.strip().splitlines()[-1]


def run_kubetune(plan: Mapping[str, Any], *, threads: int, timeout_s: float = 1800) -> KubetuneRun:
    """Run ``python -m kubetune train --plan FILE`` on a fresh output directory and read its manifest."""
    from kubetune.worker.artifact import read_manifest

    output = Path(plan["output"]["uri"])
    shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(output.parent / f".{output.name}.work", ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    plan_file = output.parent / f"{output.name}.plan.json"
    plan_file.write_text(json.dumps(plan, indent=2), encoding="utf-8")
    command = [sys.executable, "-m", "kubetune", "train", "--plan", str(plan_file), "--log-level", "WARNING"]
    started = time.monotonic()
    result = subprocess.run(
        command, env=thread_env(threads), capture_output=True, text=True, timeout=timeout_s, check=False
    )
    elapsed = time.monotonic() - started
    manifest = read_manifest(output)
    if result.returncode != 0 or manifest is None:
        # The worker's one-line termination message is the reason a user would see in the pod status.
        termination = Path(plan["progress"]["termination_message_path"])
        reason = termination.read_text(encoding="utf-8").strip() if termination.is_file() else ""
        raise BenchmarkError(
            f"kubetune train ({plan['method'].get('type')}) exited {result.returncode}:\n"
            f"{result.stderr[-3000:]}",
            reason=f"exit {result.returncode}: {reason}" if reason else "",
        )
    return KubetuneRun(manifest=manifest, process_seconds=elapsed, output=output)


def run_python_module(module: str, args: Sequence[str], *, threads: int, timeout_s: float = 1800) -> float:
    """Run ``python -m module args...`` with the benchmark thread budget; returns its wall time (s)."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        env=thread_env(threads),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0:
        raise BenchmarkError(f"python -m {module} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return time.monotonic() - started


def weight_bytes(manifest: Mapping[str, Any]) -> int:
    """Bytes of the artifact's ``*.safetensors`` files: the checkpoint proper, no tokenizer or logs."""
    files: Mapping[str, Mapping[str, Any]] = manifest.get("files", {})
    return sum(int(entry["size"]) for name, entry in files.items() if name.endswith(".safetensors"))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: significant digits for floats, thousands separators for ints, '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 10**digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def mib(value: float | int | None) -> float | None:
    return None if value is None else value / (1 << 20)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, document: Mapping[str, Any], markdown: str, results_dir: Path) -> list[Path]:
    """Write ``<name>.json`` and ``<name>.md`` into ``results_dir``; returns both paths."""
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{name}.json"
    md_path = results_dir / f"{name}.md"
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    md_path.write_text(markdown, encoding="utf-8")
    return [json_path, md_path]
