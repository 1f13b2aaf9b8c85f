"""The training engine: runs one :class:`~kubetune.worker.plan.TrainingPlan` to a published artifact.

Our own loop rather than ``transformers.Trainer``, for three reasons: throughput (packing and
length-grouped batches, with tokens/s counted on real tokens only), exact resume (the data order is a
pure function of ``(seed, epoch)``, so a checkpoint only needs the optimizer step), and control over what
is published and when. It is torchrun-compatible: with ``WORLD_SIZE > 1`` in the environment it joins the
process group (NCCL on GPUs, gloo on CPU), wraps the model in DDP and gives each rank its own share of
the batches.

Order of work, cheapest failure first: the output location, then the data (read and checked in
seconds), then the model, then training. Checkpoints go to ``<work_dir>/checkpoints/step-NNNNNNNN``
(written as ``.tmp`` and renamed, so a directory without the suffix is complete); a restarted run resumes
from the newest one whose plan fingerprint matches. SIGTERM (preemption, eviction) saves a checkpoint
before exiting with code 143.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import shutil
import signal
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

import kubetune
from kubetune.worker import artifact, data, distributed, sources
from kubetune.worker.errors import (
    KubetuneError,
    ModelInvalid,
    ModelNotFound,
    OutOfMemory,
    OutputError,
    PeerLost,
    PlanInvalid,
    Preempted,
    TrainingDiverged,
)
from kubetune.worker.methods import BuildContext, TrainingMethod, get_method
from kubetune.worker.plan import TrainingPlan
from kubetune.worker.progress import ProgressReporter

logger = logging.getLogger("kubetune.train")

CHECKPOINT_PREFIX = "step-"


# --------------------------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (world size 1 without torchrun)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (identity when alone)."""
        if self.world_size == 1:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()


def cpu_budget(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: the affinity mask, capped by the CPU quota of its cgroup (a pod's
    limit), read from cgroup v2 (``cpu.max``) or, on nodes still on cgroup v1, from the cpu
    controller (``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``; -1 means no quota)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota: str | None = None
    period: str | None = None
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        for controller in ("cpu", "cpu,cpuacct"):
            try:
                quota = (cgroup_root / controller / "cpu.cfs_quota_us").read_text().strip()
                period = (cgroup_root / controller / "cpu.cfs_period_us").read_text().strip()
                break
            except OSError:
                continue
    try:
        if quota is not None and period is not None and quota not in ("max", "-1"):
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except ValueError:
        pass
    return max(1, cpus)


def configure_threads(local_world_size: int) -> int:
    """Set torch's intra-op threads to this process's share of the CPU budget, unless OMP_NUM_THREADS is set.

    torch defaults to every core of the node, not of the pod: under a CPU limit, or with several ranks
    per node, the oversubscribed threads spend their time waiting on each other.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = max(1, cpu_budget() // max(1, local_world_size))
    torch.set_num_threads(threads)
    return threads


def init_distributed() -> Distributed:
    """Read the torchrun environment and join the process group if there is more than one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30)
        )
    return Distributed(rank, world_size, local_rank, device)


@dataclass(frozen=True)
class Precision:
    """``autocast`` is the dtype of the forward pass (None = plain fp32); ``load`` the frozen base's."""

    name: str
    autocast: torch.dtype | None
    load: torch.dtype
    scaler: bool


def choose_precision(requested: str, device: torch.device, method: str) -> Precision:
    """Resolve ``auto``: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU.

    Full fine-tuning keeps fp32 master weights; the other methods load their frozen base in the
    compute dtype, which is where their memory saving comes from.
    """
    if requested == "auto":
        if device.type == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            requested = "fp32"
    if requested == "fp32":
        return Precision("fp32", None, torch.float32, False)
    if requested == "fp16" and device.type != "cuda":
        raise PlanInvalid("training.precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    dtype = torch.bfloat16 if requested == "bf16" else torch.float16
    return Precision(requested, dtype, torch.float32 if method == "full" else dtype, requested == "fp16")


def plan_fingerprint(plan: TrainingPlan) -> str:
    """Hash of everything that makes a checkpoint reusable; intervals and reporting may change."""
    training = plan.training.model_dump(
        exclude={"checkpoint_every_steps", "keep_checkpoints", "eval_every_steps", "logging_every_steps"}
    )
    payload = {
        "model": plan.model.model_dump(exclude={"token_env"}),
        "dataset": plan.dataset.model_dump(),
        "method": plan.method.model_dump(),
        "training": training,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def resolve_locations(plan: TrainingPlan) -> tuple[Path | None, Path]:
    """The final local artifact path (None for remote outputs) and the work directory."""
    final = sources.local_path(plan.output.uri, plan.storage)
    if plan.output.work_dir:
        work = Path(plan.output.work_dir)
    elif final is not None:
        work = final.parent / f".{final.name}.kubetune"
    else:
        work = Path(plan.storage.cache_dir) / "work" / plan.name
    return final, work


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None  # packed blocks: restart per record, no padding

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for the model's forward.

        A packed batch passes position ids and *no* attention mask: that is how transformers recognises
        packed records and masks attention between them.
        """
        if self.position_ids is not None:
            # A cache object would make transformers skip the packed-sequence mask.
            return {
                "input_ids": self.input_ids,
                "position_ids": self.position_ids,
                "labels": self.labels,
                "use_cache": False,
            }
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def label_tokens(self) -> int:
        return int((self.labels[:, 1:] != data.IGNORE_INDEX).sum())


def collate(
    examples: Sequence[data.Example], pad_id: int, device: torch.device, *, packed_attention: bool = True
) -> Batch:
    """Right-pad to the longest example of the batch (packed blocks are all the same length).

    With ``packed_attention`` and position ids on every example, the batch carries them so that records
    packed into one block do not attend to each other.
    """
    width = max(len(e) for e in examples)
    if packed_attention and all(e.position_ids is not None and len(e) == width for e in examples):
        return Batch(
            torch.tensor([e.input_ids for e in examples], device=device),
            torch.ones((len(examples), width), dtype=torch.long, device=device),
            torch.tensor([e.labels for e in examples], device=device),
            torch.tensor([e.position_ids for e in examples], device=device),
        )
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), data.IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example)] = torch.tensor(example.input_ids)
        labels[row, : len(example)] = torch.tensor(example.labels)
        mask[row, : len(example)] = 1
    return Batch(ids.to(device), mask.to(device), labels.to(device))


class EpochFeeder:
    """The micro-batches of each epoch for one rank; a pure function of (seed, epoch, rank)."""

    def __init__(self, examples: Sequence[data.Example], plan: TrainingPlan, dist: Distributed) -> None:
        self.examples = examples
        self.training = plan.training
        self.dist = dist
        self._cache: tuple[int, list[list[data.Example]]] | None = None
        self.micro_per_rank = len(self._epoch_batches(0))
        accumulation = self.training.gradient_accumulation_steps
        self.steps_per_epoch = max(1, self.micro_per_rank // accumulation)

    def _epoch_batches(self, epoch: int) -> list[list[data.Example]]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        t = self.training
        if t.packing:
            blocks = data.pack_examples(self.examples, t.max_seq_length, t.seed, epoch)
            batches = [blocks[i : i + t.batch_size] for i in range(0, len(blocks), t.batch_size)]
        else:
            lengths = [len(e) for e in self.examples]
            index_batches = data.batch_indices(lengths, t.batch_size, t.seed, epoch, t.group_by_length)
            batches = [[self.examples[i] for i in batch] for batch in index_batches]
        world, rank = self.dist.world_size, self.dist.rank
        # Every rank needs the same number of micro-batches or DDP would wait forever.
        per_rank = max(1, len(batches) // world)
        mine = [batches[(rank + world * i) % len(batches)] for i in range(per_rank)]
        self._cache = (epoch, mine)
        return mine

    def window(self, step: int) -> list[list[data.Example]]:
        """The micro-batches making up optimizer step ``step`` (0-based, counted from the run start)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        batches = self._epoch_batches(epoch)
        accumulation = self.training.gradient_accumulation_steps
        if self.micro_per_rank < accumulation:
            return batches
        return batches[index * accumulation : (index + 1) * accumulation]


# --------------------------------------------------------------------------------------------- model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; 4-bit weights count as the values they hold, not bytes."""
    total = trainable = 0
    for parameter in model.parameters():
        count = parameter.numel()
        if type(parameter).__name__ == "Params4bit":
            count *= 2  # two 4-bit values per stored uint8
        total += count
        if parameter.requires_grad:
            trainable += count
    return total, trainable


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory in bytes, and what was measured."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"


def load_tokenizer(model_dir: Path, plan: TrainingPlan) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=plan.model.trust_remote_code)
    except Exception as exc:
        raise ModelInvalid(
            f"{plan.model.uri}: cannot load the tokenizer: {type(exc).__name__}: {exc}"
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model_dir: Path, plan: TrainingPlan, precision: Precision, extra: dict[str, Any]
) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise ModelNotFound(f"{plan.model.uri}: no weights (*.safetensors) in the model directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=precision.load, trust_remote_code=plan.model.trust_remote_code, **extra
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelInvalid(f"{plan.model.uri}: cannot load the model: {type(exc).__name__}: {exc}") from exc
    return model


def config_sha256(model_dir: Path) -> str | None:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", None)
    return (
        inner if isinstance(model, torch.nn.parallel.DistributedDataParallel) and inner is not None else model
    )


def autocast(device: torch.device, precision: Precision) -> AbstractContextManager[Any]:
    if precision.autocast is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.autocast)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: Sequence[data.Example],
    batch_size: int,
    pad_id: int,
    dist: Distributed,
    precision: Precision,
) -> float | None:
    """Token-weighted mean loss (nats/token); each rank takes every world_size-th example.

    A sharded model's forward is a collective, so there every rank runs as many batches as the rank
    with the most, repeating one of its examples (not counted) where it has run out.
    """
    if not examples:
        return None
    was_training = model.training
    model.eval()
    mine = sorted(examples[dist.rank :: dist.world_size], key=len)
    starts = list(range(0, len(mine), batch_size))
    if distributed.is_sharded(model):
        most = math.ceil(len(examples) / dist.world_size)
        starts += [-1] * (math.ceil(most / batch_size) - len(starts))
    loss_sum = tokens = 0.0
    for start in starts:
        batch = collate(mine[start : start + batch_size] if start >= 0 else examples[:1], pad_id, dist.device)
        with autocast(dist.device, precision):
            output = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
            )
        if start < 0:
            continue
        loss_sum += float(output.loss) * batch.label_tokens
        tokens += batch.label_tokens
    model.train(was_training)
    loss_sum, tokens = dist.all_sum([loss_sum, tokens])
    return loss_sum / tokens if tokens else None


# ---------------------------------------------------------------------------------------- checkpoints


def _lr_lambda(plan: TrainingPlan, total_steps: int) -> Any:
    warmup = int(plan.training.warmup_ratio * total_steps)
    kind = plan.training.lr_scheduler

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (an interrupted write keeps its ``.tmp`` suffix)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [
        p
        for p in checkpoint_dir.iterdir()
        if p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
        if (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    state: dict[str, Any],
    keep: int,
    dist: Distributed | None = None,
) -> Path:
    """Write the trainable weights, optimizer and scheduler state and ``state.json``, then rename.

    A replicated model is saved by rank 0 alone. A sharded one (FSDP) is saved by every rank: each
    writes its shards of the weights and optimizer state (:func:`distributed.save_shards`), then
    rank 0 the rest and the rename; ``state.json`` records the world size the shards belong to.
    """
    from safetensors.torch import save_file

    sharded = distributed.is_sharded(model)
    main = dist is None or dist.is_main
    final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    temporary = checkpoint_dir / f"{final.name}.tmp"
    if main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    if sharded:
        assert dist is not None
        dist.barrier()
        distributed.save_shards(model, optimizer, temporary)
        dist.barrier()
        if not main:
            return final
    else:
        weights = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, temporary / "trainable.safetensors")
    torch.save(
        {
            "optimizer": None if sharded else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        temporary / "optimizer.pt",
    )
    world_size = dist.world_size if dist is not None else 1
    (temporary / "state.json").write_text(
        json.dumps({"step": step, "world_size": world_size, **state}, indent=2), encoding="utf-8"
    )
    if final.exists():
        shutil.rmtree(final)
    os.rename(temporary, final)
    for old in list_checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    world_size: int = 1,
) -> dict[str, Any]:
    """Load a checkpoint into the model and optimizer. A sharded (FSDP) checkpoint loads only into a
    sharded model on the world size that wrote it: the data order, and with it what the next step
    reads, depends on the world size too, so a different one would not continue the same run."""
    from safetensors.torch import load_file

    state: dict[str, Any] = json.loads((path / "state.json").read_text(encoding="utf-8"))
    saved_world = int(state.get("world_size") or 1)
    sharded = (path / distributed.SHARDS_DIR).is_dir()
    if sharded != distributed.is_sharded(model) or (sharded and saved_world != world_size):
        raise PlanInvalid(
            f"checkpoint {path.name} was written by {saved_world} rank(s)"
            f"{' as FSDP shards' if sharded else ''} and this run has {world_size}: resume full "
            f"fine-tuning with the same resources.nodes and resources.gpusPerNode, or delete "
            f"{path.parent} to start over"
        )
    if saved_world != world_size:
        logger.warning(
            "checkpoint %s was written by %d rank(s), this run has %d: the global batch, and so the "
            "data each remaining step reads, changes",
            path.name,
            saved_world,
            world_size,
        )
    if sharded:
        distributed.load_shards(model, optimizer, path)
    else:
        weights = load_file(path / "trainable.safetensors")
        parameters = dict(model.named_parameters())
        missing = [n for n, p in parameters.items() if p.requires_grad and n not in weights]
        if missing:
            raise ModelInvalid(
                f"checkpoint {path.name} lacks {missing[0]}; delete the work dir to start over"
            )
        with torch.no_grad():
            for name, tensor in weights.items():
                parameters[name].copy_(tensor)
    extra = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if extra["optimizer"] is not None:
        optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    if scaler is not None and extra["scaler"] is not None:
        scaler.load_state_dict(extra["scaler"])
    torch.set_rng_state(extra["torch_rng"])
    if extra["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return state


# ---------------------------------------------------------------------------------------------- run


@dataclass
class _Window:
    """Sums over the current logging window."""

    loss_sum: float = 0.0
    label_tokens: float = 0.0
    real_tokens: float = 0.0
    started: float = field(default_factory=time.monotonic)


class _Signals:
    """Turns SIGTERM into a flag the loop checks after each optimizer step."""

    def __init__(self) -> None:
        self.terminate = False
        self._previous: Any = None

    def __enter__(self) -> _Signals:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. called from a test runner thread)
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.terminate = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _load_dataset_records(plan: TrainingPlan) -> dict[str, Any]:
    """Read and check every dataset file before the model is touched (fail fast)."""
    dataset = plan.dataset
    train_path = sources.resolve_file(dataset.uri, plan.storage)
    records, fmt = data.load_records(train_path, dataset.format)
    if dataset.eval_uri:
        eval_path = sources.resolve_file(dataset.eval_uri, plan.storage)
        eval_records, _ = data.load_records(eval_path, fmt)
    else:
        records, eval_records = data.split_eval(records, dataset.eval_fraction, plan.training.seed)
    if dataset.max_examples is not None:
        records = records[: dataset.max_examples]
    retention: tuple[list[data.Record], str, Path] | None = None
    if dataset.retention_uri:
        retention_path = sources.resolve_file(dataset.retention_uri, plan.storage)
        retention_records, retention_format = data.load_records(retention_path, "auto")
        retention = (retention_records[: dataset.retention_max_examples], retention_format, retention_path)
    return {
        "train": records,
        "eval": eval_records,
        "format": fmt,
        "train_path": train_path,
        "retention": retention,
    }


def train(plan: TrainingPlan) -> dict[str, Any]:
    """Run ``plan`` to completion and return the manifest (rank 0) or ``{}`` (other ranks).

    Raises :class:`~kubetune.worker.errors.KubetuneError` subclasses for failures a user can act on.
    If the output already holds this plan's artifact the run is a no-op returning its manifest, so a
    restarted pod whose predecessor finished does not train twice; another plan's artifact there is an
    :class:`~kubetune.worker.errors.OutputError`.
    """
    started = time.monotonic()
    dist = init_distributed()
    final, work_dir = resolve_locations(plan)
    progress_file = Path(plan.progress.file) if plan.progress.file else work_dir / "progress.json"
    reporter = ProgressReporter(
        file=progress_file, port=plan.progress.port, host=plan.progress.host, active=dist.is_main
    )
    try:
        with _Signals() as signals:
            return _train(plan, dist, final, work_dir, reporter, signals, started)
    except torch.OutOfMemoryError as exc:
        reporter.update(phase="failed", message="OutOfMemory")
        raise OutOfMemory(
            f"out of accelerator memory ({str(exc).splitlines()[0]}); lower training.batch_size or "
            "max_seq_length, enable gradient checkpointing, or use qlora"
        ) from exc
    except MemoryError as exc:
        reporter.update(phase="failed", message="OutOfMemory")
        raise OutOfMemory(
            "out of host memory; lower batch_size or max_seq_length, or raise the limit"
        ) from exc
    except KubetuneError as exc:
        reporter.update(phase="failed", message=exc.termination_message())
        raise
    except (torch_dist.DistError, RuntimeError) as exc:
        if dist.world_size == 1 or not _peer_gone(exc):
            raise
        lost = PeerLost(f"another rank of the group stopped: {str(exc).splitlines()[0][:300]}")
        reporter.update(phase="failed", message=lost.termination_message())
        raise lost from exc
    finally:
        reporter.close()
        if dist.world_size > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _peer_gone(error: BaseException) -> bool:
    """Whether a collective failed because another rank went away (gloo and NCCL say it in words)."""
    if isinstance(error, torch_dist.DistError):
        return True
    text = str(error).lower()
    return any(s in text for s in ("connection closed by peer", "connection reset by peer", "broken pipe"))


def _train(
    plan: TrainingPlan,
    dist: Distributed,
    final: Path | None,
    work_dir: Path,
    reporter: ProgressReporter,
    signals: _Signals,
    started: float,
) -> dict[str, Any]:
    from transformers import set_seed

    training = plan.training
    reporter.update(phase="loading", world_size=dist.world_size)
    if final is not None and artifact.check_output_free(final):
        existing = artifact.read_manifest(final) or {}
        # Only this plan's own artifact counts as done; another job's must not be passed off as ours.
        if existing.get("plan_fingerprint") != plan_fingerprint(plan):
            raise OutputError(
                f"{final}: holds the artifact of a different training plan; choose another output"
            )
        logger.info("%s already holds this plan's artifact; nothing to do", final)
        reporter.update(phase="succeeded", message="already published")
        return existing

    loaded = _load_dataset_records(plan)
    model_dir = sources.resolve_model(plan.model.uri, plan.model.revision, plan.model.token_env, plan.storage)
    tokenizer = load_tokenizer(model_dir, plan)
    train_name = Path(plan.dataset.uri).name
    train_examples, dropped = data.tokenize_records(
        loaded["train"], loaded["format"], tokenizer, training.max_seq_length, train_name
    )
    eval_examples: list[data.Example] = []
    if loaded["eval"]:
        eval_examples, _ = data.tokenize_records(
            loaded["eval"], loaded["format"], tokenizer, training.max_seq_length, f"{train_name} (eval)"
        )
    retention_examples: list[data.Example] = []
    if loaded["retention"] is not None:
        records, fmt, path = loaded["retention"]
        retention_examples, _ = data.tokenize_records(
            records, fmt, tokenizer, training.max_seq_length, path.name
        )

    method = get_method(plan.method.type)
    precision = choose_precision(training.precision, dist.device, method.name)
    checkpointing = training.gradient_checkpointing and method.gradient_checkpointing
    context = BuildContext(checkpointing, dist.device.type, precision.autocast or torch.float32)
    set_seed(training.seed)
    model = load_model(model_dir, plan, precision, method.load_kwargs(plan.method, context))
    model = _build(model, method, plan, context, checkpointing, dist)
    total_params, trainable_params = count_parameters(model)
    sharded = dist.world_size > 1 and method.name in distributed.SHARDED_METHODS
    if sharded:
        model = distributed.shard_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ModelInvalid(f"method {method.name} left no trainable parameter in {type(model).__name__}")
    logger.info(
        "method %s: %d of %d parameters trainable (%.4f%%)",
        method.name,
        trainable_params,
        total_params,
        100.0 * trainable_params / total_params,
    )

    feeder = EpochFeeder(train_examples, plan, dist)
    total_steps = training.max_steps or max(1, math.ceil(training.epochs * feeder.steps_per_epoch))
    # The fused kernel updates every tensor in one pass (CPU and CUDA); the default on CPU loops in Python.
    # Sharded parameters (DTensors) take the default implementation.
    fused = not sharded and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in trainable)
    optimizer = torch.optim.AdamW(
        trainable, lr=training.learning_rate, weight_decay=training.weight_decay, fused=fused or None
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(plan, total_steps))
    scaler = torch.amp.GradScaler(dist.device.type) if precision.scaler else None
    pad_id = tokenizer.pad_token_id

    fingerprint = plan_fingerprint(plan)
    checkpoint_dir = work_dir / "checkpoints"
    start_step, carried = _resume(checkpoint_dir, fingerprint, model, optimizer, scheduler, scaler, dist)
    if start_step:
        logger.info("resumed from checkpoint at step %d of %d", start_step, total_steps)
    reporter.update(total_steps=total_steps, step=start_step, resumed_from_step=start_step or None)

    if start_step == 0:
        reporter.update(phase="evaluating")
        carried = {
            "eval_loss_before": evaluate(model, eval_examples, training.batch_size, pad_id, dist, precision),
            "retention_loss_before": evaluate(
                model, retention_examples, training.batch_size, pad_id, dist, precision
            ),
            "train_tokens": 0.0,
            "train_seconds": 0.0,
            "first_loss": None,
            "loss_curve": [],
        }
        artifact.record_loss_point(carried["loss_curve"], 0, eval_loss=carried["eval_loss_before"])
    # (step, loss, eval loss) for the manifest; a checkpoint written before the curve existed has none.
    curve: list[dict[str, Any]] = carried.setdefault("loss_curve", [])

    writer = _tensorboard(work_dir / "tensorboard") if dist.is_main else None
    ddp_model: torch.nn.Module = model
    if dist.world_size > 1 and not sharded:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )
    ddp_model.train()
    reporter.update(phase="training")

    window = _Window()
    loss_value: float | None = None
    eval_loss: float | None = carried.get("eval_loss_before")
    loop_started = time.monotonic()
    for step in range(start_step, total_steps):
        micro_batches = [
            collate(examples, pad_id, dist.device, packed_attention=method.packed_attention)
            for examples in feeder.window(step)
        ]
        window_labels = sum(b.label_tokens for b in micro_batches) or 1
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            sync: AbstractContextManager[Any] = nullcontext()
            if not last and isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
                sync = ddp_model.no_sync()  # gradients are all-reduced once per optimizer step
            if sharded:
                ddp_model.set_requires_gradient_sync(last)  # type: ignore[operator]
            with sync:
                with autocast(dist.device, precision):
                    output = ddp_model(**batch.model_inputs())
                    # Weighted so the step's gradient is the mean over all its label tokens.
                    loss = output.loss * (batch.label_tokens / window_labels)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {float(loss)} at step {step + 1}; lower training.learning_rate"
                    )
                (scaler.scale(loss) if scaler is not None else loss).backward()
            window.loss_sum += float(output.loss.detach()) * batch.label_tokens
            window.label_tokens += batch.label_tokens
            window.real_tokens += batch.real_tokens
        if scaler is not None:
            scaler.unscale_(optimizer)
        if training.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, training.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        steps_this_run = done - start_step

        if done % training.logging_every_steps == 0 or done == total_steps or done == start_step + 1:
            loss_sum, labels, real = dist.all_sum([window.loss_sum, window.label_tokens, window.real_tokens])
            elapsed = time.monotonic() - window.started
            loss_value = loss_sum / labels if labels else None
            if carried.get("first_loss") is None:
                carried["first_loss"] = loss_value
            carried["train_tokens"] += real
            artifact.record_loss_point(curve, done, loss=loss_value)
            carried["train_seconds"] += elapsed
            per_step = (time.monotonic() - loop_started) / steps_this_run
            report = reporter.update(
                step=done,
                epoch=done / feeder.steps_per_epoch,
                loss=loss_value,
                learning_rate=scheduler.get_last_lr()[0],
                tokens_per_second=real / elapsed if elapsed > 0 else None,
                eta_seconds=per_step * (total_steps - done),
            )
            log = logger.info if dist.is_main else logger.debug  # one progress line per job, not per rank
            log(
                "step %d/%d epoch %.2f loss %.4f lr %.2e tokens/s %.0f",
                done,
                total_steps,
                report.epoch,
                loss_value or float("nan"),
                report.learning_rate or 0.0,
                report.tokens_per_second or 0.0,
            )
            if writer is not None:
                writer.add_scalar("train/loss", loss_value, done)
                writer.add_scalar("train/learning_rate", report.learning_rate, done)
                writer.add_scalar("train/tokens_per_second", report.tokens_per_second, done)
            window = _Window()
        if training.eval_every_steps and done % training.eval_every_steps == 0 and done < total_steps:
            eval_loss = evaluate(model, eval_examples, training.batch_size, pad_id, dist, precision)
            reporter.update(eval_loss=eval_loss)
            artifact.record_loss_point(curve, done, eval_loss=eval_loss)
            if writer is not None and eval_loss is not None:
                writer.add_scalar("eval/loss", eval_loss, done)
            window.started = time.monotonic()  # evaluation time is not training throughput
        save_now = training.checkpoint_every_steps and done % training.checkpoint_every_steps == 0
        # Every rank must agree, or the ones that stop would leave the others waiting in all-reduce.
        preempted = dist.all_sum([1.0 if signals.terminate else 0.0])[0] > 0
        if (save_now or preempted) and done < total_steps:
            # Window counts not yet logged are folded in so throughput stays right across a resume.
            snapshot = dict(carried)
            snapshot["train_tokens"] += dist.all_sum([window.real_tokens])[0]
            snapshot["train_seconds"] += time.monotonic() - window.started
            if dist.is_main or sharded:
                save_checkpoint(
                    checkpoint_dir,
                    done,
                    model,
                    optimizer,
                    scheduler,
                    scaler,
                    {"fingerprint": fingerprint, "carried": snapshot},
                    training.keep_checkpoints,
                    dist,
                )
            dist.barrier()
            if preempted:
                raise Preempted(f"stopped by SIGTERM at step {done}; checkpoint saved, rerun to resume")

    reporter.update(phase="evaluating")
    eval_loss = evaluate(model, eval_examples, training.batch_size, pad_id, dist, precision)
    retention_after = evaluate(model, retention_examples, training.batch_size, pad_id, dist, precision)
    reporter.update(eval_loss=eval_loss)
    artifact.record_loss_point(curve, total_steps, eval_loss=eval_loss)
    if writer is not None:
        if eval_loss is not None:
            writer.add_scalar("eval/loss", eval_loss, total_steps)
        writer.close()

    # Every rank takes part in gathering the sharded weights; rank 0 receives them.
    full_state = distributed.full_state_dict(model) if sharded else None
    manifest: dict[str, Any] = {}
    if dist.is_main:
        reporter.update(phase="publishing")
        memory, memory_kind = peak_memory(dist.device)
        retention_before = carried.get("retention_loss_before")
        metrics = {
            "total_parameters": total_params,
            "trainable_parameters": trainable_params,
            "trainable_percent": 100.0 * trainable_params / total_params,
            "peak_memory_bytes": memory,
            "peak_memory_kind": memory_kind,
            "tokens_per_second": carried["train_tokens"] / carried["train_seconds"]
            if carried["train_seconds"]
            else None,
            "train_tokens": int(carried["train_tokens"]),
            "train_seconds": carried["train_seconds"],
            "train_loss_first": carried.get("first_loss"),
            "train_loss": loss_value,
            "eval_loss_before": carried.get("eval_loss_before"),
            "eval_loss": eval_loss,
            "retention_loss_before": retention_before,
            "retention_loss_after": retention_after,
            "retention_delta": retention_after - retention_before
            if retention_after is not None and retention_before is not None
            else None,
            "steps": total_steps,
            "epochs": total_steps / feeder.steps_per_epoch,
            "resumed_from_step": start_step or None,
            "world_size": dist.world_size,
            "precision": precision.name,
            "wall_seconds": None,  # filled just before the manifest is written
        }
        manifest = _publish(
            plan,
            method,
            model,
            tokenizer,
            model_dir,
            loaded,
            final,
            work_dir,
            metrics,
            curve,
            dropped,
            started,
            full_state,
        )
        # The artifact supersedes the checkpoints; a restart now finds the artifact and stops early.
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        reporter.update(phase="succeeded", message=f"published {plan.output.uri}")
    dist.barrier()
    return manifest


def _build(
    model: Any,
    method: TrainingMethod,
    plan: TrainingPlan,
    context: BuildContext,
    checkpointing: bool,
    dist: Distributed,
) -> torch.nn.Module:
    if checkpointing and not method.info.quantized_base:  # k-bit preparation enables it itself
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False  # caches are for generation; in training they only cost memory
    try:
        built = method.build(model, plan.method, context)
    except KubetuneError:
        raise
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise ModelInvalid(f"method {method.name} cannot adapt {type(model).__name__}: {exc}") from exc
    if getattr(built, "hf_quantizer", None) is None and not getattr(built, "is_loaded_in_4bit", False):
        built = built.to(dist.device)
    return built


def _resume(
    checkpoint_dir: Path,
    fingerprint: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    dist: Distributed,
) -> tuple[int, dict[str, Any]]:
    """Load the newest matching checkpoint; rank 0 chooses, the others follow."""
    chosen: Path | None = None
    for candidate in reversed(list_checkpoints(checkpoint_dir)):
        try:
            state = json.loads((candidate / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if state.get("fingerprint") == fingerprint:
            chosen = candidate
            break
        logger.warning("ignoring checkpoint %s: it belongs to a different plan", candidate.name)
    step = int(chosen.name[len(CHECKPOINT_PREFIX) :]) if chosen is not None else 0
    if dist.world_size > 1:
        steps = dist.all_sum([step if dist.is_main else 0])
        step = int(steps[0])
        chosen = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:08d}" if step else None
    if chosen is None:
        return 0, {}
    state = load_checkpoint(chosen, model, optimizer, scheduler, scaler, dist.world_size)
    return step, dict(state.get("carried", {}))


def _tensorboard(directory: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: the manifest and progress carry the same numbers
        logger.warning("tensorboard is not installed; no event files will be written")
        return None
    return SummaryWriter(log_dir=str(directory))


def _publish(
    plan: TrainingPlan,
    method: TrainingMethod,
    model: torch.nn.Module,
    tokenizer: Any,
    model_dir: Path,
    loaded: dict[str, Any],
    final: Path | None,
    work_dir: Path,
    metrics: dict[str, Any],
    loss_curve: list[dict[str, Any]],
    dropped: int,
    started: float,
    full_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    staging = artifact.staging_dir(final) if final is not None else work_dir / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if full_state is not None:
        # A sharded model (full fine-tuning under FSDP) is written from its gathered state.
        model.save_pretrained(staging, state_dict=full_state, safe_serialization=True)  # type: ignore[operator]
    else:
        method.save(model, staging)
    tokenizer.save_pretrained(staging)
    events = work_dir / "tensorboard"
    if events.is_dir():
        shutil.copytree(events, staging / "logs")
    files_size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    metrics["artifact_size_bytes"] = files_size
    metrics["wall_seconds"] = time.monotonic() - started
    base_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    retention = loaded["retention"]
    manifest = {
        "kubetune_version": kubetune.__version__,
        "name": plan.name,
        "labels": plan.labels,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "method": method.name,
        "format": method.artifact_format,
        "base_model": {
            "uri": plan.model.uri,
            "revision": plan.model.revision,
            "path": str(model_dir),
            "config_sha256": config_sha256(model_dir),
            "model_type": base_config.get("model_type"),
            "architectures": base_config.get("architectures"),
        },
        "dataset": {
            "uri": plan.dataset.uri,
            "sha256": data.sha256_file(loaded["train_path"]),
            "format": loaded["format"],
            "train_records": len(loaded["train"]),
            "eval_records": len(loaded["eval"]),
            "dropped_records": dropped,
            "retention_uri": plan.dataset.retention_uri,
            "retention_sha256": data.sha256_file(retention[2]) if retention is not None else None,
        },
        "hyperparameters": {
            "method": plan.method.hyperparameters(),
            "training": plan.training.model_dump(),
        },
        "metrics": metrics,
        "loss_curve": loss_curve,
        "plan_fingerprint": plan_fingerprint(plan),
    }
    document = artifact.write_manifest(staging, manifest)
    if final is not None:
        artifact.publish_local(staging, final)
    else:
        artifact.publish_remote(staging, plan.output.uri)
    logger.info("published %s (%d bytes)", plan.output.uri, document["size_bytes"])
    return document
