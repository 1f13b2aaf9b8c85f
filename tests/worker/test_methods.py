"""The (method x format) matrix on the tiny Llama, and the method registry.

Aspects:
- every method (full, lora, qlora, ia3, prefix, adapter) x every format (text, completion, chat) trains:
  the held-out loss falls, and the artifact reloads and changes the base model's output; qlora never
  backpropagates through bitsandbytes' inference-only kernel;
- the artifact is published whole: manifest with method, format, dataset sha256, base config hash,
  metrics (trainable share, peak memory, tokens/s), and the sha256 of every file matches; no staging
  directory is left behind;
- PEFT artifacts hold adapter weights only (far smaller than the full model's);
- file types other than JSONL train too (CSV, Parquet, JSON);
- LoRA options (DoRA, rsLoRA, explicit targets) build; default targets follow the architecture;
- a target module the model lacks fails with TargetModuleNotFound naming it and the real ones;
- the registry knows every method and refuses unknown names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.worker.conftest import plan_dict

pytestmark = [
    pytest.mark.torch,
    # bitsandbytes' inference-only 4-bit kernel has no backward: reaching it in training would drop the
    # gradient through the frozen base silently (it did, on AVX512-BF16 CPUs, before qlora stopped the
    # CPU repacking). Torch only warns, so the warning is made an error here.
    pytest.mark.filterwarnings("error:.*an autograd kernel was not registered:UserWarning"),
]

METHODS = ("full", "lora", "qlora", "ia3", "prefix", "adapter")
FORMATS = ("text", "completion", "chat")
# Small rescaling vectors (ia3) need a larger step than low-rank matrices to move in 20 steps.
LEARNING_RATES = {"full": 3e-3, "ia3": 5e-2}


def _train(plan: dict[str, Any]) -> dict[str, Any]:
    from kubetune.worker.engine import train
    from kubetune.worker.plan import TrainingPlan

    return train(TrainingPlan.model_validate(plan))


def _logits(model: Any, tokenizer: Any) -> Any:
    import torch

    batch = tokenizer(["encode : a b c :", "count : 1 2 3"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.fixture(scope="module")
def base_logits(tiny_model: Path) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return _logits(
        AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_artifact_reloads(
    tmp_path: Path, tiny_model: Path, task_files: dict[str, Path], base_logits: Any, method: str, fmt: str
) -> None:
    from transformers import AutoTokenizer

    from kubetune.worker.artifact import load_trained_model, verify_artifact

    output = tmp_path / "out" / f"{method}-{fmt}"
    plan = plan_dict(
        tiny_model,
        task_files[fmt],
        output,
        method={"type": method},
        training={"learning_rate": LEARNING_RATES.get(method, 1e-2)},
    )
    manifest = _train(plan)
    metrics = manifest["metrics"]

    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.01, metrics
    assert metrics["train_loss"] < metrics["train_loss_first"], metrics
    assert manifest["method"] == method and manifest["dataset"]["format"] == fmt
    assert manifest["format"] == {"full": "full", "adapter": "bottleneck"}.get(method, "peft")
    assert 0 < metrics["trainable_parameters"] <= metrics["total_parameters"]
    assert (metrics["trainable_percent"] == 100.0) == (method == "full")
    assert metrics["peak_memory_bytes"] > 0 and metrics["tokens_per_second"] > 0
    assert len(manifest["dataset"]["sha256"]) == 64 and manifest["base_model"]["config_sha256"]
    assert verify_artifact(output) == []
    assert not list(output.parent.glob(".*.staging"))

    model = load_trained_model(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    change = (_logits(model, tokenizer) - base_logits).abs().max().item()
    assert change > 1e-3, f"{method} artifact does not change the model's output"


def test_peft_artifacts_hold_adapter_weights_only(
    tmp_path: Path, tiny_model: Path, task_files: dict[str, Path]
) -> None:
    sizes = {}
    for method in ("full", "ia3"):
        output = tmp_path / method
        _train(
            plan_dict(
                tiny_model,
                task_files["completion"],
                output,
                method={"type": method},
                training={"max_steps": 2},
            )
        )
        sizes[method] = sum(p.stat().st_size for p in output.glob("*.safetensors"))
    assert sizes["ia3"] * 20 < sizes["full"], sizes


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_other_file_types_train(tmp_path: Path, tiny_model: Path, suffix: str) -> None:
    from kubetune.worker.testing import task_records, write_records

    dataset = write_records(tmp_path / f"train{suffix}", task_records(80, fmt="chat"))
    manifest = _train(plan_dict(tiny_model, dataset, tmp_path / "out", training={"max_steps": 10}))
    assert manifest["dataset"]["format"] == "chat"
    assert manifest["metrics"]["eval_loss"] < manifest["metrics"]["eval_loss_before"]


@pytest.mark.parametrize(
    "lora",
    [{"dora": True}, {"rslora": True}, {"target_modules": ["q_proj", "v_proj"], "rank": 4}],
)
def test_lora_options_build(
    tmp_path: Path, tiny_model: Path, task_files: dict[str, Path], lora: dict[str, Any]
) -> None:
    import json

    output = tmp_path / "out"
    _train(
        plan_dict(
            tiny_model, task_files["completion"], output, method={"lora": lora}, training={"max_steps": 3}
        )
    )
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["use_dora"] == lora.get("dora", False)
    assert config["use_rslora"] == lora.get("rslora", False)
    expected = lora.get(
        "target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert sorted(config["target_modules"]) == sorted(expected)


def test_missing_target_module_is_named(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    from kubetune.worker.errors import TargetModuleNotFound
    from kubetune.worker.methods.targets import ia3_targets, lora_targets

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert lora_targets(model, None)[0] == "q_proj"
    with pytest.raises(TargetModuleNotFound, match=r'"query_key_value" matches no module.*q_proj'):
        lora_targets(model, ["q_proj", "query_key_value"])
    with pytest.raises(TargetModuleNotFound, match='"up_proj" is not one of'):
        ia3_targets(model, ["k_proj", "v_proj"], ["up_proj"])


def test_registry() -> None:
    from kubetune.worker.methods import METHOD_NAMES, get_method

    assert {get_method(name).name for name in METHOD_NAMES} == set(METHODS)
    assert get_method("prefix").gradient_checkpointing is False
    with pytest.raises(KeyError, match="unknown method"):
        get_method("lorra")
