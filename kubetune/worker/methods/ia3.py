"""(IA)^3 (PEFT): learned rescaling vectors on keys, values and the feed-forward input."""

from __future__ import annotations

from typing import Any

from kubetune.worker.methods import BuildContext, TrainingMethod, register
from kubetune.worker.methods.lora import save_peft
from kubetune.worker.methods.targets import ia3_targets
from kubetune.worker.plan import MethodSpec


def build(model: Any, spec: MethodSpec, context: BuildContext) -> Any:
    from peft import IA3Config, TaskType, get_peft_model

    targets, feedforward = ia3_targets(model, spec.ia3.target_modules, spec.ia3.feedforward_modules)
    config = IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=feedforward)
    return get_peft_model(model, config)


METHOD = register(TrainingMethod(name="ia3", build=build, save=save_peft))
