"""The planner's memory, time and cost estimates and the operator's feasibility check, without a cluster.

Aspects:
- memory by part: QLoRA's 4-bit weights with their constants sit far below LoRA's; gradient
  checkpointing lowers activations; DDP doubles gradients (buckets), FSDP divides by the GPUs;
- FLOPs: 6N per token for full fine-tuning, 4N + 6N_t over a frozen base, plus attention; time and
  cost follow the GPU table, whose utilisation and prices are overridable (and bad values refused);
- the feasibility check: full fine-tuning of Llama-3-8B on 24Gi is infeasible with needed vs available
  and what fits; the skip annotation lets it run with its own reason; an unreadable config leaves the
  job runnable and says why; the plan is valid status (the CRD's model) and the Feasible condition
  drives Running to Infeasible without failing the job;
- the GPU type comes from the node selector's product label; quantities parse;
- dataset tokens are counted (4 characters per token without a tokenizer).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import methods
from kubetune.api.v1alpha1 import FineTuneJob, TrainingPlanStatus
from kubetune.operator import planning, status
from kubetune.planner import compute
from kubetune.planner.architecture import model_shape
from kubetune.planner.memory import TrainingSetup, estimate_memory
from kubetune.planner.plan import count_dataset_tokens

CONFIGS = Path(__file__).parent / "configs"


def _shape(name: str) -> Any:
    return model_shape(json.loads((CONFIGS / f"{name}.json").read_text()))


def _job(method: dict[str, Any], **resources: Any) -> FineTuneJob:
    return FineTuneJob.model_validate(
        {
            "metadata": {
                "name": "plan",
                "namespace": "default",
                "annotations": resources.pop("annotations", {}),
            },
            "spec": {
                "model": {"uri": f"file://{CONFIGS}/llama-3-8b.json"},
                "dataset": {"uri": "file:///nonexistent/train.jsonl"},
                "method": method,
                "training": {"batchSize": 4, "maxSeqLength": 2048},
                "resources": {"gpusPerNode": 1, **resources},
                "output": {"uri": "file:///tmp/out"},
            },
        }
    )


def test_memory_parts_move_the_right_way() -> None:
    shape = _shape("llama-3-8b")
    setup = TrainingSetup(batch_size=1, seq_length=1024)
    lora = estimate_memory(shape, "lora", {}, setup)
    qlora = estimate_memory(shape, "qlora", {}, setup)
    full = estimate_memory(shape, "full", {}, setup)
    assert qlora.weights < 0.55 * lora.weights and qlora.gradients == lora.gradients
    assert full.weights == 4 * shape.total_parameters and full.optimizer == 8 * shape.total_parameters
    checkpointed = estimate_memory(
        shape, "lora", {}, TrainingSetup(batch_size=1, seq_length=1024, gradient_checkpointing=True)
    )
    assert checkpointed.activations < lora.activations / 5 and checkpointed.weights == lora.weights
    ddp = estimate_memory(shape, "full", {}, TrainingSetup(batch_size=1, seq_length=1024, gpus=8))
    fsdp = estimate_memory(
        shape, "full", {}, TrainingSetup(batch_size=1, seq_length=1024, gpus=8, sharding="fsdp")
    )
    assert ddp.gradients == 2 * full.gradients and fsdp.optimizer == full.optimizer // 8
    # Prefix tuning cannot checkpoint: asking for it changes nothing.
    prefix = estimate_memory(shape, "prefix", {}, setup)
    assert (
        estimate_memory(
            shape, "prefix", {}, TrainingSetup(batch_size=1, seq_length=1024, gradient_checkpointing=True)
        )
        == prefix
    )


def test_flops_follow_the_stated_formulas() -> None:
    shape = _shape("qwen2.5-0.5b")
    n = compute.compute_parameters(shape)
    assert n == shape.total_parameters  # tied embeddings: the one matrix is the head
    attention = 12 * shape.num_layers * shape.num_attention_heads * shape.head_dim * 512 // 2
    full = compute.training_flops(shape, methods.get("full"), shape.total_parameters, 1000, 512, False)
    assert full == (6 * n + attention) * 1000
    lora = compute.training_flops(shape, methods.get("lora"), 1000, 1000, 512, False)
    assert lora == (4 * n + 6 * 1000 + attention) * 1000
    mixtral = _shape("mixtral-8x7b-v0.1")
    active = compute.compute_parameters(mixtral)
    assert 12.5e9 < active < 13.5e9  # Mixtral's ~12.9B active parameters per token


def test_assumptions_are_overridable_and_checked(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    compute.add_assumption_arguments(parser)
    table = tmp_path / "gpus.json"
    table.write_text(
        json.dumps([{"name": "MI300X", "memoryMiB": 196608, "peakTflops": 1307, "pricePerHour": 4}])
    )
    args = parser.parse_args(["--utilisation", "0.5", "--gpu-price", "H100=2.5", "--gpu-table", str(table)])
    assumptions = compute.assumptions_from(args)
    assert assumptions.utilisation == 0.5 and assumptions.gpu("h100").price_per_hour == 2.5
    assert assumptions.gpu("MI300X").memory_bytes == 192 * 1024**3
    for bad, message in ((["--utilisation", "2"], "utilisation"), (["--gpu-price", "B200"], "GPU=USD")):
        with pytest.raises(ValueError, match=message):
            compute.assumptions_from(parser.parse_args(bad))
    with pytest.raises(ValueError, match="unknown GPU"):
        compute.assumptions_from(parser.parse_args(["--gpu-price", "X1=3"]))


def test_full_fine_tuning_of_an_8b_model_on_24gi_is_infeasible() -> None:
    settings = planning.PlannerSettings()
    job = _job({"type": "full"}, gpuMemory="24Gi")
    assessment = planning.plan_for(job, settings)
    assert not assessment.feasible and assessment.reason == "InsufficientGpuMemory"
    assert "per GPU but 24.0Gi is available" in assessment.message and "qlora with" in assessment.message
    # The engine shards full fine-tuning across ranks, so more GPUs are a way out (unlike for LoRA).
    assert "Sharded by FSDP across 16 GPUs (resources.nodes x gpusPerNode) with gradientCheckpointing" in (
        assessment.message
    )
    lora = planning.plan_for(_job({"type": "lora"}, gpuMemory="24Gi"), settings)
    assert lora.message.endswith("the workers replicate the model (DDP).")
    plan = TrainingPlanStatus.model_validate(assessment.plan).to_dict()
    assert (
        plan["fits"] is False
        and plan["totalParameters"] == 8_030_261_248
        and plan["trainablePercent"] == "100%"
    )
    assert plan["recommendation"] == assessment.message and plan["availableMemory"] == "24.0Gi"

    skipped = planning.plan_for(
        _job({"type": "full"}, gpuMemory="24Gi", annotations={planning.SKIP_ANNOTATION: "true"}), settings
    )
    assert skipped.feasible and skipped.reason == "FeasibilityCheckSkipped"

    fits = planning.plan_for(_job({"type": "qlora"}, gpuMemory="80Gi"), settings)
    assert fits.feasible and fits.reason == "Fits" and fits.plan is not None and fits.plan["fits"]


def test_across_nodes_full_fine_tuning_is_planned_sharded_as_the_engine_runs_it() -> None:
    """Full fine-tuning on 4 nodes x 2 GPUs is sharded by FSDP (the engine's SHARDED_METHODS), so
    each GPU holds 1/8 of the weights, gradients and Adam state; LoRA stays replicated by DDP."""
    from kubetune.worker import distributed

    settings = planning.PlannerSettings()
    assert sorted(distributed.SHARDED_METHODS) == ["full"]
    alone = planning.plan_for(_job({"type": "full"}, gpuMemory="80Gi"), settings)
    spread = planning.plan_for(_job({"type": "full"}, gpuMemory="80Gi", nodes=4, gpusPerNode=2), settings)
    assert alone.plan is not None and spread.plan is not None
    assert not alone.feasible and spread.feasible, spread.message
    lora_alone = planning.plan_for(_job({"type": "lora"}, gpuMemory="80Gi"), settings)
    lora_spread = planning.plan_for(
        _job({"type": "lora"}, gpuMemory="80Gi", nodes=4, gpusPerNode=2), settings
    )
    assert lora_alone.plan is not None and lora_spread.plan is not None
    # DDP keeps every weight on every GPU (and a second copy of the gradients in its buckets).
    assert lora_spread.plan["memoryBreakdown"]["weights"] == lora_alone.plan["memoryBreakdown"]["weights"]
    assert spread.plan["memoryBreakdown"]["weights"] == "4.1Gi"  # 15 GiB of bf16 weights / 8, plus a layer


def test_an_unreadable_config_leaves_the_job_runnable() -> None:
    job = FineTuneJob.model_validate(
        {
            **_job({"type": "lora"}).to_dict(),
            "spec": {**_job({"type": "lora"}).to_dict()["spec"], "model": {"uri": "s3://bucket/model"}},
        }
    )
    assessment = planning.plan_for(job, planning.PlannerSettings())
    assert assessment.feasible and assessment.reason == "ModelConfigUnavailable" and assessment.plan is None
    assert "s3://" in assessment.message


def test_time_and_cost_on_a_gpu_type_from_the_node_selector(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": "x" * 400}) for _ in range(1000)))
    body = _job({"type": "lora"}).to_dict()
    body["spec"]["dataset"]["uri"] = f"file://{data}"
    body["spec"]["podTemplate"] = {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}}
    assessment = planning.plan_for(FineTuneJob.model_validate(body), planning.PlannerSettings())
    plan = assessment.plan or {}
    assert plan["gpuType"] == "A100-80GB" and plan["availableMemory"] == "80.0Gi"
    # 1000 records x 100 tokens, 3 epochs, 5% held out.
    assert plan["trainingTokens"] == int(3 * 0.95 * 100_000)
    assert plan["estimatedHours"] > 0 and plan["estimatedCost"].startswith("$")
    assert count_dataset_tokens(data, 50)[0] == 50_000


def test_gpu_types_and_quantities() -> None:
    settings = planning.PlannerSettings()
    for label, expected in (
        ("NVIDIA-H100-80GB-HBM3", "H100"),
        ("nvidia-l4", "L4"),
        ("nvidia-tesla-t4", "T4"),
    ):
        body = _job({"type": "lora"}).to_dict()
        body["spec"]["podTemplate"] = {"nodeSelector": {"cloud.google.com/gke-accelerator": label}}
        gpu = planning.gpu_type_of(FineTuneJob.model_validate(body), settings)
        assert gpu is not None and gpu.name == expected
    assert planning.quantity_bytes("24Gi") == 24 * 1024**3 and planning.quantity_bytes("80G") == 80 * 10**9


def test_infeasible_holds_the_job_without_failing_it() -> None:
    seen = status.Observed(
        job=None, pods=[], feasibility=(False, "InsufficientGpuMemory", "needs more"), plan={"fits": False}
    )
    conditions = {c["type"]: c for c in status.desired_conditions(False, seen)}
    assert conditions["Feasible"]["status"] == "False" and conditions["Running"]["reason"] == "Infeasible"
    assert conditions["Failed"]["status"] == "False"
    assert status.phase_of(list(conditions.values())) == "Pending"


def test_config_reads_fail_with_the_reason(tmp_path: Path) -> None:
    from kubetune.planner import job

    offline = planning.PlannerSettings(hub_downloads=False)
    with pytest.raises(planning.ModelConfigUnavailable, match=r"config\.json"):
        planning.read_model_config(f"file://{tmp_path}/missing", None, offline)
    with pytest.raises(planning.ModelConfigUnavailable, match="kubetune-no-such/model"):
        planning.read_model_config("hf://kubetune-no-such/model", None, offline)
    # A failure is remembered for a while: the file appearing now is seen only after the TTL.
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "config.json").write_text((CONFIGS / "qwen2.5-0.5b.json").read_text())
    with pytest.raises(planning.ModelConfigUnavailable):
        planning.read_model_config(f"file://{tmp_path}/missing", None, offline)
    job._failed_reads.clear()
    assert planning.read_model_config(f"file://{tmp_path}/missing", None, offline)["model_type"] == "qwen2"
