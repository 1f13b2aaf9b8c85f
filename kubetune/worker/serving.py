"""The serving runtime: one base model, many adapters, an OpenAI-compatible API.

``ModelServer`` holds the base model once and the adapters loaded onto it. LoRA adapters (the common
case, including QLoRA's) share a single PEFT wrapper over the base, and requests for different LoRA
adapters and the base run in one batch: through :class:`StackedLora` (every adapter's LoRA weights
stacked per layer, two batched matmuls) or, for adapters it does not cover, PEFT's mixed-adapter
inference (``adapter_names=``). Adapters of the other methods share the same base weights too, and
batch per adapter: IA3 and bottleneck adapters as forward hooks attached for their own batch
(:mod:`kubetune.worker.serving_hooks`), prefix adapters as PEFT prompt-learning wrappers over the
base (their past key values are all they add). DoRA adapters, which PEFT cannot mix, batch per
adapter on the LoRA host. Only a full fine-tune is a model of its own. The batching itself lives in
:mod:`kubetune.worker.batching`.

Adapters are verified before they serve: the artifact's ``kubetune.json`` must be complete, every file
must match its recorded sha256, the manifest itself must match the sha256 the caller recorded (a
FineTuneJob's ``status.result.sha256``) when one is given, and the adapter's base-model config hash
must match the served base. Names follow Kubernetes' rules and paths must stay under the server's
adapter roots.

A bad adapter never takes the server down. Every adapter the server is asked to serve (declared at
start-up or loaded over HTTP) has a state, ``Loading``, ``Loaded`` or ``Failed`` with a CamelCase
reason and a message, reported by ``GET /v1/adapters``; a failed one is retried in the background
with exponential backoff, and a load call for it during the backoff answers the recorded failure at
once. The server is ready when every declared adapter has been tried once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import re
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from kubetune.api import methods

logger = logging.getLogger("kubetune.serve")

#: Adapter and route names: what Kubernetes allows in spec.adapters[].name, upper case too.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")

#: PEFT's name for "no adapter" in a mixed batch.
BASE_IN_MIXED_BATCH = "__base__"

#: Backoff of background retries of a failed adapter, seconds: doubles from the first to the cap.
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 300.0

#: Tokens the latency probe decodes after each load (and for the base at start-up), one sequence,
#: greedy, EOS suppressed; the first token (the prompt's prefill) is not counted.
PROBE_TOKENS = 8
#: Weight of the newest batch in the served decode latency's moving average.
SERVED_EWMA_WEIGHT = 0.2


@dataclass
class TokenLatency:
    """Decode latency of one served model (an adapter or the base), milliseconds per token.

    ``probe_ms``: the probe after its load, one sequence alone (comparable between adapters and
    with the base); ``served_ms``: a moving average over the batches that served it (depends on the
    batch sizes the traffic makes); ``unmerged_probe_ms``: with mergeAdapter, the same probe of the
    adapter before it was merged.
    """

    probe_ms: float | None = None
    served_ms: float | None = None
    unmerged_probe_ms: float | None = None

    def observe(self, ms: float) -> None:
        previous = self.served_ms
        self.served_ms = ms if previous is None else previous + SERVED_EWMA_WEIGHT * (ms - previous)

    def describe(self) -> dict[str, float | None]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "ms_per_token": rounded(self.probe_ms),
            "served_ms_per_token": rounded(self.served_ms),
            "unmerged_ms_per_token": rounded(self.unmerged_probe_ms),
        }


def step_timer() -> Any:
    """A stopping criterion that never stops and records the time of each decoding step;
    ``ms_per_token()`` is the mean interval between steps after the first (which includes the
    prompt's prefill), or None with fewer than two steps."""
    from transformers import StoppingCriteria

    class _StepTimer(StoppingCriteria):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        def ms_per_token(self) -> float | None:
            if len(self.times) < 2:
                return None
            return 1000 * (self.times[-1] - self.times[0]) / (len(self.times) - 1)

    return _StepTimer()


def _no_eos(eos_ids: frozenset[int]) -> Any:
    from transformers import LogitsProcessor

    eos = sorted(eos_ids)

    class _NoEos(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            if eos:
                scores[:, eos] = float("-inf")
            return scores

    return _NoEos()


class ServingError(Exception):
    """A request or adapter operation that cannot be done.

    ``status`` is the HTTP status, ``kind`` OpenAI's error ``type`` and ``code`` its ``code``.
    """

    status: int = 400
    kind: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None


class UnknownModel(ServingError):
    status, kind, code = 404, "model_not_found", "model_not_found"


class ModelNotReady(ServingError):
    """A declared model that is not loaded (yet): 503, the client may retry."""

    status, kind, code = 503, "service_unavailable", "model_not_ready"


class AdapterLoadError(ServingError):
    """An adapter that cannot be loaded; ``reason`` is the CamelCase reason reported in its state.

    Reasons: ``InvalidName``, ``PathOutsideRoots``, ``InvalidUri``, ``DownloadFailed``,
    ``MissingFiles``, ``HashMismatch``, ``BaseModelMismatch``, ``UnsupportedArtifact``, ``LoadError``.
    """

    status, kind = 422, "adapter_invalid"

    def __init__(self, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = self.code = reason
        self.retry_after = retry_after


#: Kept for callers of the first runtime: every load failure is an AdapterLoadError now.
AdapterInvalid = AdapterLoadError


@dataclass
class LoadedAdapter:
    name: str
    source: str
    sha256: str
    method: str
    format: str
    shared: bool  # True: a named adapter on the shared LoRA wrapper
    instance: Any = None
    # How it uses the base: "lora" (on the LoRA host), "hooks" (instance: a HookedAdapter),
    # "prompt" (instance: a PEFT prompt-learning wrapper over the base), "merged", "own" (a full model).
    kind: str = "lora"
    mixable: bool = False  # True: may share a batch with other LoRA adapters (PEFT's adapter_names)
    loaded_at: float = field(default_factory=time.time)


@dataclass
class AdapterState:
    """What the server knows of one adapter it was asked to serve."""

    name: str
    source: str
    expected_sha256: str | None = None
    declared: bool = False  # from the start-up plan or command line: counts for readiness
    state: str = "Loading"  # Loading | Loaded | Failed
    reason: str = ""
    message: str = ""
    attempts: int = 0
    next_retry_at: float | None = None  # time.monotonic() of the next background retry
    changed_at: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        retry = None if self.next_retry_at is None else max(0.0, self.next_retry_at - time.monotonic())
        return {
            "name": self.name,
            "source": self.source,
            "state": self.state,
            "reason": self.reason,
            "message": self.message,
            "attempts": self.attempts,
            "retry_in_seconds": None if retry is None else round(retry, 1),
            "declared": self.declared,
            "expected_sha256": self.expected_sha256,
            "last_transition_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.changed_at)),
        }


@dataclass(frozen=True)
class Route:
    """A model name that picks one of several adapters by weight."""

    name: str
    backends: tuple[tuple[str, int], ...]


def _config_sha256(model_dir: Path) -> str | None:
    from kubetune.worker.engine import config_sha256

    return config_sha256(model_dir)


def check_name(name: str, what: str = "adapter") -> None:
    if not NAME_PATTERN.match(name):
        raise AdapterLoadError(
            "InvalidName",
            f"{what} name {name!r}: use 1-63 letters, digits, '-', '_' or '.', starting and ending "
            "with a letter or digit",
        )


def resolve_uri(
    uri: str,
    *,
    pvc_mount_root: str = "/mnt/pvc",
    cache_dir: str = "/tmp/kubetune-cache",
    revision: str | None = None,
) -> Path:
    """A local directory for a model or artifact URI (file://, pvc://, bare path, hf:// or s3://)."""
    from kubetune.worker.errors import KubetuneError
    from kubetune.worker.plan import StorageSpec
    from kubetune.worker.sources import local_path, split_uri

    try:
        path = local_path(uri, StorageSpec(pvc_mount_root=pvc_mount_root, cache_dir=cache_dir))
        if path is not None:
            return path
        scheme, rest = split_uri(uri)
    except KubetuneError as exc:
        reason = "PathOutsideRoots" if "outside" in str(exc) or "'..'" in str(exc) else "InvalidUri"
        raise AdapterLoadError(reason, str(exc)) from exc
    target = Path(cache_dir) / "artifacts" / scheme / rest / (revision or "default")
    try:
        if scheme == "hf":
            import os

            from huggingface_hub import snapshot_download

            snapshot_download(
                repo_id=rest,
                revision=revision,
                token=os.environ.get("HF_TOKEN") or None,
                local_dir=target,
                # safetensors only: pickled weights can run code when loaded.
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        else:
            import fsspec

            fsspec.filesystem(scheme).get(uri.rstrip("/") + "/", str(target) + "/", recursive=True)
    except Exception as exc:
        message = f"{uri}: download failed: {type(exc).__name__}: {exc}"
        raise AdapterLoadError("DownloadFailed", message) from exc
    return target


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Loading an adapter and restacking the LoRA weights free many tensors of a few hundred KiB, which
    glibc keeps in its heap, where they fragment: without this a replica's resident memory grows by
    several times the adapters' own size over a few loads (measured in benchmarks/serving.py memory).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)


def _manifest_sha256(directory: Path) -> str:
    return hashlib.sha256((directory / "kubetune.json").read_bytes()).hexdigest()


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class StackedLora:
    """Every loaded LoRA adapter of the shared PEFT model, stacked per layer for mixed batches.

    For each LoRA layer, ``A`` is ``[adapters + 1, r_max, in]``, ``B`` ``[adapters + 1, out, r_max]``
    and ``scale`` ``[adapters + 1]``; index 0 (the base) and adapters that skip a layer are zeros,
    smaller ranks are zero-padded. A mixed batch then runs the LoRA layers with the adapters switched
    off and a forward hook adds ``scale[row] * B[row] @ A[row] @ x`` with two batched matmuls per
    layer, where PEFT's ``adapter_names`` path loops over the adapters in Python (about 3x slower with
    8 adapters on a small model). The stacks hold the only copy of the weights: each adapter's PEFT
    ``lora_A``/``lora_B`` weights become views into them, so stacking costs no memory.

    :meth:`build` returns None when some adapter needs PEFT's own path (a LoRA variant such as DoRA,
    a LoRA bias, ``modules_to_save``, non-Linear target layers).
    """

    def __init__(self, names: list[str], stacks: dict[Any, tuple[Any, Any, Any]]) -> None:
        self.index = {name: i + 1 for i, name in enumerate(names)}
        self.stacks = stacks

    @classmethod
    def build(cls, host: Any, names: list[str]) -> StackedLora | None:
        import torch
        from peft.tuners.lora import LoraLayer

        for name in names:
            if getattr(host.peft_config[name], "modules_to_save", None):
                return None
        stacks: dict[Any, tuple[Any, Any, Any]] = {}
        for candidate in host.modules():
            if not isinstance(candidate, LoraLayer):
                continue
            module: Any = candidate  # peft's layer attributes are untyped ModuleDicts
            present = [n for n in names if n in module.lora_A]
            if any(n in getattr(module, "lora_embedding_A", {}) for n in names):
                return None
            if not present:
                continue
            if any(
                n in module.lora_variant
                or not isinstance(module.lora_A[n], torch.nn.Linear)
                or not isinstance(module.lora_B[n], torch.nn.Linear)
                or module.lora_A[n].bias is not None
                or module.lora_B[n].bias is not None
                for n in present
            ):
                return None
            first = module.lora_A[present[0]].weight
            rank = max(module.lora_A[n].weight.shape[0] for n in present)
            fan_in = first.shape[1]
            fan_out = module.lora_B[present[0]].weight.shape[0]
            # Normal tensors even when built during generation: the adapters' weights will be views
            # of them, and PEFT sets requires_grad on those, which inference tensors refuse.
            with torch.inference_mode(False), torch.no_grad():
                a = torch.zeros(len(names) + 1, rank, fan_in, dtype=first.dtype, device=first.device)
                b = torch.zeros(len(names) + 1, fan_out, rank, dtype=first.dtype, device=first.device)
                scale = torch.zeros(len(names) + 1, dtype=first.dtype, device=first.device)
                for i, name in enumerate(names, start=1):
                    if name not in present:
                        continue
                    weight_a, weight_b = module.lora_A[name].weight, module.lora_B[name].weight
                    r = weight_a.shape[0]
                    a[i, :r] = weight_a
                    b[i, :, :r] = weight_b
                    scale[i] = module.scaling[name]
                    # The adapter's own weights become views of its rows: one copy in memory.
                    weight_a.data, weight_b.data = a[i, :r], b[i, :, :r]
            stacks[module] = (a, b, scale)
        return cls(names, stacks)

    @contextlib.contextmanager
    def rows(self, host: Any, adapters: list[str]) -> Any:
        """While active, ``host`` runs row ``i`` with ``adapters[i]`` (``__base__`` for none)."""
        import torch

        device = next(iter(self.stacks.values()))[0].device if self.stacks else None
        index = torch.tensor([self.index.get(a, 0) for a in adapters], device=device)

        def add_lora(module: Any, args: tuple[Any, ...], output: Any) -> Any:
            x = args[0]
            # Gathered per call, not kept: for a large model the rows' copies would take gigabytes.
            a, b, scale = self.stacks[module]
            a_rows, b_rows = a[index].transpose(1, 2), b[index].transpose(1, 2)
            shrunk = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]).to(a_rows.dtype), a_rows)
            shrunk = shrunk * scale[index][:, None, None]
            delta = torch.bmm(shrunk, b_rows).reshape(*output.shape)
            return output + delta.to(output.dtype)

        handles = [module.register_forward_hook(add_lora) for module in self.stacks]
        try:
            with host.disable_adapter():
                yield
        finally:
            for handle in handles:
                handle.remove()


class ModelServer:
    """A base model plus hot-swappable adapters. Thread-safe: generation runs on the batcher's thread
    under ``model_lock``, which adapter loads and unloads take to change the model."""

    def __init__(
        self,
        base_path: str | Path,
        *,
        device: str = "cpu",
        seed: int = 0,
        pvc_mount_root: str = "/mnt/pvc",
        cache_dir: str = "/tmp/kubetune-cache",
        adapter_roots: Sequence[str | Path] | None = None,
        trust_remote_code: bool = False,
        merge: bool = False,
        probe_tokens: int = PROBE_TOKENS,
    ) -> None:
        """``merge``: serve one adapter merged into the base weights (mergeAdapter); the base is then
        not served under its own name. ``probe_tokens``: tokens of the decode-latency probe after
        each load, 0 for none."""
        import torch
        from transformers import AutoTokenizer

        self.base_path = Path(base_path)
        self.device = torch.device(device)
        # trust_remote_code runs Python shipped with the model; only a plan that says so turns it on.
        self.trust_remote_code = trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path, trust_remote_code=trust_remote_code)
        # Batched generation of a decoder-only model pads on the left.
        self.tokenizer.padding_side = "left"
        # transformers stubs type .to()/.generate() too narrowly for a model loaded by Auto*.
        self.base: Any = self._load_base()
        self.base_config_sha256 = _config_sha256(self.base_path)
        self.base_name = self.base_path.name
        eos = self.base.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(int(self.tokenizer.eos_token_id))
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids, default=0))
        self.max_positions = int(getattr(self.base.config, "max_position_embeddings", 0) or 0) or None
        self._lora_host: Any = None  # peft.PeftModel wrapping self.base, once a LoRA adapter is loaded
        # The mixable LoRA adapters stacked for mixed batches, rebuilt when they change.
        self._stacked: tuple[int, StackedLora | None] | None = None
        self._attachments = 0  # counts adapter attach/detach: the stacks' cache key
        self.adapters: dict[str, LoadedAdapter] = {}
        self.states: dict[str, AdapterState] = {}
        self.routes: dict[str, Route] = {}
        # model_lock: held while generating and while an adapter is attached or detached.
        self.model_lock = threading.RLock()
        self._state_lock = threading.RLock()
        self._name_locks: dict[str, threading.Lock] = {}
        self._rng = random.Random(seed)
        self._pvc_mount_root, self._cache_dir = pvc_mount_root, cache_dir
        # None: any local path may be loaded (a developer's `kubetune serve --model`); a serving pod
        # always has roots (its volume mounts and download cache).
        self.adapter_roots = (
            None if adapter_roots is None else [Path(r).resolve() for r in [*adapter_roots, cache_dir]]
        )
        self._retry_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.merge = merge
        self.merged: str | None = None  # the adapter whose weights are merged into self.base
        self.probe_tokens = probe_tokens
        #: Decode latency by served name (adapters and the base); see TokenLatency.
        self.latency: dict[str, TokenLatency] = {}

    def _load_base(self) -> Any:
        from transformers import AutoModelForCausalLM

        # transformers stubs type .to()/.generate() too narrowly for a model loaded by Auto*.
        base = cast(
            Any,
            AutoModelForCausalLM.from_pretrained(self.base_path, trust_remote_code=self.trust_remote_code),
        )
        return base.to(self.device).eval()

    # -- adapters ------------------------------------------------------------------------------

    def _locate(self, name: str, source: str) -> Path:
        directory = (
            resolve_uri(source, pvc_mount_root=self._pvc_mount_root, cache_dir=self._cache_dir)
            if "://" in source
            else Path(source)
        )
        if self.adapter_roots is not None:
            resolved = directory.resolve()
            if not any(_inside(resolved, root) for root in self.adapter_roots):
                raise AdapterLoadError(
                    "PathOutsideRoots",
                    f"adapter {name}: {source} is outside the adapter roots "
                    f"({', '.join(str(r) for r in self.adapter_roots)})",
                )
        return directory

    def _verify(self, name: str, directory: Path, expected_sha256: str | None = None) -> dict[str, Any]:
        from kubetune.worker.artifact import read_manifest, verify_artifact

        if not directory.is_dir():
            raise AdapterLoadError("MissingFiles", f"adapter {name}: {directory} does not exist")
        manifest = read_manifest(directory)
        if manifest is None:
            raise AdapterLoadError(
                "MissingFiles",
                f"adapter {name}: {directory} is not a complete kubetune artifact (no kubetune.json)",
            )
        if expected_sha256 is not None and _manifest_sha256(directory) != expected_sha256.lower():
            raise AdapterLoadError(
                "HashMismatch",
                f"adapter {name}: kubetune.json has sha256 {_manifest_sha256(directory)[:12]}, "
                f"not the recorded {expected_sha256[:12]}",
            )
        root = directory.resolve()
        for relative in manifest.get("files", {}):
            if not _inside((directory / relative).resolve(), root):
                raise AdapterLoadError(
                    "PathOutsideRoots", f"adapter {name}: manifest file {relative!r} is outside the artifact"
                )
        problems = verify_artifact(directory)
        if problems:
            reason = "MissingFiles" if problems[0].endswith("missing") else "HashMismatch"
            raise AdapterLoadError(reason, f"adapter {name}: {problems[0]}")
        if manifest.get("format") not in ("peft", "bottleneck", "full"):
            raise AdapterLoadError(
                "UnsupportedArtifact", f"adapter {name}: unknown artifact format {manifest.get('format')!r}"
            )
        base = manifest.get("base_model") or {}
        if manifest.get("format") != "full" and base.get("config_sha256") != self.base_config_sha256:
            raise AdapterLoadError(
                "BaseModelMismatch",
                f"adapter {name} was trained on {base.get('uri')} (config "
                f"{str(base.get('config_sha256'))[:12]}), not on the served base "
                f"(config {str(self.base_config_sha256)[:12]})",
            )
        return manifest

    def _name_lock(self, name: str) -> threading.Lock:
        with self._state_lock:
            return self._name_locks.setdefault(name, threading.Lock())

    def declare(self, name: str, source: str | Path, sha256: str | None = None) -> AdapterState:
        """Record an adapter to serve from start-up, in state Loading; :meth:`load_declared` loads it."""
        check_name(name)
        with self._state_lock:
            state = AdapterState(name, str(source), sha256, declared=True)
            self.states[name] = state
            return state

    def load_declared(self) -> None:
        """Try every declared adapter still waiting for its first attempt; failures are recorded."""
        for state in list(self.states.values()):
            if state.declared and state.attempts == 0:
                # A failure is recorded in the state and retried in the background.
                with contextlib.suppress(ServingError):
                    self.load_adapter(state.name, state.source, sha256=state.expected_sha256)

    def load_adapter(self, name: str, source: str | Path, *, sha256: str | None = None) -> LoadedAdapter:
        """Load (or replace) adapter ``name`` from an artifact directory or URI, while serving.

        Raises :class:`AdapterLoadError` (also recorded in the adapter's state, and retried in the
        background after a backoff). A call for an adapter in backoff with the same source and hash
        answers the recorded failure without trying again.
        """
        check_name(name)
        if name == self.base_name or name in self.routes:
            raise ServingError(f"adapter name {name!r} is already the base model or a route")
        source = str(source)
        with self._name_lock(name):
            with self._state_lock:
                previous = self.states.get(name)
                loaded = self.adapters.get(name)
                if loaded is not None and loaded.source == source and (sha256 in (None, loaded.sha256)):
                    return loaded
                if (
                    previous is not None
                    and previous.state == "Failed"
                    and previous.source == source
                    and previous.expected_sha256 == sha256
                    and previous.next_retry_at is not None
                    and time.monotonic() < previous.next_retry_at
                ):
                    raise AdapterLoadError(
                        previous.reason,
                        previous.message,
                        retry_after=previous.next_retry_at - time.monotonic(),
                    )
                same = (
                    previous is not None and previous.source == source and previous.expected_sha256 == sha256
                )
                state = previous if same and previous is not None else AdapterState(name, source, sha256)
                if previous is not None and not same:
                    state.declared = previous.declared
                state.attempts += 1
                if loaded is None:
                    state.state, state.changed_at = "Loading", time.time()
                self.states[name] = state
            try:
                result = self._load(name, source, sha256)
            except Exception as exc:
                error = (
                    exc
                    if isinstance(exc, AdapterLoadError)
                    else AdapterLoadError("LoadError", f"adapter {name}: {type(exc).__name__}: {exc}")
                )
                backoff = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (state.attempts - 1))
                with self._state_lock:
                    if self.states.get(name) is state:
                        state.state, state.reason, state.message = "Failed", error.reason, str(error)
                        state.next_retry_at = time.monotonic() + backoff
                        state.changed_at = time.time()
                logger.warning(
                    "adapter %s failed to load (%s, attempt %d, retry in %.0f s): %s",
                    name,
                    error.reason,
                    state.attempts,
                    backoff,
                    error,
                )
                error.retry_after = backoff
                if error is exc:
                    raise
                raise error from exc
            with self._state_lock:
                state.state, state.reason, state.message = "Loaded", "", ""
                state.next_retry_at, state.changed_at = None, time.time()
            self.probe(name)
            release_freed_memory()
            return result

    def _load(self, name: str, source: str, sha256: str | None) -> LoadedAdapter:
        from kubetune.worker.artifact import load_trained_model

        directory = self._locate(name, source)
        manifest = self._verify(name, directory, sha256)
        # LoRA-format adapters (the ones vLLM could serve too) share the stacked LoRA host.
        info = methods.registry().get(manifest["method"])
        is_lora = manifest["format"] == "peft" and info is not None and info.serving.vllm
        if self.merge:
            return self._load_merged(
                name, source, directory, manifest, mergeable=bool(info and info.serving.merges)
            )
        kind = "lora" if is_lora else self._kind(name, directory, manifest)
        instance: Any = None
        # Built outside the lock, requests keep flowing meanwhile (the hooks only read the base).
        if kind == "own":
            instance = load_trained_model(directory, self.base_path, trust_remote_code=self.trust_remote_code)
            instance = instance.to(self.device).eval()
        elif kind == "hooks":
            instance = self._read_hooks(name, directory, manifest)
        with self.model_lock:
            if name in self.adapters:
                self._detach(name)
            if kind == "prompt":
                from peft import PeftModel

                # Prompt learning leaves the base's modules alone: the wrapper only adds past key values.
                instance = PeftModel.from_pretrained(self.base, directory).eval()
            if is_lora:
                if self._lora_host is None:
                    from peft import PeftModel

                    self._lora_host = PeftModel.from_pretrained(
                        self.base, directory, adapter_name=name
                    ).eval()
                else:
                    self._lora_host.load_adapter(directory, adapter_name=name)
                config = self._lora_host.peft_config[name]
                mixable = not getattr(config, "use_dora", False)
            else:
                mixable = False
            loaded = LoadedAdapter(
                name=name,
                source=source,
                sha256=_manifest_sha256(directory),
                method=manifest["method"],
                format=manifest["format"],
                shared=is_lora,
                instance=instance,
                mixable=mixable,
                kind=kind,
            )
            self.adapters[name] = loaded
            self._attachments += 1
        logger.info("loaded adapter %s (%s) from %s", name, loaded.method, directory)
        return loaded

    def _kind(self, name: str, directory: Path, manifest: dict[str, Any]) -> str:
        """How a non-LoRA artifact is served: "hooks", "prompt" or "own" (a full fine-tune)."""
        if manifest["format"] == "bottleneck":
            return "hooks"
        if manifest["format"] == "full":
            return "own"
        from peft import PeftConfig, PeftType

        try:
            config = PeftConfig.from_pretrained(str(directory))
        except Exception as exc:
            raise AdapterLoadError(
                "UnsupportedArtifact", f"adapter {name}: unreadable PEFT config: {type(exc).__name__}: {exc}"
            ) from exc
        if config.peft_type == PeftType.IA3:
            return "hooks"
        if config.is_prompt_learning:
            return "prompt"
        raise AdapterLoadError(
            "UnsupportedArtifact", f"adapter {name}: PEFT adapters of type {config.peft_type} are not served"
        )

    def _read_hooks(self, name: str, directory: Path, manifest: dict[str, Any]) -> Any:
        from kubetune.worker.serving_hooks import BottleneckHooks, IA3Hooks

        try:
            if manifest["format"] == "bottleneck":
                return BottleneckHooks(self.base, directory)
            return IA3Hooks.read(self.base, directory)
        except ValueError as exc:  # BottleneckFormatError and UnsupportedArchitectureError too
            raise AdapterLoadError("UnsupportedArtifact", f"adapter {name}: {exc}") from exc

    def _base_only(self) -> contextlib.AbstractContextManager[Any]:
        """The base computing as itself: the LoRA host's layers, injected into it, switched off."""
        return self._lora_host.disable_adapter() if self._lora_host is not None else contextlib.nullcontext()

    def _load_merged(
        self, name: str, source: str, directory: Path, manifest: dict[str, Any], *, mergeable: bool
    ) -> LoadedAdapter:
        """Merge the adapter into the base weights (PEFT's merge_and_unload): plain layers, no adapter
        cost per token. The one adapter of the server; replacing it starts from a fresh base."""
        from peft import PeftModel

        if not (mergeable and manifest["format"] == "peft"):
            raise AdapterLoadError(
                "UnsupportedArtifact",
                f"adapter {name}: mergeAdapter merges PEFT adapters of "
                f"{', '.join(n for n, info in methods.registry().items() if info.serving.merges)}, "
                f"not {manifest['method']} ({manifest['format']})",
            )
        with self.model_lock:
            others = [n for n in self.adapters if n != name]
            if others:
                raise AdapterLoadError(
                    "UnsupportedArtifact",
                    f"adapter {name}: mergeAdapter serves one adapter, {others[0]} is it",
                )
            if self.merged is not None:  # the base holds another version's weights
                self.adapters.pop(self.merged, None)
                self.base, self.merged = self._load_base(), None
            unmerged = PeftModel.from_pretrained(self.base, directory).eval()
            unmerged_ms = self._probe_model(unmerged)
            self.base = unmerged.merge_and_unload().eval()
            self.merged = name
            self.latency[name] = TokenLatency(unmerged_probe_ms=unmerged_ms)
            loaded = LoadedAdapter(
                name=name,
                source=source,
                sha256=_manifest_sha256(directory),
                method=manifest["method"],
                format=manifest["format"],
                shared=False,
                instance=self.base,
                kind="merged",
            )
            self.adapters[name] = loaded
            self._attachments += 1
        logger.info("merged adapter %s (%s) from %s into the base", name, loaded.method, directory)
        return loaded

    def _detach(self, name: str) -> None:
        loaded = self.adapters.pop(name)
        self.latency.pop(name, None)
        self._attachments += 1
        if loaded.shared:
            self._lora_host.delete_adapter(name)
        if name == self.merged:  # the base's own weights again
            self.base, self.merged = self._load_base(), None

    def unload_adapter(self, name: str) -> None:
        """Stop serving ``name`` (loaded or failed); it is no longer retried."""
        with self._name_lock(name):  # after a load of the same name in flight
            with self._state_lock:
                state = self.states.pop(name, None)
            with self.model_lock:
                if name in self.adapters:
                    self._detach(name)
                elif state is None:
                    raise UnknownModel(f"adapter {name!r} is not loaded")
        release_freed_memory()
        for route in [r for r in self.routes.values() if any(a == name for a, _ in r.backends)]:
            logger.warning("route %s now names an unloaded adapter %s", route.name, name)
        logger.info("unloaded adapter %s", name)

    def retry_due(self) -> None:
        """Retry every failed adapter whose backoff has passed (called by the retry thread)."""
        now = time.monotonic()
        for state in list(self.states.values()):
            if state.state == "Failed" and state.next_retry_at is not None and state.next_retry_at <= now:
                state.next_retry_at = None  # so a concurrent load call does not answer from backoff
                with contextlib.suppress(ServingError):
                    self.load_adapter(state.name, state.source, sha256=state.expected_sha256)

    # -- decode latency ---------------------------------------------------------------------------

    def _probe_prompt(self) -> list[int]:
        return self.encode("hello") or [self.pad_id]

    def probe(self, name: str) -> float | None:
        """Measure ``name``'s (an adapter's or the base's) decode latency, ms per token, one sequence
        of ``probe_tokens`` tokens alone, as it is served; recorded in :attr:`latency`. A probe that
        fails is logged and records nothing: it never fails a load."""
        if self.probe_tokens <= 0:
            return None
        timer = step_timer()
        try:
            self.generate_rows(
                self.batch_group(name),
                adapters=[name],
                prompts=[self._probe_prompt()],
                max_new_tokens=self.probe_tokens + 1,
                logits_processor=_no_eos(self.eos_ids),
                stopping_criteria=timer,
            )
        except Exception as exc:  # a probe is a measurement; serving goes on without it
            logger.warning("latency probe of %s failed: %s: %s", name, type(exc).__name__, exc)
            return None
        ms: float | None = timer.ms_per_token()
        with self._state_lock:
            self.latency.setdefault(name, TokenLatency()).probe_ms = ms
        return ms

    def _probe_model(self, model: Any) -> float | None:
        """The probe of :meth:`probe` on a model that is not (yet) served: mergeAdapter's unmerged one."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        if self.probe_tokens <= 0:
            return None
        timer = step_timer()
        prompt = torch.tensor([self._probe_prompt()], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=self.probe_tokens + 1,
                do_sample=False,
                pad_token_id=self.pad_id,
                logits_processor=LogitsProcessorList([_no_eos(self.eos_ids)]),
                stopping_criteria=StoppingCriteriaList([timer]),
            )
        result: float | None = timer.ms_per_token()
        return result

    def observe_decode(self, names: set[str], ms_per_token: float) -> None:
        """A batch that served ``names`` decoded at ``ms_per_token`` (the batcher calls this)."""
        with self._state_lock:
            for name in names:
                if name in self.adapters or name == self.base_name:
                    self.latency.setdefault(name, TokenLatency()).observe(ms_per_token)

    def start_background(self, interval_s: float = 1.0) -> None:
        """Probe the base, load the declared adapters, then retry failed ones, on a daemon thread."""

        def loop() -> None:
            self.probe(self.base_name)  # before any merge: the base's own weights
            self.load_declared()
            while not self._stopping.wait(interval_s):
                self.retry_due()

        self._retry_thread = threading.Thread(target=loop, name="kubetune-adapters", daemon=True)
        self._retry_thread.start()

    def stop_background(self) -> None:
        self._stopping.set()

    def ready(self) -> tuple[bool, list[str]]:
        """(ready, names still waiting for their first load attempt): Failed adapters do not block."""
        waiting = [s.name for s in self.states.values() if s.declared and s.state == "Loading"]
        return not waiting, waiting

    # -- routes --------------------------------------------------------------------------------

    def set_route(self, name: str, backends: list[tuple[str, int]]) -> None:
        check_name(name, "route")
        if name == self.base_name or name in self.adapters or name in self.states:
            raise ServingError(f"route name {name!r} is already the base model or an adapter")
        if not backends or any(weight <= 0 for _, weight in backends):
            raise ServingError(f"route {name}: backends need positive weights")
        self.routes[name] = Route(name, tuple(backends))

    def replace_routes(self, routes: dict[str, list[tuple[str, int]]]) -> None:
        """Swap the whole route table at once (what the operator sends on every change)."""
        with self._state_lock:
            previous, self.routes = self.routes, {}
            try:
                for name, backends in routes.items():
                    self.set_route(name, backends)
            except ServingError:
                self.routes = previous
                raise

    def model_names(self) -> list[str]:
        base = [] if self.merged else [self.base_name]
        return [*base, *self.adapters, *self.routes]

    def resolve(self, model: str) -> str:
        """The adapter (or base) name a request for ``model`` is served by.

        A route picks a backend by weight among its loaded backends, so a failed canary leaves
        the stable adapter serving; 503 when none is loaded.
        """
        route = self.routes.get(model)
        if route is not None:
            live = [(a, w) for a, w in route.backends if a in self.adapters]
            if not live:
                raise ModelNotReady(f"route {model!r}: none of its adapters is loaded")
            return self._rng.choices([a for a, _ in live], weights=[w for _, w in live])[0]
        if model == self.base_name and self.merged:
            raise UnknownModel(f"model {model!r} is not served: adapter {self.merged} is merged into it")
        if model == self.base_name or model in self.adapters:
            return model
        state = self.states.get(model)
        if state is not None:
            detail = f": {state.reason}: {state.message}" if state.state == "Failed" else ""
            raise ModelNotReady(f"model {model!r} is {state.state}{detail}")
        raise UnknownModel(f"model {model!r} is not served here (served: {', '.join(self.model_names())})")

    # -- generation ----------------------------------------------------------------------------

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)

    def encode(self, prompt: str) -> list[int]:
        return [int(i) for i in self.tokenizer(prompt)["input_ids"]]

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def _stacked_lora(self) -> StackedLora | None:
        """The stacks of the mixable LoRA adapters now loaded (under ``model_lock``)."""
        if self._stacked is None or self._stacked[0] != self._attachments:
            names = sorted(a.name for a in self.adapters.values() if a.shared and a.mixable)
            self._stacked = None  # the previous stacks go first
            self._stacked = (self._attachments, StackedLora.build(self._lora_host, names))
            release_freed_memory()
        return self._stacked[1]

    def batch_group(self, adapter: str) -> Hashable:
        """Which ``generate`` call can serve ``adapter``: LoRA adapters that PEFT can mix and the base
        share one; any other adapter has its own. Raises :class:`UnknownModel` if it was unloaded."""
        if adapter == self.base_name:
            if self.merged:
                raise UnknownModel(
                    f"model {adapter!r} is not served: adapter {self.merged} is merged into it"
                )
            return "lora" if self._lora_host is not None else "base"
        loaded = self.adapters.get(adapter)
        if loaded is None:
            raise UnknownModel(f"adapter {adapter!r} was unloaded")
        return "lora" if loaded.mixable else ("adapter", adapter)

    def generate_rows(
        self,
        group: Hashable,
        *,
        adapters: list[str],
        prompts: list[list[int]],
        max_new_tokens: int,
        logits_processor: Any,
        stopping_criteria: Any,
    ) -> None:
        """One batched ``generate`` over ``prompts`` (left-padded), row ``i`` served by ``adapters[i]``.

        Results reach the caller through ``stopping_criteria`` (one or a list; they see every token);
        the output tensor itself is not needed.
        """
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[i, width - len(prompt) :] = 1
        kwargs: dict[str, Any] = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "max_new_tokens": max_new_tokens,
            # Sampling happens per row in the logits processor; generate takes its argmax.
            "do_sample": False,
            "temperature": None,
            "top_p": None,
            "top_k": None,
            "pad_token_id": self.pad_id,
            "logits_processor": LogitsProcessorList([logits_processor]),
            "stopping_criteria": StoppingCriteriaList(
                stopping_criteria if isinstance(stopping_criteria, list) else [stopping_criteria]
            ),
        }
        with self.model_lock, torch.inference_mode():
            for name in set(adapters):
                self.batch_group(name)  # an adapter unloaded since the batch was formed: 404
            if group == "base":
                self.base.generate(**kwargs)
            elif group == "lora":
                names = [BASE_IN_MIXED_BATCH if a == self.base_name else a for a in adapters]
                if set(names) == {BASE_IN_MIXED_BATCH}:
                    with self._lora_host.disable_adapter():
                        self._lora_host.generate(**kwargs)
                elif len(set(names)) == 1:
                    # One adapter: a plain forward, cheaper than the mixed batch's per-adapter masks.
                    self._lora_host.set_adapter(names[0])
                    self._lora_host.generate(**kwargs)
                else:
                    stacked = self._stacked_lora()
                    if stacked is None:
                        self._lora_host.generate(**kwargs, adapter_names=names)
                    else:
                        with stacked.rows(self._lora_host, names):
                            self._lora_host.generate(**kwargs)
            else:
                loaded = self.adapters[adapters[0]]
                if loaded.shared:  # a LoRA adapter PEFT cannot mix (DoRA)
                    self._lora_host.set_adapter(loaded.name)
                    self._lora_host.generate(**kwargs)
                elif loaded.kind == "hooks":
                    with self._base_only(), loaded.instance.attached(self.base):
                        self.base.generate(**kwargs)
                elif loaded.kind == "prompt":
                    with self._base_only():
                        loaded.instance.generate(**kwargs)
                else:
                    loaded.instance.generate(**kwargs)


def parse_route(text: str) -> tuple[str, list[tuple[str, int]]]:
    """``support=support-v1:90,support-v2:10`` -> ("support", [("support-v1", 90), ("support-v2", 10)])."""
    name, _, spec = text.partition("=")
    backends = []
    for part in spec.split(","):
        adapter, _, weight = part.partition(":")
        backends.append((adapter.strip(), int(weight or 1)))
    if not name or not spec:
        raise ValueError(f"route {text!r}: expected NAME=ADAPTER:WEIGHT[,ADAPTER:WEIGHT...]")
    return name.strip(), backends


def describe(server: ModelServer) -> dict[str, Any]:
    """What ``GET /v1/adapters`` returns.

    ``adapters``: the loaded adapters (state ``Loaded``), as before; ``states``: every adapter the
    server was asked to serve, with ``state`` Loading/Loaded/Failed, ``reason``, ``message``,
    ``attempts`` and ``retry_in_seconds``; ``ready``: what ``/ready`` answers.
    """
    ready, waiting = server.ready()
    latency = dict(server.latency)
    none = TokenLatency()
    return {
        "base": {
            "name": server.base_name,
            "path": str(server.base_path),
            "config_sha256": server.base_config_sha256,
            **latency.get(server.base_name, none).describe(),
        },
        "adapters": [
            {
                "name": a.name,
                "source": a.source,
                "sha256": a.sha256,
                "method": a.method,
                "format": a.format,
                "shared_base": a.kind != "own",
                "state": "Loaded",
                **latency.get(a.name, none).describe(),
            }
            for a in list(server.adapters.values())
        ],
        "states": [s.describe() for s in list(server.states.values())],
        "routes": [
            {"name": r.name, "backends": [{"adapter": a, "weight": w} for a, w in r.backends]}
            for r in list(server.routes.values())
        ],
        "ready": ready,
        "waiting": waiting,
    }


def dumps(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"))
