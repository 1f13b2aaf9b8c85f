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
from typing import Any

from kubetune.api import methods
from kubetune.api.methods import METHOD_NAMES, MethodInfo
from kubetune.worker.plan import MethodSpec

__all__ = ["METHOD_NAMES", "BuildContext", "TrainingMethod", "get_method", "register"]


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
    """The torch side of a fine-tuning method; its settings and traits are the registry's
    (:class:`kubetune.api.methods.MethodInfo` of the same name).

    ``build`` wraps or modifies the loaded base model in place and returns the model to train, with
    exactly the trainable parameters the method defines. ``save`` writes the artifact files (no
    tokenizer, no manifest) into a directory. ``load_kwargs`` adds ``from_pretrained`` arguments (e.g. a
    quantization config).
    """

    name: str
    build: Callable[[Any, MethodSpec, BuildContext], Any]
    save: Callable[[Any, Path], None]
    load_kwargs: Callable[[MethodSpec, BuildContext], dict[str, Any]] = field(default=_no_load_kwargs)

    @property
    def info(self) -> MethodInfo:
        return methods.get(self.name)

    @property
    def artifact_format(self) -> str:
        return self.info.artifact_format

    @property
    def gradient_checkpointing(self) -> bool:
        """False for methods checkpointing breaks."""
        return self.info.gradient_checkpointing

    @property
    def packed_attention(self) -> bool:
        """False for methods whose forward drops ``position_ids`` (packed records share one mask)."""
        return self.info.packed_attention


_REGISTRY: dict[str, TrainingMethod] = {}


def register(method: TrainingMethod) -> TrainingMethod:
    """Add a method to the registry (called by each method module at import)."""
    methods.get(method.name)  # the torch side of a method the registry does not know is an error
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
