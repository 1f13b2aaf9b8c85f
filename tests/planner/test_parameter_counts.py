"""Exact parameter counts from config.json, checked against PEFT on full-size meta-device models.

Aspects:
- total parameters equal ``sum(p.numel())`` of the transformers model built from each shipped config
  (Llama-3-8B, Mistral-7B, Qwen2.5-0.5B, Qwen3-0.6B, Gemma-2B, Phi-3-mini, Mixtral-8x7B,
  Qwen1.5-MoE-A2.7B), instantiated on the meta device: no memory, no download;
- trainable parameters equal PEFT's ``get_nb_trainable_parameters()`` after the repo's own method
  builders (``kubetune.worker.methods``), for every method and option (rank, target modules, DoRA,
  bias, prefix projection and virtual tokens, bottleneck size and placement); PEFT's "all params"
  equal the base total plus what the method adds;
- the torch-free half (no meta model) runs without torch: counts for all configs, and a bad config
  gets an error naming the missing field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import methods
from kubetune.planner.architecture import ConfigError, model_shape
from kubetune.worker.plan import MethodSpec

CONFIGS = Path(__file__).parent / "configs"

#: Published totals (model cards / the safetensors index), as a check on the shipped configs too.
PUBLISHED_TOTALS = {
    "llama-3-8b": 8_030_261_248,
    "mistral-7b-v0.1": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen3-0.6b": 596_049_920,
    "gemma-2b": 2_506_172_416,
    "phi-3-mini-4k": 3_821_079_552,
    "mixtral-8x7b-v0.1": 46_702_792_704,
    "qwen1.5-moe-a2.7b": 14_315_784_192,
}

#: Every method with its default settings, for every config.
DEFAULTS: list[dict[str, Any]] = [{"type": name} for name in methods.METHOD_NAMES]

#: The options, on the configs named in FULL_MATRIX.
OPTIONS: list[dict[str, Any]] = [
    {"type": "lora", "lora": {"rank": 8, "target_modules": ["q_proj", "v_proj"]}},
    {"type": "lora", "lora": {"rank": 4, "dora": True}},
    {"type": "lora", "lora": {"rank": 16, "bias": "all"}},
    {"type": "lora", "lora": {"rank": 16, "bias": "lora_only", "target_modules": ["q_proj", "o_proj"]}},
    {"type": "qlora", "lora": {"rank": 64, "target_modules": ["down_proj"]}},
    {"type": "ia3", "ia3": {"target_modules": ["q_proj", "up_proj"], "feedforward_modules": ["up_proj"]}},
    {"type": "prefix", "prefix": {"virtual_tokens": 8, "projection": True}},
    {"type": "prefix", "prefix": {"virtual_tokens": 50}},
    {"type": "adapter", "adapter": {"bottleneck_size": 16, "placement": "pfeiffer"}},
    {"type": "adapter", "adapter": {"bottleneck_size": 256, "placement": "houlsby"}},
]
FULL_MATRIX = ("llama-3-8b", "qwen2.5-0.5b", "qwen1.5-moe-a2.7b", "mixtral-8x7b-v0.1")


def _config(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CONFIGS / f"{name}.json").read_text())
    return data


def _planned(config: dict[str, Any], method: dict[str, Any]) -> tuple[int, int, int]:
    spec = MethodSpec.model_validate(method)
    info = methods.get(spec.type)
    settings = {block: getattr(spec, block) for block in info.blocks}
    shape = model_shape(config)
    return (
        shape.total_parameters,
        info.trainable_parameters(shape, settings),
        info.added_parameters(shape, settings),
    )


def _cases() -> list[Any]:
    cases = []
    for name in PUBLISHED_TOTALS:
        if name == "mixtral-8x7b-v0.1":
            # Its experts are fused tensors, not linear layers: down_proj names nothing to adapt.
            options = [o for o in OPTIONS if "down_proj" not in str(o) and "up_proj" not in str(o)]
        else:
            options = OPTIONS
        for method in DEFAULTS + (options if name in FULL_MATRIX else []):
            cases.append(pytest.param(name, method, id=f"{name}-{json.dumps(method, separators=(',', ':'))}"))
    return cases


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_totals_match_the_published_counts(name: str) -> None:
    assert model_shape(_config(name)).total_parameters == PUBLISHED_TOTALS[name]


@pytest.mark.torch
@pytest.mark.parametrize(("name", "method"), _cases())
def test_counts_equal_peft_on_the_meta_device(name: str, method: dict[str, Any]) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kubetune.worker.methods import BuildContext, get_method

    config = _config(name)
    total, trainable, added = _planned(config, method)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
        assert sum(p.numel() for p in model.parameters()) == total
        spec = MethodSpec.model_validate(method)
        context = BuildContext(gradient_checkpointing=False, device="cpu", compute_dtype=torch.bfloat16)
        built = get_method(spec.type).build(model, spec, context)
    if hasattr(built, "get_nb_trainable_parameters"):
        peft_trainable, peft_all = built.get_nb_trainable_parameters()
    else:
        peft_trainable = sum(p.numel() for p in built.parameters() if p.requires_grad)
        peft_all = sum(p.numel() for p in built.parameters())
    assert (trainable, total + added) == (peft_trainable, peft_all)


def test_a_bad_config_names_the_missing_field() -> None:
    config = _config("llama-3-8b")
    del config["num_hidden_layers"]
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        model_shape(config)
    with pytest.raises(ConfigError, match=r"model_type 'bert'.*known: gemma"):
        model_shape({**config, "model_type": "bert"})
    with pytest.raises(ConfigError, match="model_type"):
        model_shape({"hidden_size": 8})
    with pytest.raises(ConfigError, match="'vocab_size' must be a non-negative integer"):
        model_shape({**_config("llama-3-8b"), "vocab_size": "many"})


def test_a_target_the_model_lacks_is_named() -> None:
    with pytest.raises(ValueError, match=r'lora\.targetModules: "c_attn" matches no linear layer of llama'):
        _planned(_config("llama-3-8b"), {"type": "lora", "lora": {"target_modules": ["c_attn"]}})
