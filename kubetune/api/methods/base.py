"""What every training method declares, torch-free: the registry entry and the model shape it counts on.

A method module (``kubetune.api.methods.<name>``) declares its settings model once, as an
:class:`~kubetune.api.schema.ApiModel`: the API shows it in camelCase (CRD, ``kubectl explain``) and the
worker's plan carries it in snake_case, through aliases. It registers a :class:`MethodInfo` with its
defaults, what serving needs to know, and its parameter estimate over a :class:`ModelShape`. The
torch-dependent ``build()`` lives in ``kubetune.worker.methods.<name>`` under the same name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from kubetune.api.schema import ApiModel

ArtifactFormat = Literal["full", "peft", "bottleneck"]


@dataclass(frozen=True)
class Linear:
    """One kind of linear layer of a model: ``count`` instances of ``in_features -> out_features``.

    ``path`` is the module path inside a decoder layer (``self_attn.q_proj``,
    ``mlp.shared_expert.gate_proj``) or inside the model for model-level layers (``lm_head``); target
    modules match it by suffix, as PEFT matches module names.
    """

    path: str
    in_features: int
    out_features: int
    bias: bool
    count: int
    in_layers: bool = True

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def weight_parameters(self) -> int:
        return self.in_features * self.out_features * self.count

    @property
    def bias_parameters(self) -> int:
        return self.out_features * self.count if self.bias else 0

    def matches(self, target: str) -> bool:
        """PEFT's rule for a list of target names: the full module name equals or ends with ``.target``."""
        return self.path == target or self.path.endswith("." + target)


@dataclass(frozen=True)
class ModelShape:
    """The parameter structure of a decoder-only model, as ``kubetune.planner`` reads it from ``config.json``.

    ``linears`` are the ``nn.Linear`` modules (weights that LoRA, IA3 and 4-bit quantisation act on);
    ``other_parameters`` is everything else (embeddings, norms, MoE routers and fused expert tensors),
    so ``total_parameters`` equals the model's ``sum(p.numel())``.
    """

    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    linears: tuple[Linear, ...]
    other_parameters: int
    #: head_dim as config.json states it (PEFT's prefix sizing reads it), None when implied.
    config_head_dim: int | None = None
    #: MLP width each token passes through (experts per token x expert width, plus shared experts).
    active_intermediate_size: int = 0
    num_experts: int = 0
    #: Parameters of the MoE expert tensors (fused 3-D parameters, not nn.Linear), all experts.
    expert_parameters: int = 0
    #: Extra per-layer notes the planner keeps for activations (e.g. q/k norms).
    qk_norm: bool = False
    extra: Mapping[str, int] = field(default_factory=dict)

    @property
    def linear_parameters(self) -> int:
        return sum(lin.weight_parameters + lin.bias_parameters for lin in self.linears)

    @property
    def total_parameters(self) -> int:
        return self.linear_parameters + self.other_parameters

    @property
    def bias_parameters(self) -> int:
        return sum(lin.bias_parameters for lin in self.linears)

    def linear_names(self) -> list[str]:
        """Distinct last name components of the linear layers in decoder layers, in model order."""
        return list(dict.fromkeys(lin.name for lin in self.linears if lin.in_layers))

    def targets(self, names: list[str], option: str) -> list[Linear]:
        """The linears the target names select; a name that selects none is an error naming ``option``."""
        selected: list[Linear] = []
        for target in names:
            found = [lin for lin in self.linears if lin.matches(target)]
            if not found:
                raise ValueError(
                    f'{option}: "{target}" matches no linear layer of {self.model_type} '
                    f"(its linear layers: {', '.join(self.linear_names())})"
                )
            selected.extend(lin for lin in found if lin not in selected)
        return selected


#: The settings blocks of ``spec.method`` by block name (``lora``, ``quantization``, ...), filled by
#: the method modules; a method reads one or more of them.
Settings = Mapping[str, ApiModel]


@dataclass(frozen=True)
class ServingTraits:
    """What serving needs to know about a method's artifact."""

    #: Many adapters of this method can share one loaded base model (a PEFT or bottleneck artifact).
    shares_base: bool
    #: vLLM can serve it (LoRA adapters only).
    vllm: bool
    #: The update can be merged into the base weights for zero serving overhead.
    merges: bool


@dataclass(frozen=True)
class MethodInfo:
    """A registered fine-tuning method (see the module docstring)."""

    name: str
    summary: str
    #: Where tables and the CRD's enum list it (full first, then by family).
    position: int
    #: Blocks of ``spec.method`` this method reads, first the one it owns, e.g. ("lora", "quantization").
    blocks: tuple[str, ...]
    #: The settings model of each block this module declares (a block is declared by one module).
    declares: Mapping[str, type[ApiModel]]
    artifact_format: ArtifactFormat
    serving: ServingTraits
    #: Trainable parameters under these settings on this model (exact: what PEFT counts).
    trainable_parameters: Callable[[ModelShape, Settings], int]
    #: Parameters the method adds to the model (0 for full fine-tuning).
    added_parameters: Callable[[ModelShape, Settings], int]
    #: Whether activation (gradient) checkpointing works with it; prefix tuning's cache breaks it.
    gradient_checkpointing: bool = True
    #: Whether packed records keep their own causal masks (prompt-learning drops position_ids).
    packed_attention: bool = True
    #: Whether it trains across nodes (prefix tuning's cache does not survive DDP).
    multi_node: bool = True
    #: Across several ranks FSDP shards its weights, gradients and optimizer state (full
    #: fine-tuning); otherwise DDP replicates the model on every rank. The engine and the planner
    #: both read it.
    sharded_across_ranks: bool = False
    #: The frozen base is stored in 4 bits (NF4/FP4) instead of the compute dtype.
    quantized_base: bool = False
    #: The trainable weights are the base's own (full fine-tuning); else they are new, fp32 tensors.
    trains_base: bool = False
    #: Extra activation elements one token saves per decoder layer for the backward pass.
    activation_elements: Callable[[ModelShape, Settings], int] = lambda shape, settings: 0


_REGISTRY: dict[str, MethodInfo] = {}
_BLOCKS: dict[str, type[ApiModel]] = {}


def register_method(info: MethodInfo) -> MethodInfo:
    """Add a method (called once by each method module at import)."""
    if info.name in _REGISTRY:
        raise ValueError(f"method {info.name!r} is already registered")
    for block, settings in info.declares.items():
        if block in _BLOCKS and _BLOCKS[block] is not settings:
            raise ValueError(f"settings block {block!r} is already declared by another method")
        _BLOCKS[block] = settings
    _REGISTRY[info.name] = info
    return info


def registry() -> Mapping[str, MethodInfo]:
    return _REGISTRY


def blocks() -> Mapping[str, type[ApiModel]]:
    return _BLOCKS


def settings_for(info: MethodInfo, given: Mapping[str, ApiModel | None]) -> dict[str, ApiModel]:
    """The method's blocks, each as given or else its defaults."""
    out: dict[str, ApiModel] = {}
    for block in info.blocks:
        value = given.get(block)
        out[block] = value if value is not None else _BLOCKS[block]()
    return out
