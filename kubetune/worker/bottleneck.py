"""Houlsby and Pfeiffer bottleneck adapters for Hugging Face causal language models.

PEFT has no bottleneck adapters, and the ``adapters`` library (AdapterHub) 1.3.0 pins
``transformers~=4.57.6``, which would hold the whole project on transformers 4. A bottleneck
adapter is small enough to own: a down-projection, a non-linearity and a zero-initialised
up-projection with a residual connection, inserted after a decoder layer's sub-layers.

Placement (Houlsby et al. 2019; Pfeiffer et al. 2021):

- ``houlsby``: one adapter on the attention sub-layer's output and one on the MLP's output, each
  applied before the decoder layer adds its own residual stream.
- ``pfeiffer``: one adapter on the MLP's output only (half the parameters of ``houlsby``).

The adapters are attached with forward hooks on the attention and MLP modules, so the base
model's module tree and state-dict keys stay as they were and the adapter weights live under one
``kubetune_bottleneck`` sub-module per decoder layer. Because the up-projection starts at zero, a
freshly adapted model computes exactly what the base model computes.

The on-disk format is documented in ``docs/bottleneck-adapters.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

FORMAT_NAME = "kubetune.bottleneck"
# Bumped on any change a reader of version N could misread; readers refuse newer versions.
FORMAT_VERSION = 1
CONFIG_FILE = "kubetune_adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The attribute each decoder layer gets; also the marker that a model already has adapters.
ADAPTER_ATTRIBUTE = "kubetune_bottleneck"

Placement = Literal["houlsby", "pfeiffer"]
NonLinearity = Literal["relu", "gelu", "silu", "tanh"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}

# Sub-layers that carry an adapter, per placement, in insertion order.
_SITES: dict[str, tuple[str, ...]] = {
    "houlsby": ("attn", "mlp"),
    "pfeiffer": ("mlp",),
}


class BottleneckConfig(BaseModel):
    """Hyperparameters of a bottleneck adapter; stored verbatim in the adapter's config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bottleneck_size: int = Field(
        default=64,
        ge=1,
        description="Width of the bottleneck (units between the down- and up-projection). Default 64.",
    )
    placement: Placement = Field(
        default="houlsby",
        description=(
            "`houlsby`: adapters after the attention and the MLP sub-layers; `pfeiffer`: after the MLP only."
            " Default `houlsby`."
        ),
    )
    dropout: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout probability on the bottleneck activations, in training only. Default 0.0.",
    )
    non_linearity: NonLinearity = Field(
        default="relu",
        description="Activation between the down- and up-projection. Default `relu`.",
    )
    scaling: float = Field(
        default=1.0,
        gt=0.0,
        description="Multiplier on the adapter's output before the residual is added. Default 1.0.",
    )
    init_std: float = Field(
        default=0.01,
        gt=0.0,
        description=(
            "Standard deviation of the down-projection's normal initialisation. Default 0.01; small so"
            " that training starts near the base model even after the up-projection leaves zero."
        ),
    )

    @property
    def sites(self) -> tuple[str, ...]:
        """The sub-layers (``attn``, ``mlp``) that carry an adapter in each decoder layer."""
        return _SITES[self.placement]


class UnsupportedArchitectureError(ValueError):
    """The model's decoder layers could not be found, so adapters cannot be inserted."""


class BottleneckFormatError(ValueError):
    """A directory does not hold a bottleneck adapter this version of kubetune can read."""


@dataclass(frozen=True)
class _Architecture:
    """Where a model family keeps its decoder layers and their sub-layers."""

    layers: str
    attn: str
    mlp: str


# Checked in order; the first whose paths all resolve wins.
_ARCHITECTURES: tuple[_Architecture, ...] = (
    # Llama, Qwen2/3, Mistral, Gemma, Phi-3, ...: model.model.layers[i].{self_attn, mlp}
    _Architecture(layers="model.layers", attn="self_attn", mlp="mlp"),
    # GPT-2 and GPT-J style: model.transformer.h[i].{attn, mlp}
    _Architecture(layers="transformer.h", attn="attn", mlp="mlp"),
)


class BottleneckAdapter(nn.Module):
    """``h + scaling * up(dropout(act(down(h))))`` with ``up`` zero-initialised.

    Keeps float32 weights (float64 behind a float64 base), computes in them and casts its output back
    to the hidden states' dtype, so it trains stably behind bf16, fp16 or 4-bit base layers.
    """

    def __init__(self, hidden_size: int, config: BottleneckConfig, *, dtype: torch.dtype) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, config.bottleneck_size, dtype=dtype)
        self.act = _ACTIVATIONS[config.non_linearity]()
        self.dropout = nn.Dropout(config.dropout)
        self.up = nn.Linear(config.bottleneck_size, hidden_size, dtype=dtype)
        self.scaling = config.scaling
        nn.init.normal_(self.down.weight, std=config.init_std)
        nn.init.zeros_(self.down.bias)
        # Zero up-projection: the adapter starts as the identity, so training starts from the base model.
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.down.weight.dtype)
        delta = self.up(self.dropout(self.act(self.down(x))))
        return hidden + (self.scaling * delta).to(hidden.dtype)

    def apply_to_output(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook: adapt a sub-layer's output (a tensor, or a tuple whose first item is one)."""
        if isinstance(output, torch.Tensor):
            return self(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self(output[0]), *output[1:])
        raise TypeError(
            f"bottleneck adapter on {type(module).__name__}: cannot adapt an output of type"
            f" {type(output).__name__}"
        )


def _resolve(root: nn.Module, dotted: str) -> nn.Module | None:
    current: Any = root
    for part in dotted.split("."):
        current = getattr(current, part, None)
        if current is None:
            return None
    return current if isinstance(current, nn.Module) else None


def _find_architecture(model: nn.Module) -> tuple[_Architecture, nn.ModuleList]:
    for arch in _ARCHITECTURES:
        layers = _resolve(model, arch.layers)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            continue
        if all(
            _resolve(layer, arch.attn) is not None and _resolve(layer, arch.mlp) is not None
            for layer in layers
        ):
            return arch, layers
    looked_for = "; ".join(f"{a.layers}[i].{{{a.attn}, {a.mlp}}}" for a in _ARCHITECTURES)
    raise UnsupportedArchitectureError(
        f"bottleneck adapters do not support {type(model).__name__}: found none of the decoder-layer"
        f" layouts {looked_for}"
    )


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None)
    if not isinstance(size, int):
        raise UnsupportedArchitectureError(
            f"bottleneck adapters need model.config.hidden_size; {type(model).__name__} has none"
        )
    return size


def _adapter_dtype(layer: nn.Module) -> torch.dtype:
    # float32 master weights behind bf16/fp16 (autocast still runs the matmuls in half precision) and
    # 4-bit bases, as PEFT's autocast_adapter_dtype does; only a float64 base gets float64 adapters.
    if any(param.dtype == torch.float64 for param in layer.parameters()):
        return torch.float64
    return torch.float32


def _layer_device(layer: nn.Module) -> torch.device:
    for param in layer.parameters():
        return param.device
    return torch.device("cpu")


def _adapted_layers(model: nn.Module) -> Iterator[tuple[int, nn.ModuleDict]]:
    _, layers = _find_architecture(model)
    for index, layer in enumerate(layers):
        adapters = getattr(layer, ADAPTER_ATTRIBUTE, None)
        if isinstance(adapters, nn.ModuleDict):
            yield index, adapters


def _attached_config(model: nn.Module) -> BottleneckConfig:
    config = getattr(model, "_kubetune_bottleneck_config", None)
    if not isinstance(config, BottleneckConfig):
        raise ValueError(f"{type(model).__name__} has no bottleneck adapters (call add_bottleneck_adapters)")
    return config


def bottleneck_parameter_count(hidden_size: int, num_layers: int, config: BottleneckConfig) -> int:
    """Parameters the adapters add: ``sites * layers * (2*hidden*bottleneck + bottleneck + hidden)``.

    Each adapter has a down-projection (``hidden * bottleneck`` weights + ``bottleneck`` biases) and an
    up-projection (``bottleneck * hidden`` weights + ``hidden`` biases).
    """
    per_adapter = 2 * hidden_size * config.bottleneck_size + config.bottleneck_size + hidden_size
    return len(config.sites) * num_layers * per_adapter


def _new_adapters(layers: nn.ModuleList, hidden_size: int, config: BottleneckConfig) -> list[nn.ModuleDict]:
    """Fresh adapters for each decoder layer, on that layer's device, in its adapter dtype."""
    per_layer = []
    for layer in layers:
        dtype, device = _adapter_dtype(layer), _layer_device(layer)
        adapters = nn.ModuleDict(
            {site: BottleneckAdapter(hidden_size, config, dtype=dtype) for site in config.sites}
        )
        per_layer.append(adapters.to(device))
    return per_layer


def add_bottleneck_adapters(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Insert bottleneck adapters into ``model`` in place, freeze every base parameter, return ``model``.

    Only the adapters' parameters are left trainable. Raises ``UnsupportedArchitectureError`` when the
    decoder layers cannot be found and ``ValueError`` when the model already has adapters.
    """
    arch, layers = _find_architecture(model)
    hidden_size = _hidden_size(model)
    if any(isinstance(getattr(layer, ADAPTER_ATTRIBUTE, None), nn.Module) for layer in layers):
        raise ValueError(f"{type(model).__name__} already has bottleneck adapters")

    for param in model.parameters():
        param.requires_grad_(False)

    site_modules = {"attn": arch.attn, "mlp": arch.mlp}
    for layer, adapters in zip(layers, _new_adapters(layers, hidden_size, config), strict=True):
        # Registered before the hooks so that the adapters are part of the layer (state dict, .to(), DDP).
        setattr(layer, ADAPTER_ATTRIBUTE, adapters)
        for site, adapter in adapters.items():
            sub_layer = _resolve(layer, site_modules[site])
            assert sub_layer is not None  # _find_architecture checked every layer
            # A bound method of the adapter, so deepcopy(model) re-binds the hook to the copied adapter.
            sub_layer.register_forward_hook(cast(BottleneckAdapter, adapter).apply_to_output)

    # Plain attribute (not a module or parameter): stays out of the state dict.
    object.__setattr__(model, "_kubetune_bottleneck_config", config)
    return model


def base_config_sha256(model: nn.Module) -> str | None:
    """SHA-256 of the base model's config as canonical JSON, minus fields that do not change the weights.

    ``None`` when the model has no Hugging Face config.
    """
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if to_dict is None:
        return None
    values = dict(to_dict())
    # Fields that differ between two loads of the same checkpoint (path, library version, runtime choices).
    for volatile in (
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_experts_implementation",
        "quantization_config",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    ):
        values.pop(volatile, None)
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for index, adapters in _adapted_layers(model):
        for name, tensor in adapters.state_dict().items():
            # Keys relative to the layer list, so the file does not depend on how the model is wrapped.
            state[f"layers.{index}.{name}"] = tensor.detach().to("cpu").contiguous()
    return state


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_bottleneck_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> list[Path]:
    """Write the adapter config and weights (adapters only, no base weights) into ``directory``.

    Creates ``directory`` if needed; each file is replaced atomically. Returns the files written.
    """
    config = _attached_config(model)
    arch, layers = _find_architecture(model)
    state = _adapter_state_dict(model)
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)

    base_config = getattr(model, "config", None)
    description = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config.model_dump(mode="json"),
        "base_model": {
            "class": type(model).__name__,
            "model_type": getattr(base_config, "model_type", None),
            "name_or_path": getattr(base_config, "_name_or_path", None) or None,
            "config_sha256": base_config_sha256(model),
            "hidden_size": _hidden_size(model),
            "num_layers": len(layers),
        },
        "layout": {"layers": arch.layers, "attn": arch.attn, "mlp": arch.mlp},
        "trainable_parameters": sum(t.numel() for t in state.values()),
    }
    weights_path = target / WEIGHTS_FILE
    config_path = target / CONFIG_FILE
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
    _atomic_write(weights_path, lambda p: save_file(state, str(p), metadata=metadata))
    # The config goes last: a directory with a config always has the weights it describes.
    _atomic_write(
        config_path, lambda p: p.write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    )
    return [config_path, weights_path]


def _read_description(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_FILE
    try:
        description = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise BottleneckFormatError(f"{directory}: no {CONFIG_FILE}; not a bottleneck adapter") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BottleneckFormatError(f"{config_path}: not valid JSON: {error}") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT_NAME:
        raise BottleneckFormatError(f"{config_path}: format is not {FORMAT_NAME!r}")
    version = description.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BottleneckFormatError(
            f"{config_path}: format_version {version!r} is not supported"
            f" (this kubetune reads <= {FORMAT_VERSION})"
        )
    return description


def is_bottleneck_adapter_dir(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a bottleneck adapter in a format version this kubetune can read."""
    path = Path(directory)
    if not (path / WEIGHTS_FILE).is_file():
        return False
    try:
        _read_description(path)
    except BottleneckFormatError:
        return False
    return True


def _read_config(base_model: nn.Module, path: Path) -> BottleneckConfig:
    """The adapter's config; a base whose config hash differs from the training base is only logged,
    since a renamed copy of the same model is a legitimate base."""
    description = _read_description(path)
    config = BottleneckConfig.model_validate(description.get("config", {}))
    saved_base = description.get("base_model") or {}
    expected_hash = saved_base.get("config_sha256")
    actual_hash = base_config_sha256(base_model)
    if expected_hash and actual_hash and expected_hash != actual_hash:
        logger.warning(
            "bottleneck adapter %s was trained on a %s whose config hash is %s; this %s has %s",
            path,
            saved_base.get("class"),
            expected_hash[:12],
            type(base_model).__name__,
            actual_hash[:12],
        )
    return config


def _load_weights(path: Path, per_layer: list[nn.ModuleDict], model_name: str) -> None:
    """Load the saved tensors into ``per_layer`` (one ModuleDict of adapters per decoder layer)."""
    weights_path = path / WEIGHTS_FILE
    try:
        saved = load_file(str(weights_path))
    except FileNotFoundError:
        raise BottleneckFormatError(f"{path}: no {WEIGHTS_FILE}") from None
    expected = {
        f"layers.{index}.{name}": tensor
        for index, adapters in enumerate(per_layer)
        for name, tensor in adapters.state_dict().items()
    }
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    if missing or unexpected:
        raise BottleneckFormatError(
            f"{weights_path}: tensors do not match {model_name}"
            f" (missing {missing[:3]}{'...' if len(missing) > 3 else ''},"
            f" unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for key, tensor in saved.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise BottleneckFormatError(
                f"{weights_path}: {key} has shape {tuple(tensor.shape)},"
                f" the model needs {tuple(expected[key].shape)}"
            )
    with torch.no_grad():
        for index, adapters in enumerate(per_layer):
            prefix = f"layers.{index}."
            own = {key[len(prefix) :]: value for key, value in saved.items() if key.startswith(prefix)}
            adapters.load_state_dict(own, strict=True)


def load_bottleneck_adapter(
    base_model: nn.Module, directory: str | os.PathLike[str], *, trainable: bool = False
) -> nn.Module:
    """Insert the adapters saved in ``directory`` into ``base_model`` (in place) and load their weights.

    The adapters are frozen unless ``trainable`` (default ``False``, for serving). Raises
    ``BottleneckFormatError`` for a directory that is not a readable adapter or whose tensors do not match
    the model's shape; a base model whose config hash differs from the one the adapter was trained on is
    logged as a warning, since a renamed copy of the same model is a legitimate base.
    """
    path = Path(directory)
    config = _read_config(base_model, path)
    model = add_bottleneck_adapters(base_model, config)
    per_layer = [adapters for _, adapters in _adapted_layers(model)]
    _load_weights(path, per_layer, type(model).__name__)
    for adapters in per_layer:
        adapters.requires_grad_(trainable)
    return model


class DetachedBottleneck(nn.Module):
    """A bottleneck adapter kept beside a base model instead of inside it, for serving.

    Its hooks are registered only while :meth:`attached` is active, so any number of adapters share
    one base model in memory and the base computes as itself the rest of the time. Built by
    :func:`read_bottleneck_adapter`.
    """

    def __init__(self, config: BottleneckConfig, per_layer: list[nn.ModuleDict]) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(per_layer)

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        """While active, ``model`` (the base the adapter was read for) runs with this adapter."""
        arch, layers = _find_architecture(model)
        site_modules = {"attn": arch.attn, "mlp": arch.mlp}
        handles = []
        try:
            for layer, adapters in zip(layers, self.layers, strict=True):
                for site, adapter in cast(nn.ModuleDict, adapters).items():
                    sub_layer = _resolve(layer, site_modules[site])
                    assert sub_layer is not None  # _find_architecture checked every layer
                    hook = cast(BottleneckAdapter, adapter).apply_to_output
                    handles.append(sub_layer.register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()


def read_bottleneck_adapter(base_model: nn.Module, directory: str | os.PathLike[str]) -> DetachedBottleneck:
    """The adapter saved in ``directory``, frozen and in eval mode, built for ``base_model`` but not
    inserted into it (see :class:`DetachedBottleneck`). Raises as :func:`load_bottleneck_adapter`."""
    path = Path(directory)
    config = _read_config(base_model, path)
    _, layers = _find_architecture(base_model)
    per_layer = _new_adapters(layers, _hidden_size(base_model), config)
    _load_weights(path, per_layer, type(base_model).__name__)
    detached = DetachedBottleneck(config, per_layer).eval()
    detached.requires_grad_(False)
    return detached
