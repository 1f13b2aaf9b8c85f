"""Full fine-tuning: every parameter trains; the artifact is the whole model in safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.worker.methods import BuildContext, TrainingMethod, register
from kubetune.worker.plan import MethodSpec


def build(model: Any, spec: MethodSpec, context: BuildContext) -> Any:
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def save(model: Any, directory: Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)


METHOD = register(TrainingMethod(name="full", build=build, save=save))
