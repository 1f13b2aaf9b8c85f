"""Full fine-tuning across ranks with FSDP2: two CPU processes under kubetune's torchrun launcher (gloo).

Aspects:
- ``python -m kubetune.worker.distributed`` (torchrun) with two ranks shards a full fine-tune, and a
  SIGTERM to the launcher makes every rank write its shards of one checkpoint and the launcher exit
  with the worker's own code (143, Preempted), not torchrun's 1;
- the sharded checkpoint (a DCP directory, ``state.json`` saying world size 2) refuses to resume in
  one process, with a PlanInvalid that names the world sizes and resources.nodes;
- two ranks resume it: the manifest says ``resumed_from_step`` (the step of the SIGTERM) and the full
  step count, and the published weights are one ordinary model directory;
- the loss curve of two ranks of batch 4 matches one process of batch 4 x 2 accumulation steps (the
  same global batch, the same examples per step) within 2% at every logged step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.worker.conftest import plan_dict, write_plan

pytestmark = pytest.mark.torch

STEPS = 30
#: Relative difference allowed between the two curves: two ranks average their per-rank mean
#: losses, one process takes the mean over all label tokens of the window (the same when the ranks
#: hold the same number of label tokens).
TOLERANCE = 0.02


def _launcher(plan_file: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kubetune.worker.distributed",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "kubetune",
        "train",
        "--plan",
        str(plan_file),
    ]


def _curve(manifest: dict[str, object]) -> dict[int, float]:
    points = manifest["loss_curve"]
    assert isinstance(points, list)
    return {p["step"]: p["loss"] for p in points if p.get("loss") is not None}


@pytest.mark.slow
def test_two_rank_fsdp_checkpoints_resumes_and_matches_one_process(
    tmp_path: Path, tiny_model: Path, task_files: dict[str, Path]
) -> None:
    from kubetune.worker.engine import train
    from kubetune.worker.errors import PlanInvalid
    from kubetune.worker.plan import TrainingPlan

    training = {
        "max_steps": STEPS,
        "batch_size": 4,
        "learning_rate": 2e-3,
        "logging_every_steps": 1,
        "checkpoint_every_steps": 5,
        "packing": False,
    }
    full = {"type": "full"}
    output = tmp_path / "out" / "fsdp"
    plan = plan_dict(tiny_model, task_files["completion"], output, method=full, training=training)
    plan_file = write_plan(tmp_path / "plan.json", plan)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    progress = output.parent / ".fsdp.kubetune" / "progress.json"

    def step() -> int:
        try:
            return int(json.loads(progress.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    first = subprocess.Popen(_launcher(plan_file), env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while step() < 3 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr[-4000:]
    checkpoints = sorted((output.parent / ".fsdp.kubetune" / "checkpoints").iterdir())
    assert checkpoints, stderr[-4000:]
    newest = checkpoints[-1]
    stopped_at = int(newest.name.removeprefix("step-"))
    assert 3 <= stopped_at < STEPS
    assert json.loads((newest / "state.json").read_text())["world_size"] == 2
    assert (newest / "shards" / ".metadata").is_file()
    assert not (newest / "trainable.safetensors").exists()  # no rank ever held the whole model

    with pytest.raises(PlanInvalid, match=r"written by 2 rank\(s\) as FSDP shards and this run has 1"):
        train(TrainingPlan.model_validate(plan))

    second = subprocess.run(_launcher(plan_file), env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    manifest = json.loads((output / "kubetune.json").read_text())
    metrics = manifest["metrics"]
    assert (metrics["world_size"], metrics["steps"], metrics["resumed_from_step"]) == (2, STEPS, stopped_at)
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()

    # One process, the same global batch: 4 sequences x 2 accumulation steps.
    alone_output = tmp_path / "out" / "alone"
    alone = plan_dict(
        tiny_model,
        task_files["completion"],
        alone_output,
        method=full,
        training={**training, "gradient_accumulation_steps": 2},
    )
    single = train(TrainingPlan.model_validate(alone))
    two_ranks, one = _curve(manifest), _curve(single)
    assert sorted(two_ranks) == sorted(one) == list(range(1, STEPS + 1))
    worst = max(abs(two_ranks[s] - one[s]) / one[s] for s in one)
    print(f"FSDP 2 ranks vs 1 process: worst relative loss difference {worst:.5f} over {STEPS} steps")
    assert worst < TOLERANCE, (worst, two_ranks, one)
