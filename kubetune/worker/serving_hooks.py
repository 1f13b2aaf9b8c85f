"""Adapters that run on the server's one base model through hooks, attached only for their own batch.

An IA3 adapter (PEFT's artifact) rescales a few layers' activations; a bottleneck adapter
(:mod:`kubetune.worker.bottleneck`) adds a small residual block after the attention and MLP
sub-layers. Neither needs its own copy of the base: the server keeps the adapter's own tensors and,
for the duration of one batched ``generate``, registers forward hooks on the shared base that apply
them. Outside that window the base computes as itself, so the base, LoRA adapters and any number of
these adapters share one set of base weights.

IA3 is not injected through PEFT here, although PEFT can hold several IA3 adapters on one
``PeftModel``: the server's base already carries the LoRA host's injected layers, and a second PEFT
injection would wrap those layers in turn, so that the load order of two kinds of adapter would
change the module tree. The hooks apply PEFT's own arithmetic (``IA3Layer.forward``): a feed-forward
module's input is scaled by its vector, any other target module's output by its vector, in the
vector's dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

#: What PEFT prefixes to every key of a saved adapter of a causal LM.
_PEFT_PREFIX = "base_model.model."
_IA3_SUFFIX = ".ia3_l"


class HookedAdapter(Protocol):
    """An adapter applied to the shared base while :meth:`attached` is active."""

    def attached(self, model: Any) -> contextlib.AbstractContextManager[None]: ...

    def nbytes(self) -> int: ...


class IA3Hooks:
    """The scaling vectors of one IA3 adapter, by module path in the base model.

    ``scales`` maps a module path (as in ``base.named_modules()``) to ``(vector, feedforward)``:
    a feed-forward module's input is scaled, any other module's output.
    """

    def __init__(self, scales: dict[str, tuple[Any, bool]]) -> None:
        self.scales = scales

    @classmethod
    def read(cls, base: Any, directory: Path) -> IA3Hooks:
        """The adapter in ``directory`` (PEFT's IA3 format), checked against ``base``'s modules.

        Raises ``ValueError`` naming the module whose vector does not fit the base.
        """
        from peft.utils import load_peft_weights

        weights = load_peft_weights(str(directory), device="cpu")
        device = next(base.parameters()).device
        scales: dict[str, tuple[Any, bool]] = {}
        for key, tensor in weights.items():
            if not key.endswith(_IA3_SUFFIX):
                raise ValueError(f"{directory}: {key} is not an IA3 vector")
            path = key.removeprefix(_PEFT_PREFIX).removesuffix(_IA3_SUFFIX)
            try:
                module = base.get_submodule(path)
            except AttributeError:
                raise ValueError(f"{directory}: the base has no module {path}") from None
            # PEFT stores a feed-forward vector as [1, in_features], any other as [out_features, 1].
            feedforward = tensor.shape[0] == 1 and tensor.shape[-1] != 1
            weight = getattr(_base_layer(module), "weight", None)
            if weight is None or tensor.numel() not in weight.shape:
                raise ValueError(f"{directory}: {key} of shape {tuple(tensor.shape)} does not fit {path}")
            scales[path] = (tensor.flatten().to(device), feedforward)
        if not scales:
            raise ValueError(f"{directory}: no IA3 vectors")
        return cls(scales)

    @contextlib.contextmanager
    def attached(self, model: Any) -> Iterator[None]:
        handles = []
        try:
            for path, (vector, feedforward) in self.scales.items():
                module = model.get_submodule(path)
                if feedforward:
                    handles.append(module.register_forward_pre_hook(_scale_input(vector)))
                else:
                    handles.append(module.register_forward_hook(_scale_output(vector)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v, _ in self.scales.values())


class BottleneckHooks:
    """A bottleneck adapter read beside the base, not into it (``read_bottleneck_adapter``)."""

    def __init__(self, base: Any, directory: Path) -> None:
        from kubetune.worker.bottleneck import read_bottleneck_adapter

        self.adapter = read_bottleneck_adapter(base, directory)

    def attached(self, model: Any) -> contextlib.AbstractContextManager[None]:
        return self.adapter.attached(model)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.adapter.parameters())


def _base_layer(module: Any) -> Any:
    # A PEFT layer (the LoRA host's) wraps the base's own layer; its weight is the base layer's.
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def _scale_input(vector: Any) -> Any:
    def hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return ((x.to(vector.dtype) * vector).to(x.dtype), *args[1:])

    return hook


def _scale_output(vector: Any) -> Any:
    def hook(module: Any, args: tuple[Any, ...], output: Any) -> Any:
        return (output.to(vector.dtype) * vector).to(output.dtype)

    return hook
