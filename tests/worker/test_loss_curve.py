"""The loss curve the worker records in its manifest (``loss_curve``), read by ``kubetune compare``.

Aspects:
- points merge per step, and past the limit older points thin out while the first, the last and
  every eval point stay (pure, no torch);
- a real run records the eval loss before training at step 0, the training loss at each logging
  step and the final eval loss at the last step, in step order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune.worker.artifact import record_loss_point
from tests.worker.conftest import plan_dict


def test_points_merge_per_step_and_thin_past_the_limit() -> None:
    curve: list[dict[str, Any]] = []
    record_loss_point(curve, 0, eval_loss=3.0)
    record_loss_point(curve, 0)  # nothing to record
    record_loss_point(curve, 5, loss=2.0)
    record_loss_point(curve, 5, eval_loss=1.9)
    assert curve == [{"step": 0, "eval_loss": 3.0}, {"step": 5, "loss": 2.0, "eval_loss": 1.9}]

    for step in range(6, 40):
        record_loss_point(curve, step, loss=1.0 / step, limit=10)
    assert len(curve) <= 10
    steps = [p["step"] for p in curve]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 39
    assert {"step": 5, "loss": 2.0, "eval_loss": 1.9} in curve


@pytest.mark.torch
def test_a_run_records_its_curve_in_the_manifest(
    tmp_path: Path, tiny_model: Path, task_files: dict[str, Path]
) -> None:
    from kubetune.worker.engine import train
    from kubetune.worker.plan import TrainingPlan

    plan = plan_dict(tiny_model, task_files["completion"], tmp_path / "out", training={"max_steps": 10})
    manifest = train(TrainingPlan.model_validate(plan))
    curve = manifest["loss_curve"]
    metrics = manifest["metrics"]
    assert curve[0] == {"step": 0, "eval_loss": metrics["eval_loss_before"]}
    assert [p["step"] for p in curve] == [0, 1, 5, 10]  # logging every 5 steps, and the first step
    assert curve[-1]["eval_loss"] == metrics["eval_loss"] and curve[-1]["loss"] == metrics["train_loss"]
    assert curve[1]["loss"] == metrics["train_loss_first"]
