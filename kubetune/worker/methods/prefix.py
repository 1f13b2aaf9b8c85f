"""Prefix tuning (PEFT): trainable key/value prefixes in every attention layer.

Its registry entry (``kubetune.api.methods.prefix``) turns gradient checkpointing off: the prefix
arrives as a past-key-value cache, which the checkpointed layers do not recompute correctly. For the
same reason packed records cannot be masked from each other (PEFT drops ``position_ids`` for
prompt-learning methods), so packing falls back to one causal mask per block.
"""

from __future__ import annotations

from typing import Any

from kubetune.worker.methods import BuildContext, TrainingMethod, register
from kubetune.worker.methods.lora import save_peft
from kubetune.worker.plan import MethodSpec


def build(model: Any, spec: MethodSpec, context: BuildContext) -> Any:
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    config = PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=spec.prefix.virtual_tokens,
        prefix_projection=spec.prefix.projection,
    )
    return get_peft_model(model, config)


METHOD = register(
    TrainingMethod(
        name="prefix",
        build=build,
        save=save_peft,
    )
)
