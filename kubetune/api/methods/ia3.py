"""(IA)^3 (PEFT): learned rescaling vectors on keys, values and the feed-forward input."""

from __future__ import annotations

from typing import ClassVar, cast

from pydantic import Field

from kubetune.api.methods.base import MethodInfo, ModelShape, ServingTraits, Settings, register_method
from kubetune.api.methods.lora import ModuleName
from kubetune.api.schema import ApiModel, Rule

#: model_type -> (targets, the feed-forward subset), following the IA3 paper: keys, values, FFN input.
DEFAULT_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    **{
        arch: (("k_proj", "v_proj", "down_proj"), ("down_proj",))
        for arch in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
        )
    },
    "phi3": (("qkv_proj", "down_proj"), ("down_proj",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "gpt_neox": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "phi": (("k_proj", "v_proj", "fc2"), ("fc2",)),
    "opt": (("k_proj", "v_proj", "fc2"), ("fc2",)),
}


def default_targets(model_type: str, present: list[str]) -> tuple[list[str], list[str]]:
    """Default targets and feed-forward subset; names the model lacks are dropped (see lora)."""
    targets, feedforward = DEFAULT_TARGETS.get(model_type, ((), ()))
    kept = [t for t in targets if t.rsplit(".", 1)[-1] in present]
    if not kept:
        return list(present), []
    return kept, [f for f in feedforward if f in kept]


class IA3Settings(ApiModel):
    """IA3 settings (method.type ia3)."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.feedforwardModules) || "
            "(has(self.targetModules) && self.feedforwardModules.all(m, m in self.targetModules))",
            message="ia3.feedforwardModules must be a subset of ia3.targetModules",
            field_path=".feedforwardModules",
            check=lambda c: (
                c.feedforward_modules is None
                or (c.target_modules is not None and set(c.feedforward_modules) <= set(c.target_modules))
            ),
        ),
    )

    target_modules: list[ModuleName] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="targetModules that get learned scaling vectors. Defaults per architecture "
        "(keys, values and the MLP's down projection).",
    )
    feedforward_modules: list[ModuleName] | None = Field(
        default=None,
        max_length=64,
        description="feedforwardModules among targetModules whose input (not output) is scaled.",
    )


def resolved_targets(shape: ModelShape, settings: IA3Settings) -> tuple[list[str], list[str]]:
    if settings.target_modules:
        return list(settings.target_modules), list(settings.feedforward_modules or [])
    targets, feedforward = default_targets(shape.model_type, shape.linear_names())
    if settings.feedforward_modules is not None:
        feedforward = list(settings.feedforward_modules)
    return targets, feedforward


def trainable_parameters(shape: ModelShape, settings: Settings) -> int:
    """One scale per output feature, or per input feature for feed-forward layers."""
    ia3 = cast(IA3Settings, settings["ia3"])
    targets, feedforward = resolved_targets(shape, ia3)
    count = 0
    for lin in shape.targets(targets, "ia3.targetModules"):
        is_ff = any(lin.matches(name) for name in feedforward)
        count += lin.count * (lin.in_features if is_ff else lin.out_features)
    return count


INFO = register_method(
    MethodInfo(
        name="ia3",
        summary="learned scaling vectors on keys, values and the MLP, with PEFT",
        position=30,
        blocks=("ia3",),
        declares={"ia3": IA3Settings},
        artifact_format="peft",
        serving=ServingTraits(shares_base=True, vllm=False, merges=True),
        trainable_parameters=trainable_parameters,
        added_parameters=trainable_parameters,
    )
)
