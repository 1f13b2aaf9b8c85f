"""Training methods, one module each, registered by name.

A method module defines a :class:`TrainingMethod` and registers it with :func:`register` at import time.
:func:`get_method` imports ``kubetune.worker.methods.<name>`` on first use, so optional heavy
dependencies (bitsandbytes for ``qlora``) are imported only when that method runs. Adding a method means
adding one module here and one entry to the test matrix.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kubetune.worker.plan import MethodSpec

#: Every method the plan schema accepts; each names a module in this package.
METHOD_NAMES = ("full", "lora", "qlora", "ia3", "prefix", "adapter")

ArtifactFormat = Literal["full", "peft", "bottleneck"]


@dataclass(frozen=True)
class BuildContext:
    """What a method may need to know about the run when it wraps the model."""

    gradient_checkpointing: bool
    device: str  # "cpu" or "cuda"
    compute_dtype: Any  # torch.dtype the forward pass runs in


def _no_load_kwargs(spec: MethodSpec, context: BuildContext) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class TrainingMethod:
    """A fine-tuning method.

    ``build`` wraps or modifies the loaded base model in place and returns the model to train, with
    exactly the trainable parameters the method defines. ``save`` writes the artifact files (no
    tokenizer, no manifest) into a directory. ``load_kwargs`` adds ``from_pretrained`` arguments (e.g. a
    quantization config). ``gradient_checkpointing`` is False for methods it breaks;
    ``packed_attention`` is False for methods whose forward drops ``position_ids`` (packed records then
    share one causal mask).
    """

    name: str
    artifact_format: ArtifactFormat
    build: Callable[[Any, MethodSpec, BuildContext], Any]
    save: Callable[[Any, Path], None]
    load_kwargs: Callable[[MethodSpec, BuildContext], dict[str, Any]] = field(default=_no_load_kwargs)
    gradient_checkpointing: bool = True
    packed_attention: bool = True


_REGISTRY: dict[str, TrainingMethod] = {}


def register(method: TrainingMethod) -> TrainingMethod:
    """Add a method to the registry (called by each method module at import)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> TrainingMethod:
    """The registered method called ``name``; raises ``KeyError`` for unknown names."""
    if name not in _REGISTRY:
        if name not in METHOD_NAMES:
            raise KeyError(f"unknown method {name!r} (known: {', '.join(METHOD_NAMES)})")
        importlib.import_module(f"{__name__}.{name}")
    return _REGISTRY[name]
