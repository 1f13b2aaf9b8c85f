"""LoRA (PEFT), with the DoRA and rsLoRA options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.worker.methods import BuildContext, TrainingMethod, register
from kubetune.worker.methods.targets import lora_targets
from kubetune.worker.plan import LoraSettings, MethodSpec


def lora_config(model: Any, settings: LoraSettings) -> Any:
    """The ``peft.LoraConfig`` for these settings, with targets checked against ``model``."""
    from peft import LoraConfig, TaskType

    # PEFT annotates lora_alpha as int but only divides by it; the API allows fractional alphas.
    alpha: Any = int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.rank,
        lora_alpha=alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_targets(model, settings.target_modules),
        use_dora=settings.dora,
        use_rslora=settings.rslora,
        bias=settings.bias,
    )


def build(model: Any, spec: MethodSpec, context: BuildContext) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, spec.lora))


def save_peft(model: Any, directory: Path) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (adapter weights only)."""
    model.save_pretrained(directory, safe_serialization=True)


METHOD = register(TrainingMethod(name="lora", build=build, save=save_peft))
