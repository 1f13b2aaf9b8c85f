"""Prefix tuning (PEFT): trainable key/value prefixes in every attention layer."""

from __future__ import annotations

from typing import cast

from pydantic import Field

from kubetune.api.methods.base import MethodInfo, ModelShape, ServingTraits, Settings, register_method
from kubetune.api.schema import ApiModel


class PrefixSettings(ApiModel):
    """Prefix tuning settings (method.type prefix)."""

    virtual_tokens: int = Field(
        default=20, ge=1, le=512, description="virtualTokens is the number of trained prefix positions."
    )
    projection: bool = Field(
        default=False,
        description="projection reparameterises the prefix through an MLP during training.",
    )


def token_dim(shape: ModelShape) -> int:
    """Width of one layer's key (or value) prefix: PEFT sizes it by the key/value heads (GQA)."""
    head_dim = shape.config_head_dim or shape.hidden_size // shape.num_attention_heads
    return head_dim * shape.num_key_value_heads


def trainable_parameters(shape: ModelShape, settings: Settings) -> int:
    """An embedding of virtualTokens x (layers x 2 x token_dim), or with projection a smaller
    embedding followed by a two-layer MLP (hidden width token_dim) that produces it."""
    prefix = cast(PrefixSettings, settings["prefix"])
    width = token_dim(shape)
    out = shape.num_layers * 2 * width
    if not prefix.projection:
        return prefix.virtual_tokens * out
    return prefix.virtual_tokens * width + (width * width + width) + (width * out + out)


def activation_elements(shape: ModelShape, settings: Settings) -> int:
    """Attention sees virtualTokens more keys and values; per token that is small and ignored."""
    return 0


INFO = register_method(
    MethodInfo(
        name="prefix",
        summary="trained key/value prefixes in every attention layer, with PEFT",
        position=40,
        blocks=("prefix",),
        declares={"prefix": PrefixSettings},
        artifact_format="peft",
        serving=ServingTraits(shares_base=True, vllm=False, merges=False),
        trainable_parameters=trainable_parameters,
        added_parameters=trainable_parameters,
        # The prefix arrives as a past-key-value cache, which checkpointed layers do not recompute
        # correctly; and PEFT drops position_ids for prompt learning, so packed records share a mask.
        gradient_checkpointing=False,
        packed_attention=False,
        multi_node=False,
    )
)
