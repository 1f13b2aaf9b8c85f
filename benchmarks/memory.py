"""Training memory of a method, measured by counting the tensors one optimizer step keeps alive.

On CPU the engine reports the process's peak RSS, which for a model of a few million parameters is
dominated by the Python/torch runtime itself (about 1 GB) and moves with allocator slack, so it cannot
show the difference between methods. This module builds the model exactly as the engine does (the
method registry's ``load_kwargs`` and ``build``), runs one forward/backward/AdamW step on a real batch, and
sums the bytes of distinct tensor storages in four groups:

* ``weights``: parameters and buffers (4-bit weights at their packed size);
* ``gradients``: ``.grad`` of the trainable parameters;
* ``optimizer``: AdamW's state tensors;
* ``activations``: tensors autograd saved for the backward pass, excluding those that are weights.

That is close to what ``torch.cuda.max_memory_allocated`` measures on a GPU (minus transient workspace),
and it is deterministic, so it needs no repeats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MEMORY_GROUPS = ("weights", "gradients", "optimizer", "activations")


def _storage_key(tensor: Any) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _sum_unique(tensors: list[Any], exclude: set[tuple[int, int]] | None = None) -> tuple[int, set[Any]]:
    seen: set[tuple[int, int]] = set()
    for tensor in tensors:
        key = _storage_key(tensor)
        if key[1] and (exclude is None or key not in exclude):
            seen.add(key)
    return sum(size for _, size in seen), seen


def measure_training_memory(
    model_dir: Path,
    method: dict[str, Any],
    train_file: Path,
    *,
    batch_size: int,
    max_seq_length: int,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> dict[str, int]:
    """Bytes per group (see the module docstring) and their ``total``, for one step of ``method``.

    ``method`` is the plan's ``method`` block; the batch is the first ``batch_size`` training records
    padded to their longest, on CPU in fp32 (what the engine chooses on CPU).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.worker import data
    from kubetune.worker.engine import collate
    from kubetune.worker.methods import BuildContext, get_method
    from kubetune.worker.plan import MethodSpec

    torch.manual_seed(seed)
    spec = MethodSpec.model_validate(method)
    registered = get_method(spec.type)
    context = BuildContext(gradient_checkpointing=False, device="cpu", compute_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, **registered.load_kwargs(spec, context)
    )
    model.config.use_cache = False
    model = registered.build(model, spec, context)
    model.train()

    records, fmt = data.load_records(train_file, "auto")
    examples, _ = data.tokenize_records(records[:batch_size], fmt, tokenizer, max_seq_length, train_file.name)
    batch = collate(examples, tokenizer.pad_token_id, torch.device("cpu"))

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate)
    saved: list[Any] = []

    def pack(tensor: Any) -> Any:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    loss.backward()
    optimizer.step()

    weight_tensors = [*model.parameters(), *model.buffers()]
    weights, weight_keys = _sum_unique(weight_tensors)
    gradients, _ = _sum_unique([p.grad for p in trainable if p.grad is not None])
    optimizer_tensors = [
        value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)
    ]
    optimizer_bytes, _ = _sum_unique(optimizer_tensors)
    activations, _ = _sum_unique([t for t in saved if torch.is_tensor(t)], exclude=weight_keys)
    result = {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer_bytes,
        "activations": activations,
    }
    result["total"] = sum(result.values())
    return result
