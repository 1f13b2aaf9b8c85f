"""Training options beyond the method matrix.

Aspects:
- packing: every micro-batch is full blocks of max_seq_length real tokens (no padding), with gradient
  accumulation, and the model still learns; records packed into one block do not attend to each other
  (each record's logits equal those it gets alone);
- gradient checkpointing trains for full, lora and qlora (prefix opts out);
- bf16 autocast on CPU trains;
- qlora trains on a model whose layer widths are not multiples of 32 (bitsandbytes' CPU repacking);
- the forgetting measure: on a base pretrained on the retention distribution, retention loss starts low
  and full fine-tuning on another task raises it (retention_delta > 0), as reported in the manifest;
- periodic evaluation and TensorBoard logs land in the artifact;
- CPU thread sizing follows the CPU budget and the ranks per node, and respects OMP_NUM_THREADS.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.worker.conftest import plan_dict

pytestmark = pytest.mark.torch


def _train(plan: dict[str, Any]) -> dict[str, Any]:
    from kubetune.worker.engine import train
    from kubetune.worker.plan import TrainingPlan

    return train(TrainingPlan.model_validate(plan))


def test_packing_feeds_full_blocks(tmp_path: Path, tiny_model: Path, task_files: dict[str, Path]) -> None:
    steps, batch, accumulation, length = 6, 2, 2, 32
    manifest = _train(
        plan_dict(
            tiny_model,
            task_files["text"],
            tmp_path / "out",
            training={
                "max_steps": steps,
                "packing": True,
                "batch_size": batch,
                "gradient_accumulation_steps": accumulation,
                "max_seq_length": length,
            },
        )
    )
    metrics = manifest["metrics"]
    assert metrics["train_tokens"] == steps * batch * accumulation * length
    assert metrics["eval_loss"] < metrics["eval_loss_before"]


def test_packed_records_do_not_attend_to_each_other(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.worker import data
    from kubetune.worker.engine import collate

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    records = [data.Example([2, 30, 31, 32, 33, 3], [0] * 6), data.Example([2, 40, 41, 3], [0] * 4)]
    [block] = data.pack_examples(records, 10, seed=0, epoch=0)
    batch = collate([block], 0, torch.device("cpu"))
    assert batch.position_ids is not None
    starts = [i for i, p in enumerate(block.position_ids or []) if p == 0]
    assert len(starts) == 2
    with torch.no_grad():
        # As in training (the engine turns caches off): a cache would hide the packing from the mask.
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
        one_mask = model(input_ids=batch.input_ids).logits[0]
        second = starts[1]
        alone = model(input_ids=torch.tensor([block.input_ids[second:]])).logits[0]
    assert torch.allclose(packed[second:], alone, atol=1e-5)
    # Without the position ids the block is one causal sequence and the second record sees the first.
    assert not torch.allclose(one_mask[second:], alone, atol=1e-3)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_gradient_checkpointing_trains(
    tmp_path: Path, tiny_model: Path, task_files: dict[str, Path], method: str
) -> None:
    plan = plan_dict(
        tiny_model,
        task_files["completion"],
        tmp_path / "out",
        method={"type": method},
        training={"gradient_checkpointing": True, "max_steps": 10, "learning_rate": 3e-3},
    )
    metrics = _train(plan)["metrics"]
    assert metrics["eval_loss"] < metrics["eval_loss_before"]


def test_bf16_on_cpu_trains(tmp_path: Path, tiny_model: Path, task_files: dict[str, Path]) -> None:
    plan = plan_dict(tiny_model, task_files["completion"], tmp_path / "out", training={"precision": "bf16"})
    metrics = _train(plan)["metrics"]
    assert metrics["precision"] == "bf16"
    assert metrics["eval_loss"] < metrics["eval_loss_before"]


def test_qlora_with_odd_layer_widths(tmp_path: Path, task_files: dict[str, Path]) -> None:
    from kubetune.worker.testing import make_tiny_model

    odd = make_tiny_model(tmp_path / "odd", config_overrides={"intermediate_size": 120})
    plan = plan_dict(odd, task_files["completion"], tmp_path / "out", method={"type": "qlora"})
    metrics = _train(plan)["metrics"]
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.01


def test_forgetting_is_measured(tmp_path: Path, task_files: dict[str, Path]) -> None:
    from kubetune.worker.testing import make_tiny_model

    knows_counting = make_tiny_model(tmp_path / "pretrained", pretrain_steps=150)
    plan = plan_dict(
        knows_counting,
        task_files["completion"],
        tmp_path / "out",
        dataset={"retention_uri": str(task_files["retention"])},
        method={"type": "full"},
        training={"learning_rate": 1e-2, "max_steps": 30},
    )
    manifest = _train(plan)
    metrics = manifest["metrics"]
    # Chance level over the vocabulary is ln(67) = 4.2 nats; the pretrained base is far below it.
    assert metrics["retention_loss_before"] < 2.5
    assert metrics["retention_delta"] == pytest.approx(
        metrics["retention_loss_after"] - metrics["retention_loss_before"]
    )
    assert metrics["retention_delta"] > 0.1
    assert manifest["dataset"]["retention_sha256"]


def test_periodic_eval_and_tensorboard_logs(
    tmp_path: Path, tiny_model: Path, task_files: dict[str, Path]
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "out"
    _train(plan_dict(tiny_model, task_files["completion"], output, training={"eval_every_steps": 5}))
    events = list((output / "logs").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("eval/loss")] == [5, 10, 15, 20]
    assert accumulator.Scalars("train/loss")[-1].step == 20


def test_thread_sizing(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from kubetune.worker import engine

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(engine, "cpu_budget", lambda: 8)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert engine.configure_threads(local_world_size=2) == 4
        assert engine.configure_threads(local_world_size=16) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert engine.configure_threads(local_world_size=1) == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 1),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "100000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 1),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cpu_budget_reads_the_quota_of_cgroup_v2_and_v1(
    tmp_path: Path, files: dict[str, str], expected: int | None
) -> None:
    """A pod's CPU limit caps the threads on both cgroup versions (this CI host is on v1)."""
    from kubetune.worker import engine

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    unlimited = len(os.sched_getaffinity(0))
    assert engine.cpu_budget(tmp_path) == (min(unlimited, expected) if expected else unlimited)
