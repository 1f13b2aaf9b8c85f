"""Full fine-tuning: every parameter trains; the artifact is the whole model."""

from __future__ import annotations

from kubetune.api.methods.base import MethodInfo, ServingTraits, register_method

INFO = register_method(
    MethodInfo(
        name="full",
        summary="every weight trains, the artifact is a whole model",
        position=0,
        blocks=(),
        declares={},
        artifact_format="full",
        serving=ServingTraits(shares_base=False, vllm=False, merges=False),
        trainable_parameters=lambda shape, settings: shape.total_parameters,
        added_parameters=lambda shape, settings: 0,
        trains_base=True,
        sharded_across_ranks=True,
    )
)
