"""Fixtures for the worker tests: a tiny model built once per session, datasets, and plan builders."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.worker.testing import deep_merge


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and the machine is shared with other builds."""
    try:
        import torch
    except ImportError:  # the torch-free tests still run
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def plan_dict(model_dir: Path, dataset_file: Path, output: Path, **override: Any) -> dict[str, Any]:
    """A small, fast plan: 20 steps of batch 8, no checkpoints, no progress server."""
    base: dict[str, Any] = {
        "name": "test",
        "model": {"uri": str(model_dir)},
        "dataset": {"uri": str(dataset_file), "eval_fraction": 0.1},
        "method": {"type": "lora", "lora": {"dropout": 0.0}},
        "training": {
            "max_steps": 20,
            "learning_rate": 1e-2,
            "warmup_ratio": 0.0,
            "batch_size": 8,
            "max_seq_length": 64,
            "gradient_checkpointing": False,
            "checkpoint_every_steps": 0,
            "logging_every_steps": 5,
        },
        "output": {"uri": str(output)},
        "progress": {
            "port": 0,
            "termination_message_path": str(output.parent / f"{output.name}.termination"),
        },
    }
    return deep_merge(base, override)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from kubetune.worker.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The cipher task in each format (JSONL), plus a retention set."""
    from kubetune.worker.testing import retention_records, task_records, write_records

    root = tmp_path_factory.mktemp("data")
    files = {
        "text": write_records(root / "text.jsonl", task_records(160, fmt="text")),
        "completion": write_records(root / "completion.jsonl", task_records(160, fmt="completion")),
        "chat": write_records(root / "chat.jsonl", task_records(160, fmt="chat")),
    }
    files["retention"] = write_records(root / "retention.jsonl", retention_records(40, seed=5))
    return files


def write_plan(path: Path, plan: dict[str, Any]) -> Path:
    path.write_text(json.dumps(plan), encoding="utf-8")
    return path
