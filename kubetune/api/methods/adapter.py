"""Bottleneck adapters (Houlsby / Pfeiffer), kubetune's own module (``kubetune.worker.bottleneck``)."""

from __future__ import annotations

from typing import Literal, cast

from pydantic import Field

from kubetune.api.methods.base import MethodInfo, ModelShape, ServingTraits, Settings, register_method
from kubetune.api.schema import ApiModel

#: Adapters per decoder layer for each placement.
SITES = {"houlsby": 2, "pfeiffer": 1}


class BottleneckSettings(ApiModel):
    """Bottleneck adapter settings (method.type adapter)."""

    bottleneck_size: int = Field(
        default=64, ge=1, le=16384, description="bottleneckSize is the adapters' hidden width."
    )
    placement: Literal["houlsby", "pfeiffer"] = Field(
        default="houlsby",
        description="placement: houlsby (after attention and after the MLP of every layer) or pfeiffer "
        "(after the MLP only, about half the parameters).",
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout inside the adapters.")


def trainable_parameters(shape: ModelShape, settings: Settings) -> int:
    """Per adapter: down (hidden x b + b) and up (b x hidden + hidden) projections."""
    adapter = cast(BottleneckSettings, settings["adapter"])
    hidden, size = shape.hidden_size, adapter.bottleneck_size
    per_adapter = 2 * hidden * size + size + hidden
    return shape.num_layers * SITES[adapter.placement] * per_adapter


def activation_elements(shape: ModelShape, settings: Settings) -> int:
    """Per adapter and token: its input, the bottleneck before and after the activation, and the
    output cast (the adapter computes in fp32)."""
    adapter = cast(BottleneckSettings, settings["adapter"])
    size = adapter.bottleneck_size
    per_site = shape.hidden_size + 2 * size + (size + size // 4 if adapter.dropout > 0 else 0)
    return SITES[adapter.placement] * per_site


INFO = register_method(
    MethodInfo(
        name="adapter",
        summary="bottleneck adapters after attention and MLP, kubetune's own",
        position=50,
        blocks=("adapter",),
        declares={"adapter": BottleneckSettings},
        artifact_format="bottleneck",
        serving=ServingTraits(shares_base=True, vllm=False, merges=False),
        trainable_parameters=trainable_parameters,
        added_parameters=trainable_parameters,
        activation_elements=activation_elements,
    )
)
