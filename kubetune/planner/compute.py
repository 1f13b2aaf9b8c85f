"""Training FLOPs, time and cost on a GPU type.

FLOPs per trained token, with N the parameters a token passes through (embeddings excluded, the
output head included; for MoE only the experts a token is routed to) and N_t the trainable ones:

* full fine-tuning: ``6N``, the usual count: 2N for the forward pass, 2N for the gradients with
  respect to activations, 2N for the gradients with respect to weights;
* a frozen base (LoRA, QLoRA, IA3, prefix, bottleneck adapters): ``4N + 6N_t``: the forward pass and
  the activation gradients still go through every layer (the adapters sit inside them), but weight
  gradients are computed only for the trainable parameters (2N_t, plus their own 4N_t of forward and
  activation-gradient work);
* plus attention over the sequence, ``12 L q S`` per token in training (PaLM's appendix B: q the
  query width, S the sequence), halved for causal masking;
* gradient checkpointing adds one more forward pass (``2N``).

QLoRA dequantises its weights in every matmul; that costs memory bandwidth, not FLOPs, and shows up
as a lower utilisation. Time is FLOPs / (GPUs x peak bf16 dense TFLOP/s x utilisation); the
utilisation and prices are assumptions that users override (operator flags / Helm values, CLI flags).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kubetune.api.methods import MethodInfo, ModelShape

MIB = 1024**2


@dataclass(frozen=True)
class GpuType:
    """A GPU model: memory as ``nvidia-smi`` reports it, dense bf16 peak, an on-demand price."""

    name: str
    memory_bytes: int
    #: Dense (no sparsity) bf16 tensor-core peak; fp16 for GPUs without bf16 (T4).
    peak_tflops: float
    #: USD per GPU-hour, a typical cloud on-demand list price (2025); override for your contract.
    price_per_hour: float


#: The GPU table. Memory in MiB as nvidia-smi reports it; peaks from NVIDIA's data sheets.
GPUS: dict[str, GpuType] = {
    gpu.name: gpu
    for gpu in (
        GpuType("T4", 15360 * MIB, 65.0, 0.35),
        GpuType("L4", 23034 * MIB, 121.0, 0.80),
        GpuType("A10G", 23028 * MIB, 70.0, 1.00),
        GpuType("A100-40GB", 40960 * MIB, 312.0, 3.00),
        GpuType("A100-80GB", 81920 * MIB, 312.0, 3.50),
        GpuType("H100", 81559 * MIB, 989.0, 4.50),
        GpuType("H200", 143771 * MIB, 989.0, 5.50),
    )
}

#: Model FLOPs utilisation assumed for fine-tuning (MFU): well-tuned LLM training reaches 0.4-0.5;
#: fine-tuning with small batches and adapters rarely does, so the default is conservative.
DEFAULT_UTILISATION = 0.35


@dataclass(frozen=True)
class ComputeAssumptions:
    """Overridable inputs of the time and cost estimate."""

    utilisation: float = DEFAULT_UTILISATION
    #: Price overrides by GPU name (USD per GPU-hour).
    prices: tuple[tuple[str, float], ...] = ()
    #: Extra or replaced GPU types.
    gpus: tuple[GpuType, ...] = ()

    def gpu_table(self) -> dict[str, GpuType]:
        table = dict(GPUS)
        table.update({gpu.name: gpu for gpu in self.gpus})
        for name, price in self.prices:
            if name not in table:
                raise ValueError(f"price for unknown GPU {name!r} (known: {', '.join(table)})")
            table[name] = replace(table[name], price_per_hour=price)
        return table

    def gpu(self, name: str) -> GpuType:
        table = self.gpu_table()
        for key, gpu in table.items():
            if key.lower() == name.lower():
                return gpu
        raise ValueError(f"unknown GPU type {name!r} (known: {', '.join(table)})")


def load_gpu_table(path: Path) -> tuple[GpuType, ...]:
    """GPU types from a JSON list of {name, memoryMiB, peakTflops, pricePerHour} (operator/CLI override)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    try:
        return tuple(
            GpuType(
                str(d["name"]), int(d["memoryMiB"]) * MIB, float(d["peakTflops"]), float(d["pricePerHour"])
            )
            for d in data
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: each GPU needs name, memoryMiB, peakTflops, pricePerHour ({exc})") from exc


def compute_parameters(shape: ModelShape) -> int:
    """Parameters one token's forward pass multiplies by: no embedding lookup, only routed experts."""
    n = shape.total_parameters - (0 if shape.tie_word_embeddings else shape.vocab_size * shape.hidden_size)
    if shape.num_experts and shape.expert_parameters:
        routed = shape.extra.get("experts_per_token", shape.num_experts)
        n -= shape.expert_parameters * (shape.num_experts - routed) // shape.num_experts
    return n


def training_flops(
    shape: ModelShape, info: MethodInfo, trainable: int, tokens: int, seq_length: int, checkpointing: bool
) -> float:
    """FLOPs to train on ``tokens`` tokens (see the module docstring for the formula)."""
    n = compute_parameters(shape)
    per_token = 6 * n if info.trains_base else 4 * n + 6 * trainable
    if checkpointing and info.gradient_checkpointing:
        per_token += 2 * n
    q = shape.num_attention_heads * shape.head_dim
    per_token += 12 * shape.num_layers * q * seq_length // 2
    return float(per_token) * tokens


def hours(flops: float, gpu: GpuType, gpus: int, utilisation: float) -> float:
    return flops / (gpus * gpu.peak_tflops * 1e12 * utilisation) / 3600


def add_assumption_arguments(parser: Any, prefix: str = "") -> None:
    """The GPU-table flags shared by ``kubetune plan`` and the operator (``prefix`` e.g. "planner-")."""
    parser.add_argument(
        f"--{prefix}utilisation",
        type=float,
        default=None,
        help=f"model FLOPs utilisation assumed for time and cost (0-1); default {DEFAULT_UTILISATION}",
    )
    parser.add_argument(
        f"--{prefix}gpu-price",
        action="append",
        default=[],
        metavar="GPU=USD",
        help="price per GPU-hour for a GPU type, e.g. H100=2.49 (repeatable)",
    )
    parser.add_argument(
        f"--{prefix}gpu-table",
        type=Path,
        default=None,
        help="JSON list of extra or replaced GPU types: {name, memoryMiB, peakTflops, pricePerHour}",
    )


def assumptions_from(args: Any, prefix: str = "") -> ComputeAssumptions:
    """The assumptions the flags of :func:`add_assumption_arguments` ask for (ValueError when bad)."""
    attr = prefix.replace("-", "_")
    utilisation = getattr(args, f"{attr}utilisation")
    if utilisation is not None and not 0 < utilisation <= 1:
        raise ValueError(f"--{prefix}utilisation must be in (0, 1], not {utilisation}")
    prices = []
    for item in getattr(args, f"{attr}gpu_price"):
        name, sep, price = item.partition("=")
        try:
            prices.append((name.strip(), float(price)))
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"--{prefix}gpu-price expects GPU=USD, e.g. H100=2.49, not {item!r}")
    table_file = getattr(args, f"{attr}gpu_table")
    assumptions = ComputeAssumptions(
        utilisation=utilisation if utilisation is not None else DEFAULT_UTILISATION,
        prices=tuple(prices),
        gpus=load_gpu_table(table_file) if table_file else (),
    )
    assumptions.gpu_table()  # an unknown GPU in --gpu-price fails here, at start-up
    return assumptions
