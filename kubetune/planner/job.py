"""A FineTuneJob as the planner sees it: its model config, GPU, setup and dataset tokens.

Shared by the operator (``kubetune.operator.planning``) and ``kubetune plan``. Reading the model's
``config.json`` is the only I/O: file:// paths on this host, hf:// through huggingface_hub's cache
(config.json only).
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api import methods
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.planner.architecture import model_shape
from kubetune.planner.compute import ComputeAssumptions, GpuType
from kubetune.planner.memory import TrainingSetup
from kubetune.planner.plan import JobFacts, count_dataset_tokens

#: Node labels that name the GPU model (NVIDIA GPU feature discovery; GKE).
GPU_PRODUCT_LABELS = ("nvidia.com/gpu.product", "cloud.google.com/gke-accelerator")


@dataclass(frozen=True)
class PlannerSettings:
    """Operator-wide planner settings (operator flags, Helm values ``planner.*``)."""

    assumptions: ComputeAssumptions = field(default_factory=ComputeAssumptions)
    #: GPU type assumed for time, cost and (without resources.gpuMemory) memory when the job's
    #: nodeSelector names none; empty: unknown.
    default_gpu: str = ""
    #: Read hf:// configs from the Hub (config.json only, cached); off: cache only.
    hub_downloads: bool = True


class ModelConfigUnavailable(Exception):
    """The model's config.json could not be read (the reason is the message)."""


_QUANTITY = re.compile(r"^([0-9.]+)([KMGTPE]i?|[numk]|)$")
_FACTORS = {
    "": 1,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "Pi": 1024**5,
    "Ei": 1024**6,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "P": 1000**5,
    "E": 1000**6,
    "m": 0.001,
    "u": 1e-6,
    "n": 1e-9,
}


def quantity_bytes(value: str) -> int:
    """Bytes of a Kubernetes quantity such as 80Gi or 24G."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a memory quantity")
    return int(float(match.group(1)) * _FACTORS[match.group(2)])


def gpu_type_of(job: FineTuneJob, settings: PlannerSettings) -> GpuType | None:
    """The GPU model the job asks for by node label, else the operator's default; None if unknown."""
    selector = (job.spec.pod_template.node_selector if job.spec.pod_template else None) or {}
    table = settings.assumptions.gpu_table()
    for label in GPU_PRODUCT_LABELS:
        product = selector.get(label, "")
        if product:
            wanted = re.sub(r"[^a-z0-9]", "", product.lower())
            # Longest names first, so A100-80GB wins over A100 on "NVIDIA-A100-SXM4-80GB".
            for name in sorted(table, key=len, reverse=True):
                parts = [re.sub(r"[^a-z0-9]", "", p) for p in name.lower().split("-")]
                if all(part in wanted for part in parts):
                    return table[name]
    if settings.default_gpu:
        return settings.assumptions.gpu(settings.default_gpu)
    return None


def facts_for(job: FineTuneJob, config: dict[str, Any], settings: PlannerSettings) -> JobFacts:
    """The planner's view of a job whose model config is ``config`` (raises ConfigError/ValueError)."""
    spec = job.spec
    resources, training = spec.resources, spec.training
    on_gpu = resources.gpus_per_node > 0
    gpu = gpu_type_of(job, settings) if on_gpu else None
    available: int | None = None
    if on_gpu and resources.gpu_memory is not None:
        available = quantity_bytes(resources.gpu_memory)
    elif gpu is not None:
        available = gpu.memory_bytes
    precision = training.precision if training.precision != "auto" else ("bf16" if on_gpu else "fp32")
    setup = TrainingSetup(
        batch_size=training.batch_size,
        seq_length=training.max_seq_length,
        precision=precision,
        gradient_checkpointing=training.gradient_checkpointing,
        gpus=max(1, resources.nodes * resources.gpus_per_node),
        # What the engine does across ranks: FSDP for the methods that shard, else DDP.
        sharding="fsdp" if methods.get(spec.method.type).sharded_across_ranks else "ddp",
        on_gpu=on_gpu,
    )
    dataset_tokens, source = _dataset_tokens(job)
    settings_blocks = {
        b: getattr(spec.method, b) for b in methods.blocks() if getattr(spec.method, b) is not None
    }
    return JobFacts(
        shape=model_shape(config),
        method=spec.method.type,
        settings=settings_blocks,
        setup=setup,
        available_bytes=available,
        gpu=gpu,
        dataset_tokens=dataset_tokens,
        tokens_source=source,
        epochs=training.epochs * (1 - spec.dataset.eval_fraction),
        max_steps=training.max_steps,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        assumptions=settings.assumptions,
    )


def _dataset_tokens(job: FineTuneJob) -> tuple[int | None, str]:
    uri = job.spec.dataset.uri
    if not uri.startswith("file://"):
        return None, ""
    path = Path(uri.removeprefix("file://"))
    tokenizer = _local_model_dir(job.spec.model.uri)
    try:
        return count_dataset_tokens(
            path, job.spec.training.max_seq_length, tokenizer / "tokenizer.json" if tokenizer else None
        )
    except (OSError, ValueError):
        return None, ""


def _local_model_dir(uri: str) -> Path | None:
    if not uri.startswith("file://"):
        return None
    path = Path(uri.removeprefix("file://"))
    return path.parent if path.suffix == ".json" else path


#: Seconds a failed read is remembered: an unreachable Hub must not cost every reconcile pass a
#: network timeout.
FAILED_READ_TTL_S = 300.0
_failed_reads: dict[tuple[str, str | None], tuple[float, str]] = {}


def read_model_config(uri: str, revision: str | None, settings: PlannerSettings) -> dict[str, Any]:
    """The model's config.json (raises :class:`ModelConfigUnavailable` saying why not). Successes are
    cached for the process's life (a revision's config does not change), failures for
    :data:`FAILED_READ_TTL_S`."""
    key = (uri, revision)
    failed = _failed_reads.get(key)
    if failed is not None and time.monotonic() - failed[0] < FAILED_READ_TTL_S:
        raise ModelConfigUnavailable(failed[1])
    try:
        return dict(_read_model_config(uri, revision, settings.hub_downloads))
    except ModelConfigUnavailable as error:
        _failed_reads[key] = (time.monotonic(), str(error))
        raise


@functools.lru_cache(maxsize=256)
def _read_model_config(uri: str, revision: str | None, hub_downloads: bool) -> dict[str, Any]:
    try:
        if uri.startswith("file://"):
            path = Path(uri.removeprefix("file://"))
            text = (path if path.suffix == ".json" else path / "config.json").read_text(encoding="utf-8")
        elif uri.startswith("hf://"):
            from huggingface_hub import hf_hub_download

            local = hf_hub_download(
                uri.removeprefix("hf://"),
                "config.json",
                revision=revision,
                local_files_only=not hub_downloads,
            )
            text = Path(local).read_text(encoding="utf-8")
        else:
            scheme = uri.split("://", 1)[0]
            raise ModelConfigUnavailable(f"the operator does not read {scheme}:// models ({uri})")
        data = json.loads(text)
    except ModelConfigUnavailable:
        raise
    except ImportError as error:
        raise ModelConfigUnavailable(f"huggingface_hub is not installed in the operator ({error})") from error
    except (OSError, ValueError) as error:
        raise ModelConfigUnavailable(f"cannot read config.json of {uri}: {error}") from error
    except Exception as error:  # huggingface_hub's errors (offline, gated, missing) do not share a base
        raise ModelConfigUnavailable(
            f"cannot read config.json of {uri}: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(data, dict):
        raise ModelConfigUnavailable(f"config.json of {uri} is not a JSON object")
    return data
