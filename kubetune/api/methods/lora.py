"""LoRA (PEFT), with the DoRA, rsLoRA and bias options: low-rank updates on chosen linear layers."""

from __future__ import annotations

from typing import Annotated, Literal, cast

from pydantic import Field

from kubetune.api.methods.base import MethodInfo, ModelShape, ServingTraits, Settings, register_method
from kubetune.api.schema import ApiModel

# A module name or suffix as PEFT matches them (q_proj, mlp.down_proj, c_attn).
ModuleName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.*-]+$")]

#: Architectures whose decoder layers name their projections as Llama does.
LLAMA_FAMILY = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2")
_LLAMA_FAMILY = LLAMA_FAMILY
_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: model_type -> default LoRA targets: every attention and MLP projection (the QLoRA paper's finding
#: that adapting all linear layers is what closes the gap to full fine-tuning). Names a model lacks
#: are dropped (Mixtral's experts are fused tensors, not linear layers); unknown architectures get
#: every linear layer of their decoder layers.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **{
        arch: _LLAMA_STYLE
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
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}


def default_targets(model_type: str, present: list[str]) -> list[str]:
    """The default targets for a model whose decoder layers have linear layers named ``present``."""
    wanted = [name for name in DEFAULT_TARGETS.get(model_type, ()) if name in present]
    return wanted or list(present)


class LoraSettings(ApiModel):
    """LoRA settings (method.type lora or qlora)."""

    rank: int = Field(default=16, ge=1, le=1024, description="rank (r) of the low-rank update matrices.")
    alpha: float = Field(
        default=32,
        gt=0,
        le=4096,
        description="alpha scales the update by alpha/rank (alpha/sqrt(rank) with rslora).",
    )
    dropout: float = Field(default=0.05, ge=0, lt=1, description="dropout applied to the LoRA input.")
    target_modules: list[ModuleName] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="targetModules names the modules (by suffix, e.g. q_proj) that get adapters. "
        "Defaults to every attention and MLP projection the architecture has (q/k/v/o, gate/up/down "
        "for Llama, Qwen, Mistral, Gemma; c_attn, c_proj, c_fc for GPT-2), else every linear layer "
        "of the decoder layers. Names missing from the model fail the job with reason "
        "TargetModuleNotFound.",
    )
    dora: bool = Field(default=False, description="dora enables weight-decomposed LoRA (DoRA).")
    rslora: bool = Field(default=False, description="rslora enables rank-stabilised scaling.")
    bias: Literal["none", "all", "lora_only"] = Field(
        default="none",
        description="bias also trains biases: none, all (every bias of the model) or lora_only (the "
        "biases of the adapted layers). Trained biases change the base model, so the adapter can no "
        "longer be switched off cleanly.",
    )


def lora_targets(shape: ModelShape, settings: LoraSettings) -> list[str]:
    if settings.target_modules:
        return list(settings.target_modules)
    return default_targets(shape.model_type, shape.linear_names())


def lora_parameters(shape: ModelShape, settings: Settings) -> int:
    """A (r x in) and B (out x r) per adapted layer, DoRA's magnitude (out) and trained biases."""
    lora = cast(LoraSettings, settings["lora"])
    targets = shape.targets(lora_targets(shape, lora), "lora.targetModules")
    count = sum(lin.count * lora.rank * (lin.in_features + lin.out_features) for lin in targets)
    if lora.dora:
        count += sum(lin.count * lin.out_features for lin in targets)
    return count


def trainable_parameters(shape: ModelShape, settings: Settings) -> int:
    lora = cast(LoraSettings, settings["lora"])
    count = lora_parameters(shape, settings)
    if lora.bias == "all":
        count += shape.bias_parameters
    elif lora.bias == "lora_only":
        targets = shape.targets(lora_targets(shape, lora), "lora.targetModules")
        count += sum(lin.bias_parameters for lin in targets)
    return count


def activation_elements(shape: ModelShape, settings: Settings) -> int:
    """Per token and decoder layer: A's output (r) for B's backward and, with dropout, the dropped input."""
    lora = cast(LoraSettings, settings["lora"])
    targets = [lin for lin in shape.targets(lora_targets(shape, lora), "lora.targetModules") if lin.in_layers]
    per_layer = sum(lin.count // shape.num_layers * lora.rank for lin in targets)
    if lora.dropout > 0:
        # One dropped copy per distinct input (q, k and v share theirs), plus its mask (1 byte = 1/4).
        inputs = {(lin.path.rsplit(".", 1)[0], lin.in_features) for lin in targets}
        per_layer += sum(width + width // 4 for _, width in inputs)
    if lora.dora:
        per_layer += sum(lin.count // shape.num_layers * lin.out_features for lin in targets)
    return per_layer


INFO = register_method(
    MethodInfo(
        name="lora",
        summary="low-rank updates on chosen linear layers, with PEFT",
        position=10,
        blocks=("lora",),
        declares={"lora": LoraSettings},
        artifact_format="peft",
        serving=ServingTraits(shares_base=True, vllm=True, merges=True),
        trainable_parameters=trainable_parameters,
        added_parameters=lora_parameters,
        activation_elements=activation_elements,
    )
)
