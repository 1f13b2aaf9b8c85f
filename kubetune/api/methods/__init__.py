"""Training methods, one module each, registered by name (as PEFT's tuners register themselves).

Each ``kubetune.api.methods.<name>`` module declares its settings once (used by the API in camelCase
and by the worker's plan in snake_case), its defaults, what serving needs to know and its parameter
estimate, and registers them with :func:`~kubetune.api.methods.base.register_method`. The torch side
(``build``, ``save``) is ``kubetune.worker.methods.<name>``. Every list of method names derives from
this registry; adding a method is one module here, one in the worker, its import below, the test
matrix, and ``kubetune crds``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

from kubetune.api.methods import adapter, full, ia3, lora, prefix, qlora  # noqa: F401  (registration)
from kubetune.api.methods.base import (
    Linear,
    MethodInfo,
    ModelShape,
    ServingTraits,
    Settings,
    blocks,
    registry,
    settings_for,
)

#: Every method name, in the order documentation and tables list them (each method's ``position``).
METHOD_NAMES: tuple[str, ...] = tuple(sorted(registry(), key=lambda name: registry()[name].position))
#: Methods that train an adapter over a frozen base.
PEFT_METHODS: tuple[str, ...] = tuple(n for n in METHOD_NAMES if not registry()[n].trains_base)


def _known_method(name: str) -> str:
    if name not in METHOD_NAMES:
        raise ValueError(f"{name!r} is not a method (known: {', '.join(METHOD_NAMES)})")
    return name


#: A registered method's name; JSON schemas (and so the CRD) list them as an enum.
MethodName = Annotated[
    str, AfterValidator(_known_method), WithJsonSchema({"type": "string", "enum": list(METHOD_NAMES)})
]


def get(name: str) -> MethodInfo:
    """The registered method ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return registry()[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r} (known: {', '.join(METHOD_NAMES)})") from None


__all__ = [
    "METHOD_NAMES",
    "PEFT_METHODS",
    "Linear",
    "MethodInfo",
    "MethodName",
    "ModelShape",
    "ServingTraits",
    "Settings",
    "blocks",
    "get",
    "registry",
    "settings_for",
]
