"""The worker contract: the ``TrainingPlan`` the operator renders and ``kubetune train`` executes.

This module is the only part of the worker the operator imports, so it depends on pydantic and the
standard library only (never torch). It is versioned by ``plan_version``; a worker refuses a plan whose
version it does not know instead of guessing.

A plan reaches the worker as a JSON (or YAML-free JSON) document, either as a file
(``kubetune train --plan FILE``) or in the ``KUBETUNE_PLAN`` environment variable, which holds either
the JSON itself or a path to it.

Live progress, chosen so the operator never parses logs:

* rank 0 serves ``GET /progress`` (a :class:`ProgressReport` as JSON), ``GET /metrics`` (the same numbers
  in the Prometheus text format, names prefixed ``kubetune_train_``) and ``GET /healthz`` over HTTP on
  ``progress.port`` (default 9400, ``0`` disables the server);
* rank 0 also rewrites ``progress.file`` atomically (write + rename) on every update, so a sidecar or an
  ``exec`` probe can read it and it survives the server being unreachable;
* on exit, every failure writes one line ``<Reason>: <message>`` to ``progress.termination_message_path``
  (Kubernetes' ``terminationMessagePath``) and exits with the reason's code (see
  :mod:`kubetune.worker.errors`).

Distributed settings are not in the plan: the worker reads the standard torchrun environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) that the operator sets on each
pod, so the same plan runs on one process or many.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kubetune.api import methods
from kubetune.api.methods import METHOD_NAMES, MethodName
from kubetune.api.methods.adapter import BottleneckSettings
from kubetune.api.methods.ia3 import IA3Settings
from kubetune.api.methods.lora import LoraSettings
from kubetune.api.methods.prefix import PrefixSettings
from kubetune.api.methods.qlora import QuantizationSettings

#: Earlier name of the bottleneck settings in this module.
AdapterSettings = BottleneckSettings

#: The plan schema version this worker executes.
PLAN_VERSION = 1

#: Environment variable holding the plan (JSON text, or a path to a JSON file).
PLAN_ENV_VAR = "KUBETUNE_PLAN"

#: A registered method name (the registry lives with the API: ``kubetune.api.methods``).
MethodType = MethodName
DatasetFormat = Literal["auto", "text", "completion", "chat"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]


class _Model(BaseModel):
    # Unknown keys are errors: a typo in a rendered plan must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(_Model):
    """Where the base model comes from."""

    uri: str = Field(
        description="Base model URI: `file:///abs/path` or an absolute path, `pvc://claim/path` (resolved "
        "under `storage.pvc_mount_root`), `hf://org/name` (huggingface_hub), or `s3://bucket/key` (fsspec)."
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) for hf://.")
    trust_remote_code: bool = Field(
        default=False, description="Run the model repository's own Python code. Off unless asked for."
    )
    token_env: str = Field(
        default="HF_TOKEN",
        description="Name of the environment variable holding the Hugging Face token (never in the plan).",
    )


class DatasetSource(_Model):
    """The training data, the optional eval and retention sets, and how to read them."""

    uri: str = Field(description="Training data: a .jsonl, .json, .parquet or .csv file (same URI schemes).")
    format: DatasetFormat = Field(
        default="auto",
        description="Record shape: `text` ({text}), `completion` ({prompt, completion}; loss on the "
        "completion only), `chat` ({messages: [{role, content}]}; rendered with the tokenizer's chat "
        "template, loss on assistant turns only), or `auto` (detected from the first record's fields).",
    )
    eval_fraction: float = Field(
        default=0.05,
        ge=0.0,
        le=0.5,
        description="Share of records held out for evaluation, chosen by a hash of each record and the "
        "seed, so the split is the same on every rank and every restart. Ignored when `eval_uri` is set.",
    )
    eval_uri: str | None = Field(default=None, description="A separate evaluation file (same formats).")
    retention_uri: str | None = Field(
        default=None,
        description="General data the base model should keep knowing; its loss before and after training "
        "is the forgetting measure.",
    )
    retention_max_examples: int = Field(
        default=256, ge=1, description="Cap on retention records evaluated (first N in file order)."
    )
    max_examples: int | None = Field(
        default=None, ge=1, description="Use only the first N training records (after the eval split)."
    )


class MethodSpec(_Model):
    """Which fine-tuning method, and its settings (blocks not used by `type` are ignored).

    The settings models are the API's own (``kubetune.api.methods``), carried here in snake_case.
    """

    type: MethodName = Field(default="lora", description=" | ".join(METHOD_NAMES) + ".")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Used by lora and qlora.")
    quantization: QuantizationSettings = Field(default_factory=QuantizationSettings, description="qlora.")
    ia3: IA3Settings = Field(default_factory=IA3Settings, description="Used by ia3.")
    prefix: PrefixSettings = Field(default_factory=PrefixSettings, description="Used by prefix.")
    adapter: BottleneckSettings = Field(default_factory=BottleneckSettings, description="Used by adapter.")

    def hyperparameters(self) -> dict[str, object]:
        """The settings this method reads, for the artifact's manifest: its one block, flat, or a
        mapping of its blocks (qlora: lora and quantization); full fine-tuning reads none."""
        used = methods.get(self.type).blocks
        dumped = {block: getattr(self, block).model_dump() for block in used}
        if len(used) == 1:
            return dict(dumped[used[0]])
        return dumped


class TrainingSettings(_Model):
    """Optimisation and data-feeding hyperparameters. Steps are optimizer steps."""

    epochs: float = Field(default=3.0, gt=0, description="Passes over the training set (may be fractional).")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps; overrides epochs.")
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Decay after warmup."
    )
    warmup_ratio: float = Field(default=0.03, ge=0.0, lt=1.0, description="Share of steps spent warming up.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW decoupled weight decay.")
    max_grad_norm: float = Field(default=1.0, ge=0.0, description="Gradient clipping norm; 0 disables.")
    batch_size: int = Field(default=4, ge=1, description="Sequences per micro-batch per process.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    max_seq_length: int = Field(
        default=2048, ge=8, description="Tokens per sequence; longer records are cut."
    )
    precision: Precision = Field(
        default="auto", description="auto = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."
    )
    gradient_checkpointing: bool = Field(default=True, description="Recompute activations to save memory.")
    packing: bool = Field(
        default=False,
        description="Concatenate records into full `max_seq_length` blocks (no padding at all). Off: "
        "batches are grouped by length and padded only to their longest record.",
    )
    group_by_length: bool = Field(
        default=True, description="Without packing, batch records of similar length to cut padding."
    )
    seed: int = Field(default=42, description="Seeds data order, eval split and initialisation.")
    checkpoint_every_steps: int = Field(
        default=200, ge=0, description="Checkpoint interval in optimizer steps; 0 disables checkpoints."
    )
    keep_checkpoints: int = Field(default=2, ge=1, description="Newest complete checkpoints kept.")
    eval_every_steps: int | None = Field(
        default=None, ge=1, description="Evaluate every N steps (always once at the start and the end)."
    )
    logging_every_steps: int = Field(default=10, ge=1, description="Progress/TensorBoard interval in steps.")

    @model_validator(mode="after")
    def _check_lengths(self) -> TrainingSettings:
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError("set epochs > 0 or max_steps")
        return self


class OutputSpec(_Model):
    """Where the artifact is published and where in-progress state lives."""

    uri: str = Field(
        description="Final artifact location (`file://`, absolute path, `pvc://`, or `s3://`). Local: "
        "the directory appears in one rename, complete. s3: files are uploaded, `kubetune.json` last."
    )
    work_dir: str | None = Field(
        default=None,
        description="Local directory for checkpoints, staging and TensorBoard logs; must survive a pod "
        "restart for resume to work. Default: `.<name>.kubetune/` beside a local output, else "
        "`<storage.cache_dir>/work/<plan name>`.",
    )


class ProgressSpec(_Model):
    """Where live progress and failures are reported (see the module docstring)."""

    port: int = Field(
        default=9400, ge=0, le=65535, description="HTTP port for /progress and /metrics; 0=off."
    )
    host: str = Field(default="0.0.0.0", description="Address the progress server binds.")
    file: str | None = Field(
        default=None, description="Progress JSON file; default `<work_dir>/progress.json`."
    )
    termination_message_path: str = Field(
        default="/dev/termination-log", description="Where the one-line failure reason is written."
    )


class StorageSpec(_Model):
    """How URIs map to this pod's filesystem."""

    pvc_mount_root: str = Field(
        default="/mnt/pvc", description="`pvc://claim/path` resolves to `<pvc_mount_root>/claim/path`."
    )
    cache_dir: str = Field(
        default="/tmp/kubetune-cache", description="Download cache for hf:// and s3:// inputs."
    )


class TrainingPlan(_Model):
    """Everything one training run needs. Rendered by the operator from a FineTuneJob."""

    plan_version: Literal[1] = Field(default=1, description="Schema version of this plan.")
    name: str = Field(
        default="finetune",
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        max_length=253,
        description="Job name; recorded in the manifest and used to name the default work dir.",
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Free-form provenance (namespace, uid, ...) copied to the manifest."
    )
    model: ModelSource
    dataset: DatasetSource
    method: MethodSpec = Field(default_factory=MethodSpec)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    output: OutputSpec
    progress: ProgressSpec = Field(default_factory=ProgressSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)


class ProgressReport(BaseModel):
    """What ``GET /progress`` and the progress file hold. Times in seconds, losses in nats per token."""

    model_config = ConfigDict(extra="ignore")

    phase: Literal["starting", "loading", "training", "evaluating", "publishing", "succeeded", "failed"] = (
        "starting"
    )
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = Field(default=None, description="Real (non-padding) tokens, all ranks.")
    eta_seconds: float | None = None
    resumed_from_step: int | None = None
    world_size: int = 1
    message: str = ""
    updated_at: str = Field(default="", description="RFC 3339 UTC time of this report.")


def load_plan(source: str | os.PathLike[str]) -> TrainingPlan:
    """Parse a plan from JSON text or from a path to a JSON file.

    A string starting with ``{`` is JSON; anything else is a path. Raises ``ValueError`` (pydantic's
    ``ValidationError`` or ``json.JSONDecodeError`` are both subclasses) or ``OSError``.
    """
    text = str(source)
    if not text.lstrip().startswith("{"):
        text = Path(text).read_text(encoding="utf-8")
    data = json.loads(text)
    if isinstance(data, dict) and data.get("plan_version", PLAN_VERSION) != PLAN_VERSION:
        raise ValueError(f"plan_version {data.get('plan_version')!r} is not supported (this worker: 1)")
    return TrainingPlan.model_validate(data)
