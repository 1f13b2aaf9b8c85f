"""Peak training memory per GPU, by part, from a model shape, a method and the training setup.

What one optimizer step keeps alive, as the engine trains (``kubetune.worker.engine``):

* **weights**: full fine-tuning loads the model in fp32 (the fp32 master copy mixed precision
  needs; autocast computes in bf16/fp16), 4 bytes per parameter. Other methods load the frozen base
  in the compute dtype (2 bytes in bf16/fp16, 4 in fp32). QLoRA stores the ``nn.Linear`` weights of
  the decoder layers in 4 bits (0.5 byte) plus bitsandbytes' quantisation constants: one fp32
  absmax per 64 weights (1/16 byte per weight), or with double quantisation one byte per 64 weights
  plus one fp32 per 256 of those (1/64 + 1/4096 byte); ``prepare_model_for_kbit_training`` keeps
  everything else (embeddings, norms, lm_head, biases, fused MoE experts) in fp32. Adapter weights
  are fp32 (PEFT casts adapters up; kubetune's bottleneck adapters are fp32).
* **gradients**: one fp32 value per trainable parameter; DDP (more than one GPU) keeps a second copy
  in its communication buckets.
* **optimizer**: AdamW's two fp32 moments per trainable parameter (8 bytes).
* **activations**: what autograd saves for the backward pass, per token: per decoder layer
  ``6h + 2q + 2kv + 4i`` values when the base trains (h hidden width, q and kv the query and
  key/value widths, i the MLP width a token passes through; Qwen3's q/k norms add ``2q + 2kv``), and
  ``5h + q + 2kv + 4i`` over a frozen base (frozen norms and projections do not save their inputs),
  plus what the method saves (LoRA: rank per adapted layer and, with dropout, a dropped copy of each
  adapted layer's input; bottleneck adapters: their input and bottleneck); then ``3h + V`` for the
  final norm, the head and the loss (V the vocabulary: the fp32 log-softmax of the logits). With
  gradient checkpointing, each layer keeps only its input (h) and one layer is recomputed at a time.
  Values are 4 bytes in fp32, 2 under bf16/fp16 autocast (the loss's log-softmax stays fp32).
* **transient**: the logits' gradient (tokens x V, fp32) that exists at the start of the backward
  pass while the activations are still alive.
* **overhead**: a fixed 1 GiB per GPU for the CUDA context, cuBLAS/NCCL workspaces and allocator
  fragmentation (none on CPU). ``torch.cuda.max_memory_allocated`` does not see the CUDA context,
  ``nvidia-smi`` does.

The benchmark ``benchmarks/planner_memory.py`` compares weights + gradients + optimizer + activations
with the tensors one real step keeps alive (``benchmarks/results/planner_memory.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kubetune.api import methods
from kubetune.api.methods import MethodInfo, ModelShape, Settings

ComputePrecision = Literal["bf16", "fp16", "fp32"]
Sharding = Literal["ddp", "fsdp"]

GIB = 1024**3
#: Per-GPU memory outside PyTorch's allocator accounting; see the module docstring.
GPU_OVERHEAD_BYTES = 1 * GIB


@dataclass(frozen=True)
class TrainingSetup:
    """How the job trains: micro-batch and sequence per GPU, precision, checkpointing, parallelism."""

    batch_size: int = 4
    seq_length: int = 2048
    precision: ComputePrecision = "bf16"
    gradient_checkpointing: bool = False
    #: Data-parallel processes (nodes x GPUs per node); 1 for a single GPU or CPU.
    gpus: int = 1
    #: ddp replicates weights and optimizer on every GPU; fsdp shards them. The engine shards the
    #: methods whose ``sharded_across_ranks`` is set (full fine-tuning) and replicates the others.
    sharding: Sharding = "ddp"
    #: False for CPU training: no CUDA overhead.
    on_gpu: bool = True

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_length


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, by part (see the module docstring)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    transient: int
    overhead: int

    @property
    def state(self) -> int:
        """What tensor accounting of one step measures: weights, gradients, optimizer, activations."""
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def total(self) -> int:
        """The peak: everything, including the transient logits gradient and the fixed overhead."""
        return self.state + self.transient + self.overhead

    def parts(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "transient": self.transient,
            "overhead": self.overhead,
            "total": self.total,
        }


def _quantized_weight_bytes(parameters: int, settings: Settings) -> float:
    double_quant = bool(getattr(settings.get("quantization"), "double_quant", True))
    constants = 1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64
    return parameters * (0.5 + constants)


def weight_bytes(shape: ModelShape, info: MethodInfo, settings: Settings, setup: TrainingSetup) -> int:
    """Bytes of the model's weights and buffers as the engine loads them, plus the method's new weights."""
    base_bytes = 4 if info.trains_base or setup.precision == "fp32" else 2
    added = info.added_parameters(shape, settings)
    if info.quantized_base:
        quantized = sum(lin.weight_parameters for lin in shape.linears if lin.in_layers)
        rest = shape.total_parameters - quantized
        return int(_quantized_weight_bytes(quantized, settings) + 4 * rest + 4 * added)
    return base_bytes * shape.total_parameters + 4 * added


def activation_elements_per_token(
    shape: ModelShape, info: MethodInfo, settings: Settings, checkpointing: bool
) -> int:
    """Values autograd keeps per token (see the module docstring)."""
    h, layers = shape.hidden_size, shape.num_layers
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_key_value_heads * shape.head_dim
    i = shape.active_intermediate_size or shape.intermediate_size
    heads = shape.num_attention_heads
    if info.trains_base:
        per_layer = 6 * h + 2 * q + 2 * kv + 4 * i + heads + 2
    else:
        per_layer = 5 * h + q + 2 * kv + 4 * i + heads + 2
    if shape.qk_norm:
        per_layer += 2 * q + 2 * kv + heads + shape.num_key_value_heads
    per_layer += info.activation_elements(shape, settings)
    head = 3 * h + shape.vocab_size + 4
    if checkpointing and info.gradient_checkpointing:
        return layers * h + per_layer + head
    return layers * per_layer + head


def estimate_memory(
    shape: ModelShape, method: str, settings: Settings, setup: TrainingSetup
) -> MemoryEstimate:
    """Peak training memory per GPU for ``method`` with ``settings`` (its blocks; defaults where absent)."""
    info = methods.get(method)
    settings = methods.settings_for(info, settings)
    trainable = info.trainable_parameters(shape, settings)
    weights = weight_bytes(shape, info, settings, setup)
    gradients = 4 * trainable
    optimizer = 8 * trainable
    if setup.gpus > 1 and setup.sharding == "ddp":
        gradients *= 2  # DDP's buckets hold a second copy of the gradients
    elif setup.gpus > 1 and setup.sharding == "fsdp":
        # Fully sharded: each GPU holds 1/N of everything, plus the decoder layer being computed.
        per_layer = sum(lin.weight_parameters + lin.bias_parameters for lin in shape.linears) // max(
            shape.num_layers, 1
        )
        weights = weights // setup.gpus + 2 * per_layer
        gradients //= setup.gpus
        optimizer //= setup.gpus
    value_bytes = 4 if setup.precision == "fp32" else 2
    elements = activation_elements_per_token(shape, info, settings, setup.gradient_checkpointing)
    # The loss upcasts the logits: the V-wide part stays fp32 under autocast.
    vocab_part = shape.vocab_size
    activations = setup.tokens * ((elements - vocab_part) * value_bytes + vocab_part * 4)
    transient = setup.tokens * shape.vocab_size * 4
    overhead = GPU_OVERHEAD_BYTES if setup.on_gpu else 0
    return MemoryEstimate(weights, gradients, optimizer, activations, transient, overhead)
