"""Bottleneck adapters (``kubetune.worker.bottleneck``) on tiny random Llama and GPT-2 models.

Aspects:
- identity at init: the adapted model's logits equal the base model's exactly (both placements);
- adapter weights stay float32 behind a bfloat16 base, and the output keeps the base's dtype;
- only adapter parameters are trainable, and their count matches ``bottleneck_parameter_count``;
- Houlsby has exactly twice Pfeiffer's parameters;
- a few optimiser steps reduce the loss (the adapters learn; the base stays frozen);
- save -> load into a fresh base reproduces the trained model's logits exactly, loads frozen by default,
  and writes only adapter tensors;
- the directory check and the loader reject other formats, newer format versions and mismatched shapes;
- clear errors for an unsupported architecture and for adding adapters twice;
- GPT-2 style models (``transformer.h[i].{attn, mlp}``) and ``copy.deepcopy`` of an adapted model work;
- gradient checkpointing (reentrant or not) still trains the adapters.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from kubetune.worker.bottleneck import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    BottleneckConfig,
    BottleneckFormatError,
    UnsupportedArchitectureError,
    add_bottleneck_adapters,
    bottleneck_parameter_count,
    is_bottleneck_adapter_dir,
    load_bottleneck_adapter,
    save_bottleneck_adapter,
)

pytestmark = pytest.mark.torch

HIDDEN = 64
LAYERS = 2
VOCAB = 128


def tiny_llama(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64
    )
    return transformers.GPT2LMHeadModel(config).eval()


def batch(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 16), generator=generator)


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def train_steps(model: nn.Module, input_ids: torch.Tensor, steps: int) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_adapted_model_computes_the_base_model_at_init(build: Any, placement: str) -> None:
    base = build()
    ids = batch()
    expected = logits(base, ids)
    adapted = add_bottleneck_adapters(base, BottleneckConfig(bottleneck_size=8, placement=placement))
    assert adapted is base
    assert torch.equal(logits(adapted, ids), expected)


def test_adapters_keep_float32_weights_behind_a_bfloat16_base() -> None:
    base = tiny_llama().to(torch.bfloat16)
    ids = batch()
    expected = logits(base, ids)
    model = add_bottleneck_adapters(base, BottleneckConfig(bottleneck_size=8))
    adapter_dtypes = {p.dtype for name, p in model.named_parameters() if "kubetune_bottleneck" in name}
    assert adapter_dtypes == {torch.float32}
    output = logits(model, ids)
    assert output.dtype == torch.bfloat16 and torch.equal(output, expected)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_only_adapter_parameters_are_trainable_and_counted_by_the_formula(build: Any, placement: str) -> None:
    config = BottleneckConfig(bottleneck_size=16, placement=placement)
    model = add_bottleneck_adapters(build(), config)
    names = trainable_names(model)
    assert names and all(".kubetune_bottleneck." in name for name in names)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == bottleneck_parameter_count(HIDDEN, LAYERS, config)
    # 2 * hidden * bottleneck + bottleneck + hidden per adapter, written out for the reader.
    assert trainable == len(config.sites) * LAYERS * (2 * HIDDEN * 16 + 16 + HIDDEN)


def test_houlsby_has_twice_the_parameters_of_pfeiffer() -> None:
    def count(placement: str) -> int:
        model = add_bottleneck_adapters(tiny_llama(), BottleneckConfig(placement=placement))
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    assert count("houlsby") == 2 * count("pfeiffer")


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_training_reduces_the_loss_and_leaves_the_base_untouched(placement: str) -> None:
    model = tiny_llama()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    add_bottleneck_adapters(model, BottleneckConfig(bottleneck_size=16, placement=placement))
    losses = train_steps(model, batch(), steps=8)
    assert losses[-1] < losses[0] - 0.1, losses
    for key, value in base_state.items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_save_then_load_reproduces_the_trained_outputs(tmp_path: Path, placement: str) -> None:
    config = BottleneckConfig(bottleneck_size=8, placement=placement, non_linearity="gelu")
    model = add_bottleneck_adapters(tiny_llama(seed=3), config)
    train_steps(model, batch(), steps=3)
    ids = batch(seed=2)
    trained = logits(model, ids)
    assert not torch.equal(trained, logits(tiny_llama(seed=3), ids))

    written = save_bottleneck_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in written) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert is_bottleneck_adapter_dir(tmp_path / "adapter")
    tensors = load_file(str(tmp_path / "adapter" / WEIGHTS_FILE))
    assert sum(t.numel() for t in tensors.values()) == bottleneck_parameter_count(HIDDEN, LAYERS, config)
    description = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert description["format"] == "kubetune.bottleneck"
    assert description["config"] == config.model_dump(mode="json")
    assert description["base_model"]["class"] == "LlamaForCausalLM"
    assert len(description["base_model"]["config_sha256"]) == 64

    reloaded = load_bottleneck_adapter(tiny_llama(seed=3), tmp_path / "adapter")
    assert torch.equal(logits(reloaded, ids), trained)
    assert trainable_names(reloaded) == []
    resumed = load_bottleneck_adapter(tiny_llama(seed=3), tmp_path / "adapter", trainable=True)
    assert len(trainable_names(resumed)) == len(tensors)


def test_directories_that_are_not_readable_adapters_are_rejected(tmp_path: Path) -> None:
    model = add_bottleneck_adapters(tiny_llama(), BottleneckConfig(bottleneck_size=4))
    save_bottleneck_adapter(model, tmp_path)
    config_path = tmp_path / CONFIG_FILE
    description = json.loads(config_path.read_text())

    assert not is_bottleneck_adapter_dir(tmp_path / "missing")
    config_path.write_text(json.dumps({**description, "format_version": 99}))
    assert not is_bottleneck_adapter_dir(tmp_path)
    with pytest.raises(BottleneckFormatError, match="format_version 99"):
        load_bottleneck_adapter(tiny_llama(), tmp_path)
    config_path.write_text(json.dumps({**description, "format": "peft"}))
    assert not is_bottleneck_adapter_dir(tmp_path)

    # Same format, but the adapter was saved for a wider bottleneck than the config now says.
    config_path.write_text(
        json.dumps({**description, "config": {**description["config"], "bottleneck_size": 8}})
    )
    with pytest.raises(BottleneckFormatError, match="has shape"):
        load_bottleneck_adapter(tiny_llama(), tmp_path)


def test_unsupported_architecture_is_named_in_the_error() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(
        UnsupportedArchitectureError, match=r"Encoder.*model\.layers\[i\]\.\{self_attn, mlp\}"
    ):
        add_bottleneck_adapters(Encoder(), BottleneckConfig())


def test_adding_adapters_twice_is_refused() -> None:
    model = add_bottleneck_adapters(tiny_llama(), BottleneckConfig(bottleneck_size=4))
    with pytest.raises(ValueError, match="already has bottleneck adapters"):
        add_bottleneck_adapters(model, BottleneckConfig(bottleneck_size=4))


def test_a_deep_copy_runs_its_own_adapters() -> None:
    model = add_bottleneck_adapters(tiny_llama(), BottleneckConfig(bottleneck_size=8))
    copied = copy.deepcopy(model)
    train_steps(copied, batch(), steps=2)
    ids = batch(seed=2)
    # The original's adapters are still zero, so it still computes the base model.
    assert torch.equal(logits(model, ids), logits(tiny_llama(), ids))
    assert not torch.equal(logits(copied, ids), logits(model, ids))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_still_trains_the_adapters(reentrant: bool) -> None:
    model = add_bottleneck_adapters(tiny_llama(), BottleneckConfig(bottleneck_size=8))
    # Reentrant checkpointing drops gradients when no input requires grad, which is the case with a
    # frozen base; transformers has to compensate for that.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    losses = train_steps(model, batch(), steps=4)
    assert losses[-1] < losses[0]


def test_config_rejects_unknown_fields_and_bad_values() -> None:
    with pytest.raises(ValueError):
        BottleneckConfig(bottleneck_size=0)
    with pytest.raises(ValueError):
        BottleneckConfig(placement="parallel")
    with pytest.raises(ValueError):
        BottleneckConfig(reduction_factor=16)
