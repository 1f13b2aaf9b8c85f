"""Bottleneck adapters (Houlsby / Pfeiffer), kubetune's own module :mod:`kubetune.worker.bottleneck`.

PEFT has no bottleneck adapters, and the ``adapters`` library pins transformers 4, which would hold the
whole project back; a small module of our own, saved in a documented format and served by our runtime,
costs less than that pin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.worker.methods import BuildContext, TrainingMethod, register
from kubetune.worker.plan import MethodSpec


def build(model: Any, spec: MethodSpec, context: BuildContext) -> Any:
    from kubetune.worker.bottleneck import BottleneckConfig, add_bottleneck_adapters

    settings = spec.adapter
    config = BottleneckConfig(
        bottleneck_size=settings.bottleneck_size, placement=settings.placement, dropout=settings.dropout
    )
    return add_bottleneck_adapters(model, config)


def save(model: Any, directory: Path) -> None:
    from kubetune.worker.bottleneck import save_bottleneck_adapter

    save_bottleneck_adapter(model, directory)


METHOD = register(TrainingMethod(name="adapter", build=build, save=save))
