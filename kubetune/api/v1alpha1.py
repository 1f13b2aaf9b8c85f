"""The ``kubetune.dev/v1alpha1`` API: FineTuneJob and AdapterDeployment.

These models are the single source of truth for the API. ``kubetune crds`` generates ``crds/*.yaml``
(schemas, descriptions for ``kubectl explain``, CEL rules, printer columns) from them, and the
operator parses objects with them. Field names are the public contract: users' manifests and GitOps
repositories depend on them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Final, Literal

from pydantic import Field

from kubetune.api import methods
from kubetune.api.methods import METHOD_NAMES, MethodName
from kubetune.api.methods.adapter import BottleneckSettings
from kubetune.api.methods.ia3 import IA3Settings
from kubetune.api.methods.lora import LoraSettings
from kubetune.api.methods.prefix import PrefixSettings
from kubetune.api.methods.qlora import QuantizationSettings
from kubetune.api.schema import (
    DNS1123_LABEL,
    ApiModel,
    Immutable,
    ObjectName,
    Quantity,
    Rule,
    Uri,
)

GROUP = "kubetune.dev"
VERSION = "v1alpha1"
API_VERSION: Final = "kubetune.dev/v1alpha1"

# Child objects are named "<name>-<suffix>" (Jobs, ConfigMaps, Services, pods) and many of those
# names are capped at 63 characters; 52 is the same headroom CronJob leaves for its Jobs.
MAX_NAME_LENGTH = 52

DatasetFormat = Literal["auto", "text", "completion", "chat"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
ConditionStatus = Literal["True", "False", "Unknown"]


#: Methods that cannot train across nodes.
_SINGLE_NODE = tuple(name for name in METHOD_NAMES if not methods.get(name).multi_node)


def _block_rules() -> tuple[Rule, ...]:
    """method.<block> is only valid for the methods that read it (from the registry)."""
    users = {
        block: tuple(name for name in METHOD_NAMES if block in methods.get(name).blocks)
        for block in methods.blocks()
    }

    def check(block: str) -> Callable[[Any], bool]:
        def valid(method: Any) -> bool:
            return getattr(method, block) is None or method.type in users[block]

        return valid

    return tuple(
        Rule(
            cel=f"!has(self.{block}) || self.type in [{', '.join(repr(name) for name in users[block])}]",
            message=f"method.{block} is only valid when method.type is {' or '.join(users[block])}",
            field_path=f".{block}",
            check=check(block),
        )
        # In the order of the methods that use them: lora, quantization, ia3, ...
        for block in sorted(users, key=lambda block: METHOD_NAMES.index(users[block][0]))
    )


# --------------------------------------------------------------------------------------------------
# Shared pieces


class Condition(ApiModel):
    """One aspect of the object's state, in the shape of metav1.Condition."""

    type: str = Field(
        max_length=316, description="type of condition in CamelCase, e.g. Running or Succeeded."
    )
    status: ConditionStatus = Field(description="status of the condition: True, False or Unknown.")
    reason: str = Field(
        default="",
        max_length=1024,
        description="reason is a CamelCase word saying why the condition last changed.",
    )
    message: str = Field(
        default="",
        max_length=32768,
        description="message is a human-readable explanation of the last transition.",
    )
    last_transition_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="lastTransitionTime is when the condition last changed status (RFC 3339).",
    )
    observed_generation: int | None = Field(
        default=None,
        ge=0,
        description="observedGeneration is the .metadata.generation the condition was computed from.",
    )


class ModelSource(ApiModel):
    """Where a base model comes from."""

    uri: Uri = Field(
        description="uri of the base model: hf://org/name (Hugging Face Hub), s3://bucket/key, "
        "pvc://claim/path (a PersistentVolumeClaim in the object's namespace) or file:///abs/path "
        "(a path already present on the node)."
    )
    revision: str | None = Field(
        default=None,
        max_length=256,
        pattern=r"^[A-Za-z0-9._/-]+$",
        description="revision (branch, tag or commit) of an hf:// model. Defaults to the repository's "
        "default branch; pin a commit for reproducible runs.",
    )
    credentials_secret: ObjectName | None = Field(
        default=None,
        description="credentialsSecret names a Secret in the same namespace whose keys (HF_TOKEN, "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...) are exposed to the worker as "
        "environment variables. Values never appear in status, events or logs.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="trustRemoteCode allows running Python code shipped with the model repository. "
        "Off unless you trust the model's authors.",
    )


class PodTemplateOverrides(ApiModel):
    """Scheduling and metadata overrides merged into the pods kubetune creates."""

    node_selector: dict[str, str] | None = Field(
        default=None,
        max_length=64,
        description="nodeSelector is merged into the pods' nodeSelector.",
    )
    tolerations: list[dict[str, Any]] | None = Field(
        default=None,
        max_length=64,
        description="tolerations (core/v1 Toleration objects) added to the pods.",
    )
    affinity: dict[str, Any] | None = Field(
        default=None, description="affinity (a core/v1 Affinity object) set on the pods."
    )
    priority_class_name: str | None = Field(
        default=None,
        max_length=253,
        description="priorityClassName of the pods, e.g. to let training be preempted by serving.",
    )
    service_account_name: str | None = Field(
        default=None,
        max_length=253,
        description="serviceAccountName the pods run as (e.g. one with workload identity for s3://). "
        "Defaults to the namespace's default ServiceAccount.",
    )
    image_pull_secrets: list[dict[str, str]] | None = Field(
        default=None,
        max_length=16,
        description="imagePullSecrets (objects with a name) for private registries.",
    )
    env: list[dict[str, Any]] | None = Field(
        default=None,
        max_length=128,
        description="env (core/v1 EnvVar objects) added to every container, e.g. HF_ENDPOINT or proxies.",
    )
    labels: dict[str, str] | None = Field(
        default=None, max_length=64, description="labels added to the pods."
    )
    annotations: dict[str, str] | None = Field(
        default=None, max_length=64, description="annotations added to the pods."
    )


# --------------------------------------------------------------------------------------------------
# FineTuneJob spec


class DatasetSource(ApiModel):
    """The training data and, optionally, a general sample to measure forgetting on."""

    uri: Uri = Field(description="uri of a JSONL, JSON, Parquet or CSV file (same schemes as model.uri).")
    format: DatasetFormat = Field(
        default="auto",
        description="format of each record: text ({text}), completion ({prompt, completion}; loss on "
        "the completion only), chat ({messages}; rendered with the tokenizer's chat template, loss on "
        "assistant turns only) or auto (detected from the first record).",
    )
    eval_fraction: float = Field(
        default=0.05,
        ge=0,
        le=0.5,
        description="evalFraction of the records held out (deterministically, by seed) for eval loss.",
    )
    retention_uri: Uri | None = Field(
        default=None,
        description="retentionUri points at general-domain text; its loss before and after training "
        "is reported as the forgetting measure.",
    )
    credentials_secret: ObjectName | None = Field(
        default=None,
        description="credentialsSecret for the dataset's storage, when it differs from the model's.",
    )


class MethodSpec(ApiModel):
    """How the model is fine-tuned. Only the block matching type may be set."""

    rules: ClassVar[tuple[Rule, ...]] = _block_rules()

    type: MethodName = Field(
        description="type of fine-tuning: "
        + "; ".join(f"{info.name} ({info.summary})" for info in map(methods.get, METHOD_NAMES))
        + "."
    )
    # One optional field per settings block of the method registry (a test checks they agree).
    lora: LoraSettings | None = Field(default=None, description="lora settings for lora and qlora.")
    quantization: QuantizationSettings | None = Field(
        default=None,
        description="quantization of the base model for qlora. Defaults to NF4 with double quant.",
    )
    ia3: IA3Settings | None = Field(default=None, description="ia3 settings.")
    prefix: PrefixSettings | None = Field(default=None, description="prefix tuning settings.")
    adapter: BottleneckSettings | None = Field(default=None, description="bottleneck adapter settings.")


class TrainingConfig(ApiModel):
    """Optimisation hyperparameters."""

    epochs: float = Field(default=3, gt=0, le=1000, description="epochs over the training split.")
    max_steps: int | None = Field(
        default=None, ge=1, description="maxSteps, when set, overrides epochs (optimizer steps)."
    )
    learning_rate: float = Field(default=2.0e-4, gt=0, le=1, description="learningRate peak value.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        default="cosine", description="lrScheduler shape after warmup."
    )
    warmup_ratio: float = Field(
        default=0.03, ge=0, lt=1, description="warmupRatio: share of the steps spent in linear warmup."
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="weightDecay (AdamW).")
    batch_size: int = Field(default=4, ge=1, le=4096, description="batchSize per device.")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="gradientAccumulationSteps per optimizer step."
    )
    max_seq_length: int = Field(
        default=2048, ge=16, le=131072, description="maxSeqLength in tokens; longer records are truncated."
    )
    precision: Precision = Field(
        default="auto",
        description="precision of training: auto picks bf16 where the hardware supports it, else fp32.",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="gradientCheckpointing trades compute for activation memory."
    )
    packing: bool = Field(
        default=False, description="packing concatenates short records into full-length sequences."
    )
    seed: int = Field(default=42, ge=0, description="seed for initialisation, shuffling and the eval split.")
    checkpoint_every_steps: int = Field(
        default=200,
        ge=1,
        description="checkpointEverySteps: a restarted worker resumes from the newest checkpoint, "
        "losing at most this many steps.",
    )


class TrainingResources(ApiModel):
    """Compute for the training workers."""

    nodes: int = Field(
        default=1, ge=1, le=64, description="nodes (worker pods); more than 1 is distributed training."
    )
    gpus_per_node: int = Field(default=1, ge=0, le=16, description="gpusPerNode; 0 trains on CPU.")
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu",
        max_length=253,
        description="gpuResourceName is the extended resource requested for GPUs.",
    )
    gpu_memory: Quantity | None = Field(
        default=None,
        description="gpuMemory per GPU (e.g. 80Gi), used by the planner's feasibility check.",
    )
    cpu: Quantity | None = Field(default=None, description="cpu request and limit per worker.")
    memory: Quantity | None = Field(default=None, description="memory request and limit per worker.")


class OutputSpec(ApiModel):
    """Where the trained artifact is published."""

    uri: Uri = Field(
        description="uri the artifact is published to (s3://, pvc:// or file://). It appears there "
        "atomically, complete with a kubetune.json manifest, or not at all."
    )
    credentials_secret: ObjectName | None = Field(
        default=None, description="credentialsSecret for the output storage."
    )


class FineTuneJobSpec(ApiModel):
    """The desired fine-tuning run. Immutable after creation except suspend."""

    immutable: ClassVar[Immutable | None] = Immutable(mutable=frozenset({"suspend"}))
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel=f"self.resources.nodes == 1 || !(self.method.type in {list(_SINGLE_NODE)!r})",
            message=f"method.type {' or '.join(_SINGLE_NODE)} trains on one node: set resources.nodes to 1",
            field_path=".resources.nodes",
            check=lambda s: s.resources.nodes == 1 or s.method.type not in _SINGLE_NODE,
        ),
        Rule(
            cel="!self.output.uri.startsWith('hf://')",
            message="output.uri must be s3://, pvc:// or file:// (hf:// is read-only)",
            field_path=".output.uri",
            check=lambda s: not s.output.uri.startswith("hf://"),
        ),
    )

    model: ModelSource = Field(description="model is the base model to fine-tune.")
    dataset: DatasetSource = Field(description="dataset to train on.")
    method: MethodSpec = Field(description="method of fine-tuning and its settings.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="training hyperparameters.")
    resources: TrainingResources = Field(
        default_factory=TrainingResources, description="resources for the worker pods."
    )
    output: OutputSpec = Field(description="output location of the trained artifact.")
    suspend: bool = Field(
        default=False,
        description="suspend stops (or holds back) the workers without losing checkpoints; "
        "set it back to false to resume. Queueing systems such as Kueue toggle it.",
    )
    backoff_limit: int = Field(
        default=3, ge=0, le=100, description="backoffLimit is how many failed worker restarts are retried."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="activeDeadlineSeconds after which a running job is failed."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=2**31 - 1,  # the Job's field is an int32: a larger value would make an unrunnable Job
        description="ttlSecondsAfterFinished deletes the worker Job (not the FineTuneJob or the "
        "artifact) this long after it finishes.",
    )
    image: str | None = Field(
        default=None,
        max_length=1024,
        description="image overrides the operator's default worker image.",
    )
    pod_template: PodTemplateOverrides | None = Field(
        default=None, description="podTemplate overrides for the worker pods."
    )


# --------------------------------------------------------------------------------------------------
# FineTuneJob status


class TrainingPlanStatus(ApiModel):
    """What the planner computed before launching workers (docs/planner.md)."""

    total_parameters: int = Field(default=0, ge=0, description="totalParameters of the base model.")
    trainable_parameters: int = Field(default=0, ge=0, description="trainableParameters under the method.")
    trainable_percent: str = Field(default="", description="trainablePercent, e.g. 0.2%.")
    estimated_peak_memory: str = Field(default="", description="estimatedPeakMemory per GPU (quantity).")
    estimated_peak_memory_bytes: int | None = Field(
        default=None, ge=0, description="estimatedPeakMemoryBytes per GPU."
    )
    memory_breakdown: dict[str, str] | None = Field(
        default=None,
        description="memoryBreakdown of the peak: weights, gradients, optimizer, activations, transient, "
        "overhead (quantities).",
    )
    available_memory: str | None = Field(
        default=None, description="availableMemory per GPU: resources.gpuMemory or the GPU type's."
    )
    gpu_type: str | None = Field(default=None, description="gpuType assumed for memory, time and cost.")
    fits: bool = Field(
        default=True, description="fits is false when the estimate exceeds the available memory per GPU."
    )
    training_tokens: int | None = Field(default=None, ge=0, description="trainingTokens over all epochs.")
    tokens_source: str | None = Field(
        default=None, description="tokensSource says how the dataset's tokens were found."
    )
    estimated_hours: float | None = Field(
        default=None, ge=0, description="estimatedHours of training at the assumed utilisation."
    )
    estimated_cost: str | None = Field(
        default=None, description="estimatedCost in USD at the assumed price per GPU-hour."
    )
    model_config_uri: str | None = Field(
        default=None, alias="modelConfig", description="modelConfig is where the planner read config.json."
    )
    recommendation: str = Field(default="", description="recommendation: what fits when the job does not.")


class TrainingProgress(ApiModel):
    """Live progress reported by the workers."""

    step: int = Field(default=0, ge=0, description="step is the last completed optimizer step.")
    total_steps: int = Field(default=0, ge=0, description="totalSteps planned.")
    summary: str = Field(default="", description="summary for kubectl get, e.g. 120/1000 (12%).")
    epoch: float = Field(default=0.0, ge=0, description="epoch reached (fractional).")
    loss: float | None = Field(default=None, description="loss is the latest training loss.")
    eval_loss: float | None = Field(default=None, description="evalLoss on the held-out split.")
    tokens_per_second: float | None = Field(default=None, description="tokensPerSecond (non-padding).")
    eta_seconds: int | None = Field(default=None, ge=0, description="etaSeconds until the last step.")
    updated_at: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="updatedAt of this report."
    )


class TrainingResult(ApiModel):
    """The published artifact."""

    uri: str = Field(default="", description="uri of the published artifact.")
    sha256: str = Field(default="", description="sha256 of the artifact's kubetune.json manifest.")
    size_bytes: int = Field(default=0, ge=0, description="sizeBytes of all artifact files.")
    format: Literal["", "peft", "bottleneck", "full"] = Field(
        default="", description="format: peft, bottleneck (kubetune's adapter format) or full (safetensors)."
    )
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="metrics measured by the run: trainable params, peak memory bytes, tokens/s, losses, "
        "retention loss before/after, wall seconds.",
    )


class FineTuneJobStatus(ApiModel):
    """The observed state of a FineTuneJob; conditions are the authority, phase a summary."""

    observed_generation: int | None = Field(default=None, description="observedGeneration last reconciled.")
    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"] | None = Field(
        default=None, description="phase is a one-word summary derived from conditions."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="conditions: Feasible, Running, Succeeded, Failed, Suspended.",
    )
    plan: TrainingPlanStatus | None = Field(default=None, description="plan computed before launch.")
    progress: TrainingProgress | None = Field(default=None, description="progress of the run.")
    result: TrainingResult | None = Field(default=None, description="result once the artifact is published.")
    job_name: str | None = Field(default=None, description="jobName of the worker Job.")
    start_time: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="startTime of the workers."
    )
    completion_time: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="completionTime of the run."
    )


# --------------------------------------------------------------------------------------------------
# AdapterDeployment


class AdapterSource(ApiModel):
    """One adapter served under its own model name."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.fineTuneJob) != has(self.uri)",
            message="each adapter sets exactly one of fineTuneJob or uri",
            check=lambda a: (a.fine_tune_job is None) != (a.uri is None),
        ),
    )

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$",
        description="name clients send as the OpenAI `model` field.",
    )
    fine_tune_job: ObjectName | None = Field(
        default=None, description="fineTuneJob whose published artifact (in this namespace) is served."
    )
    uri: Uri | None = Field(default=None, description="uri of an adapter artifact.")
    credentials_secret: ObjectName | None = Field(
        default=None, description="credentialsSecret for the adapter's storage."
    )


class RouteBackend(ApiModel):
    """A weighted target of a route."""

    adapter: str = Field(min_length=1, max_length=63, description="adapter name from spec.adapters.")
    weight: int = Field(ge=1, le=1000, description="weight, relative to the route's other backends.")


class RouteCanary(ApiModel):
    """A progressive rollout of one backend: its share of the route steps up while its error rate and
    latency stay within bounds, and drops to zero otherwise."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.steps.all(i, i > 0 && i <= 100) && self.steps[size(self.steps) - 1] == 100",
            message="canary.steps are percentages in 1..100 ending with 100",
            field_path=".steps",
            check=lambda c: all(0 < s <= 100 for s in c.steps) and c.steps[-1] == 100,
        ),
    )

    adapter: str = Field(
        min_length=1, max_length=63, description="adapter (a backend of the route) rolled out."
    )
    steps: list[int] = Field(
        default_factory=lambda: [10, 50, 100],
        min_length=1,
        max_length=10,
        description="steps: the adapter's share of the route's requests, in percent, one step after another; "
        "the last is 100.",
    )
    step_seconds: int = Field(
        default=60, ge=1, le=86400, description="stepSeconds each step lasts at least before the next."
    )
    min_requests: int = Field(
        default=20, ge=1, le=1_000_000, description="minRequests the adapter must serve in a step to move on."
    )
    max_error_rate: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="maxErrorRate: share of the adapter's requests that may fail (5xx).",
    )
    max_mean_latency_seconds: float | None = Field(
        default=None,
        gt=0,
        description="maxMeanLatencySeconds of the adapter's requests in a step; unset: no bound.",
    )


class Route(ApiModel):
    """A model name that splits requests across adapters by weight (canary between versions)."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.canary) || self.backends.exists(b, b.adapter == self.canary.adapter)",
            message="canary.adapter must be one of the route's backends",
            field_path=".canary.adapter",
            check=lambda r: r.canary is None or any(b.adapter == r.canary.adapter for b in r.backends),
        ),
    )

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$",
        description="name clients send as `model`; must differ from every adapter name.",
    )
    backends: list[RouteBackend] = Field(
        min_length=1,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["adapter"]},
        description="backends and their weights.",
    )
    canary: RouteCanary | None = Field(
        default=None,
        description="canary steps one backend's share up automatically (e.g. 10, 50, 100 percent) while its "
        "error rate and latency stay within bounds, and rolls it back otherwise; the other backends share "
        "the rest by their weights. Progress is in status.canaries, the Canary condition and Events.",
    )


class ServingResources(ApiModel):
    """Compute per serving replica."""

    gpus: int = Field(default=0, ge=0, le=16, description="gpus per replica.")
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu", max_length=253, description="gpuResourceName requested for GPUs."
    )
    cpu: Quantity | None = Field(default=None, description="cpu request and limit per replica.")
    memory: Quantity | None = Field(default=None, description="memory request and limit per replica.")


class ServiceSpec(ApiModel):
    """The Service in front of the replicas."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        default="ClusterIP", description="type of Service."
    )
    port: int = Field(default=8000, ge=1, le=65535, description="port of the OpenAI-compatible API.")


class AdapterDeploymentSpec(ApiModel):
    """Serving pods that load one base model and many adapters."""

    immutable: ClassVar[Immutable | None] = Immutable(
        mutable=frozenset(
            {
                "adapters",
                "routes",
                "runtime",
                "replicas",
                "updateStrategy",
                "mergeAdapter",
                "resources",
                "service",
                "image",
                "podTemplate",
                "apiKeysSecret",
            }
        )
    )
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            # The list is also a map keyed by name (the apiserver's own duplicate check); this twin
            # gives the Python side the same answer.
            cel="self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
            message="adapter names must be unique",
            field_path=".adapters",
            check=lambda s: len({a.name for a in s.adapters}) == len(s.adapters),
        ),
        Rule(
            cel="self.routes.all(r, r.backends.all(b, self.adapters.exists(a, a.name == b.adapter)))",
            message="every routes[].backends[].adapter must name an adapter in spec.adapters",
            field_path=".routes",
            check=lambda s: all(
                any(a.name == b.adapter for a in s.adapters) for r in s.routes for b in r.backends
            ),
        ),
        Rule(
            cel="self.routes.all(r, !self.adapters.exists(a, a.name == r.name))",
            message="route names must differ from adapter names",
            field_path=".routes",
            check=lambda s: not ({r.name for r in s.routes} & {a.name for a in s.adapters}),
        ),
        Rule(
            cel="self.routes.all(r, self.routes.exists_one(o, o.name == r.name))",
            message="route names must be unique",
            field_path=".routes",
            check=lambda s: len({r.name for r in s.routes}) == len(s.routes),
        ),
        Rule(
            cel="!self.mergeAdapter || size(self.adapters) == 1",
            message="mergeAdapter needs exactly one adapter",
            field_path=".mergeAdapter",
            check=lambda s: not s.merge_adapter or len(s.adapters) == 1,
        ),
        Rule(
            cel="self.runtime != 'vllm' || self.resources.gpus >= 1",
            message="runtime vllm needs resources.gpus >= 1",
            field_path=".resources.gpus",
            check=lambda s: s.runtime != "vllm" or s.resources.gpus >= 1,
        ),
    )

    model: ModelSource = Field(description="model is the base model every adapter must have been trained on.")
    adapters: list[AdapterSource] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="adapters served, each under its own model name. Changing the list hot-swaps "
        "adapters in running pods (updateStrategy HotReload).",
    )
    routes: list[Route] = Field(
        default_factory=list,
        max_length=32,
        description="routes are weighted aliases over adapters, e.g. a canary between two versions.",
    )
    runtime: Literal["kubetune", "vllm"] = Field(
        default="kubetune",
        description="runtime: kubetune (transformers + PEFT; every method, CPU or GPU) "
        "or vllm (LoRA only, GPU).",
    )
    replicas: int = Field(
        default=1, ge=0, le=1000, description="replicas of the serving pods (scale subresource)."
    )
    update_strategy: Literal["HotReload", "Rolling"] = Field(
        default="HotReload",
        description="updateStrategy for adapter changes: HotReload loads/unloads adapters in running pods; "
        "Rolling replaces the pods.",
    )
    merge_adapter: bool = Field(
        default=False,
        description="mergeAdapter merges a single LoRA into the base weights for zero adapter overhead.",
    )
    resources: ServingResources = Field(
        default_factory=ServingResources, description="resources per replica."
    )
    service: ServiceSpec = Field(default_factory=ServiceSpec, description="service exposing the API.")
    image: str | None = Field(
        default=None, max_length=1024, description="image overrides the operator's default serving image."
    )
    pod_template: PodTemplateOverrides | None = Field(
        default=None, description="podTemplate overrides for the serving pods."
    )
    api_keys_secret: ObjectName | None = Field(
        default=None,
        description="apiKeysSecret names a Secret in this namespace whose key `keys` holds API keys, one "
        "per line. When set, the inference endpoints require one of them as a bearer token (the OpenAI "
        "client's api_key); keys are re-read when the Secret changes. Unset: the inference API is open. "
        "The admin endpoints (adapter load/unload, routes) always require the token of the Secret "
        "<name>-admin-token, which the operator creates.",
    )


class AdapterStatus(ApiModel):
    """Serving state of one adapter."""

    name: str = Field(description="name of the adapter.")
    source: str = Field(default="", description="source URI the adapter was resolved to.")
    sha256: str = Field(default="", description="sha256 of the adapter's manifest.")
    state: Literal["Pending", "Loading", "Loaded", "Failed", "Unloading"] = Field(
        default="Pending", description="state across replicas."
    )
    loaded_replicas: int = Field(default=0, ge=0, description="loadedReplicas serving this adapter.")
    reason: str = Field(
        default="",
        max_length=64,
        description="reason of a Failed state, CamelCase: HashMismatch, MissingFiles, BaseModelMismatch, "
        "DownloadFailed, PathOutsideRoots, InvalidUri, UnsupportedArtifact, LoadError, Unsupported.",
    )
    message: str = Field(default="", description="message explaining a failure.")
    ms_per_token: float | None = Field(
        default=None,
        ge=0,
        description="msPerToken: decode latency of the adapter as served (merged, with mergeAdapter), "
        "milliseconds per generated token: the serving runtime's probe after the load (one sequence "
        "alone, greedy: the mean of 8 decode steps after the first token, which includes the prefill), "
        "median over the ready replicas serving it. Unset for runtime vllm and until a replica measured it.",
    )
    unmerged_ms_per_token: float | None = Field(
        default=None,
        ge=0,
        description="unmergedMsPerToken: with mergeAdapter, the same probe of the adapter before it "
        "was merged into the base (compare with msPerToken for the saving).",
    )


class CanaryStatus(ApiModel):
    """Where a route's canary stands."""

    route: str = Field(description="route whose backend is rolled out.")
    adapter: str = Field(description="adapter rolled out.")
    state: Literal["Progressing", "Promoted", "RolledBack"] = Field(description="state of the rollout.")
    step: int = Field(default=0, ge=0, description="step index in canary.steps.")
    weight: int = Field(default=0, ge=0, le=100, description="weight: the adapter's share now, in percent.")
    step_started_at: float = Field(default=0, ge=0, description="stepStartedAt, Unix seconds.")
    base_requests: float = Field(
        default=0, ge=0, description="baseRequests: the adapter's request count at the step's start."
    )
    base_errors: float = Field(default=0, ge=0, description="baseErrors: its 5xx count then.")
    base_latency_seconds: float = Field(
        default=0, ge=0, description="baseLatencySeconds: its latency sum then."
    )
    message: str = Field(default="", description="message: the last step's figures or why it rolled back.")


class AdapterDeploymentStatus(ApiModel):
    """The observed state of an AdapterDeployment."""

    observed_generation: int | None = Field(default=None, description="observedGeneration last reconciled.")
    replicas: int = Field(default=0, ge=0, description="replicas that exist.")
    ready_replicas: int = Field(default=0, ge=0, description="readyReplicas that pass readiness.")
    selector: str = Field(default="", description="selector of the pods, for the scale subresource.")
    phase: Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"] | None = Field(
        default=None, description="phase is a one-word summary derived from conditions."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="conditions: Ready, Progressing, AdaptersLoaded, Degraded.",
    )
    adapters: list[AdapterStatus] = Field(default_factory=list, description="adapters and their state.")
    adapters_ready: str = Field(default="", description="adaptersReady for kubectl get, e.g. 2/3.")
    base_ms_per_token: float | None = Field(
        default=None,
        ge=0,
        description="baseMsPerToken: decode latency of the bare base model, milliseconds per generated "
        "token, by the same probe as adapters[].msPerToken (at the replica's start, before any merge); "
        "median over the ready replicas. Unset for runtime vllm.",
    )
    canaries: list[CanaryStatus] = Field(
        default_factory=list, description="canaries of the routes, one per route."
    )
    endpoint: str = Field(default="", description="endpoint of the OpenAI-compatible API.")


# --------------------------------------------------------------------------------------------------
# Top-level objects


class ObjectMeta(ApiModel):
    """The parts of metav1.ObjectMeta the models read; everything else passes through."""

    model_config = ApiModel.model_config | {"extra": "allow"}

    name: str | None = Field(default=None, max_length=253)
    namespace: str | None = Field(default=None, max_length=63, pattern=DNS1123_LABEL)
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    generation: int | None = None
    uid: str | None = None


def _name_fits(obj: Any) -> bool:
    return obj.metadata.name is None or len(obj.metadata.name) <= MAX_NAME_LENGTH


_NAME_LENGTH_RULE = Rule(
    cel=f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
    message=f"metadata.name must be at most {MAX_NAME_LENGTH} characters so that child resources "
    "(<name>-<suffix>) fit Kubernetes' 63-character limits",
    check=_name_fits,
)


class FineTuneJob(ApiModel):
    """FineTuneJob fine-tunes a base model on a dataset with one method (full, LoRA, QLoRA, IA3, prefix
    tuning or bottleneck adapters), publishes the artifact and reports plan, progress and metrics."""

    kind_info: ClassVar[dict[str, Any]] = {
        "kind": "FineTuneJob",
        "plural": "finetunejobs",
        "singular": "finetunejob",
        "shortNames": ["ftj", "ftjs"],
        "categories": ["kubetune"],
        "printerColumns": [
            {"name": "Method", "type": "string", "jsonPath": ".spec.method.type"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
            {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
            {
                "name": "Trainable",
                "type": "string",
                "jsonPath": ".status.plan.trainablePercent",
                "priority": 1,
            },
            {
                "name": "Memory",
                "type": "string",
                "jsonPath": ".status.plan.estimatedPeakMemory",
                "priority": 1,
            },
            {"name": "Artifact", "type": "string", "jsonPath": ".status.result.uri", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    }
    rules: ClassVar[tuple[Rule, ...]] = (_NAME_LENGTH_RULE,)

    api_version: Literal["kubetune.dev/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None


def _dns1035(obj: Any) -> bool:
    import re

    name = obj.metadata.name
    return name is None or re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) is not None


class AdapterDeployment(ApiModel):
    """AdapterDeployment serves one base model with many adapters behind an OpenAI-compatible API,
    hot-swapping adapters in running pods."""

    kind_info: ClassVar[dict[str, Any]] = {
        "kind": "AdapterDeployment",
        "plural": "adapterdeployments",
        "singular": "adapterdeployment",
        "shortNames": ["adep"],
        "categories": ["kubetune"],
        "printerColumns": [
            {"name": "Runtime", "type": "string", "jsonPath": ".spec.runtime"},
            {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
            {"name": "Adapters", "type": "string", "jsonPath": ".status.adaptersReady"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    rules: ClassVar[tuple[Rule, ...]] = (
        _NAME_LENGTH_RULE,
        Rule(
            cel="self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
            message="metadata.name must start with a letter (a DNS-1035 label): it also names the Service",
            check=_dns1035,
        ),
    )

    api_version: Literal["kubetune.dev/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["AdapterDeployment"] = "AdapterDeployment"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: AdapterDeploymentSpec
    status: AdapterDeploymentStatus | None = None


RESOURCES: tuple[type[ApiModel], ...] = (FineTuneJob, AdapterDeployment)
