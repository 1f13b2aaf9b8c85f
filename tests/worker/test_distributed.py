"""Distributed training under torchrun: two CPU processes with the gloo backend.

Aspects:
- `torchrun --nproc-per-node 2 -m kubetune train` joins one process group from the torchrun
  environment, trains with DDP and publishes exactly one artifact (rank 0);
- the held-out loss falls and the manifest records world_size 2 and the tokens of both ranks;
- each rank reads a disjoint share of every epoch's batches.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.worker.conftest import plan_dict, write_plan

pytestmark = pytest.mark.torch


@pytest.mark.slow
def test_two_process_gloo_run_publishes_one_artifact(
    tmp_path: Path, tiny_model: Path, task_files: dict[str, Path]
) -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    output = tmp_path / "out" / "ddp"
    plan = plan_dict(tiny_model, task_files["completion"], output, training={"checkpoint_every_steps": 10})
    plan_file = write_plan(tmp_path / "plan.json", plan)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        torchrun,
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "kubetune",
        "train",
        "--plan",
        str(plan_file),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = json.loads((output / "kubetune.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["world_size"] == 2
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.01
    # 20 steps x 2 ranks x 8 sequences: more tokens than one rank alone could have read.
    assert metrics["train_tokens"] > 20 * 8 * 10
    assert result.stderr.count("published") == 1
    assert sorted(p.name for p in output.parent.iterdir()) == [".ddp.kubetune", "ddp", "ddp.termination"]
    summary = json.loads((output.parent / "ddp.termination").read_text())
    assert summary["metrics"]["world_size"] == 2


def test_ranks_read_disjoint_batches() -> None:
    import torch

    from kubetune.worker.data import Example
    from kubetune.worker.engine import Distributed, EpochFeeder
    from kubetune.worker.plan import TrainingPlan

    examples = [Example([i] * (i % 7 + 2), [i] * (i % 7 + 2)) for i in range(64)]
    plan = TrainingPlan.model_validate(
        {
            "model": {"uri": "/m"},
            "dataset": {"uri": "/d.jsonl"},
            "output": {"uri": "/o"},
            "training": {"batch_size": 4, "gradient_accumulation_steps": 2},
        }
    )
    seen = []
    for rank in (0, 1):
        feeder = EpochFeeder(examples, plan, Distributed(rank, 2, rank, torch.device("cpu")))
        assert feeder.steps_per_epoch == 4
        seen.append([e.input_ids[0] for step in range(4) for batch in feeder.window(step) for e in batch])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(64))
