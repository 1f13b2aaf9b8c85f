"""One job's plan for every method: parameters, peak memory per GPU, fit, time, cost, recommendation.

Pure: the caller reads the model's config.json (and, when it can, the dataset) and passes what it
found; :func:`plan_job` returns a :class:`JobPlan` whose :meth:`JobPlan.status` is ``status.plan``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kubetune.api import methods
from kubetune.api.methods import ModelShape, Settings
from kubetune.planner import compute
from kubetune.planner.compute import ComputeAssumptions, GpuType
from kubetune.planner.memory import MemoryEstimate, TrainingSetup, estimate_memory

GIB = 1024**3


@dataclass(frozen=True)
class JobFacts:
    """What the planner knows about a job."""

    shape: ModelShape
    method: str
    #: The job's settings blocks (absent blocks take their defaults).
    settings: Settings
    setup: TrainingSetup
    #: Memory per GPU the job may use: resources.gpuMemory, else the GPU type's.
    available_bytes: int | None = None
    gpu: GpuType | None = None
    #: Tokens in the training split, and how they were found ("counted", "estimated from size").
    dataset_tokens: int | None = None
    tokens_source: str = ""
    epochs: float = 3.0
    max_steps: int | None = None
    gradient_accumulation_steps: int = 1
    assumptions: ComputeAssumptions = field(default_factory=ComputeAssumptions)


@dataclass(frozen=True)
class MethodPlan:
    method: str
    total_parameters: int
    trainable_parameters: int
    memory: MemoryEstimate
    fits: bool | None
    tokens: int | None
    flops: float | None
    hours: float | None
    cost: float | None

    @property
    def trainable_percent(self) -> str:
        share = 100.0 * self.trainable_parameters / max(self.total_parameters, 1)
        return f"{share:.4g}%"

    def fields(self) -> dict[str, Any]:
        """The status.plan fields (camelCase), also one row of ``kubetune plan -o json``."""
        out: dict[str, Any] = {
            "method": self.method,
            "totalParameters": self.total_parameters,
            "trainableParameters": self.trainable_parameters,
            "trainablePercent": self.trainable_percent,
            "estimatedPeakMemory": format_bytes(self.memory.total),
            "estimatedPeakMemoryBytes": self.memory.total,
            "memoryBreakdown": {k: format_bytes(v) for k, v in self.memory.parts().items() if k != "total"},
        }
        if self.fits is not None:
            out["fits"] = self.fits
        if self.tokens is not None:
            out["trainingTokens"] = self.tokens
        if self.hours is not None:
            out["estimatedHours"] = round(self.hours, 3)
        if self.cost is not None:
            out["estimatedCost"] = f"${self.cost:,.2f}"
        return out


@dataclass(frozen=True)
class JobPlan:
    facts: JobFacts
    methods: dict[str, MethodPlan]
    recommendation: str

    @property
    def chosen(self) -> MethodPlan:
        return self.methods[self.facts.method]

    def status(self) -> dict[str, Any]:
        """``status.plan`` (camelCase): the chosen method's plan, the GPU it assumed, the recommendation."""
        out = {k: v for k, v in self.chosen.fields().items() if k != "method"}
        out["fits"] = bool(self.chosen.fits) if self.chosen.fits is not None else True
        if self.facts.available_bytes is not None:
            out["availableMemory"] = format_bytes(self.facts.available_bytes)
        if self.facts.gpu is not None:
            out["gpuType"] = self.facts.gpu.name
        if self.facts.tokens_source:
            out["tokensSource"] = self.facts.tokens_source
        out["recommendation"] = self.recommendation
        return out


def format_bytes(value: int) -> str:
    """A Kubernetes quantity in Gi with one decimal (Mi below 1 Gi)."""
    if value >= GIB:
        return f"{value / GIB:.1f}Gi"
    return f"{value / 1024**2:.0f}Mi"


def training_tokens(facts: JobFacts) -> int | None:
    setup = facts.setup
    if facts.max_steps is not None:
        # An upper bound: every sequence full.
        return facts.max_steps * facts.gradient_accumulation_steps * setup.gpus * setup.tokens
    if facts.dataset_tokens is None:
        return None
    return int(facts.epochs * facts.dataset_tokens)


def _plan_method(facts: JobFacts, name: str, settings: Settings) -> MethodPlan:
    info = methods.get(name)
    resolved = methods.settings_for(info, settings)
    trainable = info.trainable_parameters(facts.shape, resolved)
    memory = estimate_memory(facts.shape, name, resolved, facts.setup)
    fits = None if facts.available_bytes is None else memory.total <= facts.available_bytes
    tokens = training_tokens(facts)
    flops = hours = cost = None
    if tokens is not None:
        flops = compute.training_flops(
            facts.shape, info, trainable, tokens, facts.setup.seq_length, facts.setup.gradient_checkpointing
        )
        if facts.gpu is not None:
            hours = compute.hours(flops, facts.gpu, facts.setup.gpus, facts.assumptions.utilisation)
            cost = hours * facts.setup.gpus * facts.gpu.price_per_hour
    return MethodPlan(name, facts.shape.total_parameters, trainable, memory, fits, tokens, flops, hours, cost)


def plan_job(facts: JobFacts) -> JobPlan:
    """Every registered method on this job (the job's own method with its settings, the others with
    theirs where the job sets the block, else defaults), and a recommendation."""
    plans = {name: _plan_method(facts, name, facts.settings) for name in methods.METHOD_NAMES}
    return JobPlan(facts, plans, _recommend(facts, plans))


def _variants(setup: TrainingSetup, checkpointing_works: bool) -> list[tuple[str, TrainingSetup]]:
    """Changes that lower memory, least intrusive first: as is, gradient checkpointing, smaller batches."""
    batches = sorted(
        {b for b in (setup.batch_size // 2, setup.batch_size // 4, 1) if 1 <= b < setup.batch_size}
    )
    batches.reverse()
    checkpointing = [False, True] if checkpointing_works and not setup.gradient_checkpointing else [False]
    out: list[tuple[str, TrainingSetup]] = []
    for gc in checkpointing:
        for batch in [setup.batch_size, *batches]:
            changes = [
                c
                for c, on in (
                    ("gradientCheckpointing", gc),
                    (f"batchSize {batch}", batch != setup.batch_size),
                )
                if on
            ]
            variant = replace(
                setup, batch_size=batch, gradient_checkpointing=setup.gradient_checkpointing or gc
            )
            out.append((" and ".join(changes), variant))
    return out


def _recommend(facts: JobFacts, plans: dict[str, MethodPlan]) -> str:
    chosen = plans[facts.method]
    if facts.available_bytes is None:
        return (
            f"{facts.method} needs about {format_bytes(chosen.memory.total)} per GPU; set "
            "resources.gpuMemory (or a known GPU type) to check that it fits"
        )
    available = format_bytes(facts.available_bytes)
    if chosen.fits:
        return f"{facts.method} fits: about {format_bytes(chosen.memory.total)} of {available} per GPU"
    options: list[str] = []
    # The job's method first, then the others in registry order: the first change that fits each.
    for name in [facts.method, *(n for n in methods.METHOD_NAMES if n != facts.method)]:
        info = methods.get(name)
        for changes, variant in _variants(facts.setup, info.gradient_checkpointing):
            estimate = estimate_memory(facts.shape, name, facts.settings, variant)
            if estimate.total <= facts.available_bytes:
                what = name if name != facts.method else "the same method"
                options.append(
                    f"{what}{' with ' + changes if changes else ''} ({format_bytes(estimate.total)})"
                )
                break
    bigger = [
        gpu.name
        for gpu in facts.assumptions.gpu_table().values()
        if gpu.memory_bytes >= chosen.memory.total and gpu.memory_bytes > facts.available_bytes
    ]
    if bigger:
        options.append(f"{facts.method} as is on a GPU with more memory ({', '.join(bigger)})")
    if methods.get(facts.method).sharded_across_ranks:
        # The engine shards this method with FSDP across ranks: more GPUs do lower the memory per GPU.
        sharded_fit = next(
            (
                (n, checkpointing)
                for n in (2, 4, 8, 16, 32, 64)
                if n > facts.setup.gpus
                for checkpointing in sorted({facts.setup.gradient_checkpointing, True})
                if estimate_memory(
                    facts.shape,
                    facts.method,
                    facts.settings,
                    replace(facts.setup, gpus=n, sharding="fsdp", gradient_checkpointing=checkpointing),
                ).total
                <= facts.available_bytes
            ),
            None,
        )
        if sharded_fit is None:
            scale = "Sharded by FSDP across up to 64 GPUs it would not fit either."
        else:
            n, checkpointing = sharded_fit
            extra = (
                " with gradientCheckpointing"
                if checkpointing and not facts.setup.gradient_checkpointing
                else ""
            )
            scale = f"Sharded by FSDP across {n} GPUs (resources.nodes x gpusPerNode){extra} it would fit."
    else:
        scale = "More GPUs or nodes do not lower the memory per GPU: the workers replicate the model (DDP)."
    return (
        f"{facts.method} needs about {format_bytes(chosen.memory.total)} per GPU but {available} is "
        "available. "
        f"Would fit: {'; '.join(options) if options else 'nothing the planner tried'}. {scale}"
    )


# --------------------------------------------------------------------------------------------------
# Dataset tokens


def count_dataset_tokens(
    path: Path, max_seq_length: int, tokenizer_file: Path | None = None
) -> tuple[int, str]:
    """Tokens in a local dataset file: counted with the model's ``tokenizer.json`` when there is one
    (and the ``tokenizers`` package), else 4 characters per token over the records' text, else (not a
    JSON/JSONL file) the file size / 4. Each record counts at most ``max_seq_length`` tokens."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json"):
        return path.stat().st_size // 4, "estimated from file size"
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        loaded = json.loads(text)
        records = loaded if isinstance(loaded, list) else [loaded]
    texts = [_record_text(r) for r in records]
    encoder = _tokenizer(tokenizer_file)
    if encoder is not None:
        counts = [len(e.ids) for e in encoder.encode_batch(texts)]
        source = "counted with the model's tokenizer"
    else:
        counts = [max(1, len(t) // 4) for t in texts]
        source = "estimated at 4 characters per token"
    return sum(min(c, max_seq_length) for c in counts), source


def _record_text(record: Any) -> str:
    if not isinstance(record, dict):
        return str(record)
    if "messages" in record and isinstance(record["messages"], list):
        return "\n".join(str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict))
    parts = [record.get(key) for key in ("text", "prompt", "completion")]
    return "".join(str(p) for p in parts if p is not None)


def _tokenizer(path: Path | None) -> Any:
    if path is None or not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(str(path))
