"""Default target modules per architecture, and checking that targets exist in the model.

Names are module-name suffixes, as PEFT matches them: ``q_proj`` matches ``model.layers.0.self_attn.q_proj``.
LoRA defaults to every attention and MLP projection (the QLoRA paper's finding that adapting all linear
layers is what closes the gap to full fine-tuning); unknown architectures fall back to every linear
layer except the output head.
"""

from __future__ import annotations

from typing import Any

from kubetune.worker.errors import TargetModuleNotFound

_LLAMA_STYLE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: model_type -> LoRA targets.
LORA_TARGETS: dict[str, list[str]] = {
    **{arch: _LLAMA_STYLE for arch in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2")},
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}

#: model_type -> (IA3 targets, the feed-forward subset), following the IA3 paper: keys, values, FFN.
IA3_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    **{
        arch: (["k_proj", "v_proj", "down_proj"], ["down_proj"])
        for arch in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2")
    },
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "phi": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "opt": (["k_proj", "v_proj", "fc2"], ["fc2"]),
}


def _model_type(model: Any) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def linear_module_suffixes(model: Any) -> list[str]:
    """Distinct last name components of the model's linear layers (lm_head excluded), in model order."""
    import torch

    names: dict[str, None] = {}
    for name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit")
        if is_linear and not name.endswith("lm_head"):
            names.setdefault(name.rsplit(".", 1)[-1], None)
    return list(names)


def validate_targets(model: Any, targets: list[str], option: str) -> None:
    """Raise :class:`TargetModuleNotFound` naming the first target that matches no module."""
    module_names = [name for name, _ in model.named_modules()]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in module_names):
            available = ", ".join(linear_module_suffixes(model)) or "none"
            raise TargetModuleNotFound(
                f'{option}: "{target}" matches no module of {type(model).__name__} '
                f"(its linear layers: {available})"
            )


def lora_targets(model: Any, requested: list[str] | None) -> list[str]:
    """The requested targets (validated) or the architecture's default."""
    if requested:
        validate_targets(model, requested, "lora.target_modules")
        return list(requested)
    default = LORA_TARGETS.get(_model_type(model))
    if default:
        validate_targets(model, default, "default lora.target_modules")
        return list(default)
    return linear_module_suffixes(model)


def ia3_targets(
    model: Any, requested: list[str] | None, feedforward: list[str] | None
) -> tuple[list[str], list[str]]:
    """IA3 targets and their feed-forward subset, requested (validated) or defaulted per architecture."""
    if requested:
        validate_targets(model, requested, "ia3.target_modules")
        targets = list(requested)
        ff = list(feedforward) if feedforward is not None else []
    else:
        default_targets, default_ff = IA3_TARGETS.get(_model_type(model), (linear_module_suffixes(model), []))
        validate_targets(model, default_targets, "default ia3.target_modules")
        targets = list(default_targets)
        ff = list(feedforward) if feedforward is not None else list(default_ff)
    stray = [m for m in ff if m not in targets]
    if stray:
        raise TargetModuleNotFound(
            f'ia3.feedforward_modules: "{stray[0]}" is not one of ia3.target_modules ({", ".join(targets)})'
        )
    return targets, ff
