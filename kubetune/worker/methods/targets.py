"""Default target modules per architecture, and checking that targets exist in the model.

Names are module-name suffixes, as PEFT matches them: ``q_proj`` matches ``model.layers.0.self_attn.q_proj``.
LoRA defaults to every attention and MLP projection (the QLoRA paper's finding that adapting all linear
layers is what closes the gap to full fine-tuning); unknown architectures fall back to every linear
layer except the output head.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.methods import ia3 as ia3_method
from kubetune.api.methods import lora as lora_method
from kubetune.worker.errors import TargetModuleNotFound


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
    return lora_method.default_targets(_model_type(model), linear_module_suffixes(model))


def ia3_targets(
    model: Any, requested: list[str] | None, feedforward: list[str] | None
) -> tuple[list[str], list[str]]:
    """IA3 targets and their feed-forward subset, requested (validated) or defaulted per architecture."""
    if requested:
        validate_targets(model, requested, "ia3.target_modules")
        targets = list(requested)
        ff = list(feedforward) if feedforward is not None else []
    else:
        targets, default_ff = ia3_method.default_targets(_model_type(model), linear_module_suffixes(model))
        ff = list(feedforward) if feedforward is not None else default_ff
    stray = [m for m in ff if m not in targets]
    if stray:
        raise TargetModuleNotFound(
            f'ia3.feedforward_modules: "{stray[0]}" is not one of ia3.target_modules ({", ".join(targets)})'
        )
    return targets, ff
