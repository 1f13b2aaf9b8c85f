"""A model's parameter structure from its ``config.json``: pure arithmetic, no torch, no download.

The counts are exact for the architectures listed in :data:`FAMILIES` as transformers builds them
(the tests compare them with models instantiated on the meta device). Each family says where its
linear layers are and how wide they are; everything else (embeddings, norms, MoE routers and the
fused expert tensors of Mixtral and Qwen-MoE) is counted as ``other_parameters``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune.api.methods import Linear, ModelShape


class ConfigError(ValueError):
    """config.json lacks a field the planner needs, or describes an architecture it does not know."""


#: model_type -> what tie_word_embeddings defaults to when config.json leaves it out (the config
#: class's default in transformers).
FAMILIES: dict[str, bool] = {
    "llama": False,
    "mistral": False,
    "mixtral": False,
    "qwen2": False,
    "qwen2_moe": False,
    "qwen3": True,
    "qwen3_moe": False,
    "gemma": True,
    "gemma2": True,
    "phi3": False,
}


class _Config:
    """Typed reads of config.json that name the missing or malformed field."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data
        self.model_type = str(data.get("model_type") or "")

    def int(self, key: str, default: int | None = None) -> int:
        value = self.data.get(key)
        if value is None:
            if default is not None:
                return default
            raise ConfigError(f"config.json: {self.model_type or 'model'} needs the field {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"config.json: {key!r} must be a non-negative integer, not {value!r}")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.data.get(key)
        return default if value is None else bool(value)


def model_shape(config: Mapping[str, Any]) -> ModelShape:
    """The :class:`ModelShape` of the model ``config`` (a parsed config.json) describes.

    Raises :class:`ConfigError` naming the missing field, or the unknown ``model_type`` with the
    supported ones.
    """
    if not isinstance(config, Mapping):
        raise ConfigError("config.json must hold a JSON object")
    c = _Config(config)
    if not c.model_type:
        raise ConfigError("config.json: the field 'model_type' is missing, so the architecture is unknown")
    if c.model_type not in FAMILIES:
        raise ConfigError(
            f"config.json: model_type {c.model_type!r} is not one the planner counts "
            f"(known: {', '.join(sorted(FAMILIES))})"
        )
    hidden = c.int("hidden_size")
    layers = c.int("num_hidden_layers")
    heads = c.int("num_attention_heads")
    vocab = c.int("vocab_size")
    kv_heads = c.int("num_key_value_heads", heads)
    config_head_dim = config.get("head_dim")
    head_dim = c.int("head_dim") if config_head_dim is not None else hidden // max(heads, 1)
    if heads == 0 or head_dim == 0:
        raise ConfigError("config.json: 'num_attention_heads' and 'head_dim' must be positive")
    tied = c.bool("tie_word_embeddings", FAMILIES[c.model_type])
    q_out, kv_out = heads * head_dim, kv_heads * head_dim

    linears: list[Linear] = []

    def add(path: str, fan_in: int, fan_out: int, bias: bool = False, count: int = layers) -> None:
        if count:
            linears.append(Linear(path, fan_in, fan_out, bias, count))

    # Attention.
    if c.model_type == "phi3":
        add("self_attn.qkv_proj", hidden, q_out + 2 * kv_out)
        add("self_attn.o_proj", q_out, hidden)
    else:
        qkv_bias = c.model_type in ("qwen2", "qwen2_moe") or c.bool("attention_bias", False)
        o_bias = c.model_type not in ("qwen2", "qwen2_moe") and c.bool("attention_bias", False)
        add("self_attn.q_proj", hidden, q_out, qkv_bias)
        add("self_attn.k_proj", hidden, kv_out, qkv_bias)
        add("self_attn.v_proj", hidden, kv_out, qkv_bias)
        add("self_attn.o_proj", q_out, hidden, o_bias)

    norms_per_layer = 4 if c.model_type == "gemma2" else 2
    other = vocab * hidden + (0 if tied else vocab * hidden) + (layers * norms_per_layer + 1) * hidden
    qk_norm = c.model_type in ("qwen3", "qwen3_moe")
    if qk_norm:
        other += layers * 2 * head_dim

    # MLP: dense, or mixture of experts (fused 3-D expert tensors plus a router matrix).
    mlp_bias = c.bool("mlp_bias", False)
    experts = expert_parameters = top_k = 0
    if c.model_type == "phi3":
        inter = c.int("intermediate_size")
        add("mlp.gate_up_proj", hidden, 2 * inter)
        add("mlp.down_proj", inter, hidden)
        active = inter
    elif c.model_type == "mixtral":
        inter = c.int("intermediate_size")
        experts = c.int("num_local_experts")
        top_k = c.int("num_experts_per_tok")
        expert_parameters = layers * experts * 3 * hidden * inter
        other += expert_parameters + layers * experts * hidden
        active = top_k * inter
    elif c.model_type in ("qwen2_moe", "qwen3_moe"):
        inter = c.int("intermediate_size")
        experts = c.int("num_experts")
        top_k = c.int("num_experts_per_tok")
        moe_inter = c.int("moe_intermediate_size")
        step = c.int("decoder_sparse_step", 1)
        dense_only = set(config.get("mlp_only_layers") or [])
        sparse = sum(
            1
            for i in range(layers)
            if i not in dense_only and experts > 0 and step > 0 and (i + 1) % step == 0
        )
        dense = layers - sparse
        add("mlp.gate_proj", hidden, inter, mlp_bias, dense)
        add("mlp.up_proj", hidden, inter, mlp_bias, dense)
        add("mlp.down_proj", inter, hidden, mlp_bias, dense)
        expert_parameters = sparse * experts * 3 * hidden * moe_inter
        other += expert_parameters + sparse * experts * hidden
        active = top_k * moe_inter
        if c.model_type == "qwen2_moe":
            shared = c.int("shared_expert_intermediate_size")
            add("mlp.shared_expert.gate_proj", hidden, shared, count=sparse)
            add("mlp.shared_expert.up_proj", hidden, shared, count=sparse)
            add("mlp.shared_expert.down_proj", shared, hidden, count=sparse)
            add("mlp.shared_expert_gate", hidden, 1, count=sparse)
            active += shared
        if dense:
            active = max(active, inter)
    else:
        inter = c.int("intermediate_size")
        add("mlp.gate_proj", hidden, inter, mlp_bias)
        add("mlp.up_proj", hidden, inter, mlp_bias)
        add("mlp.down_proj", inter, hidden, mlp_bias)
        active = inter

    return ModelShape(
        model_type=c.model_type,
        num_layers=layers,
        hidden_size=hidden,
        vocab_size=vocab,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        tie_word_embeddings=tied,
        linears=tuple(linears),
        other_parameters=other,
        config_head_dim=head_dim if config_head_dim is not None else None,
        active_intermediate_size=active,
        num_experts=experts,
        expert_parameters=expert_parameters,
        qk_norm=qk_norm,
        extra={"experts_per_token": top_k} if experts else {},
    )
