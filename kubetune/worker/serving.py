"""The serving runtime: one base model, many adapters, an OpenAI-compatible API.

``ModelServer`` holds the base model once and the adapters loaded onto it. LoRA adapters (the common
case, including QLoRA's) share a single PEFT wrapper over the base and are switched per request with
``set_adapter``; adapters of other kinds (IA3, prefix, bottleneck, full) get their own model instance,
a documented cost of this first runtime. Requests are served one at a time under a lock, which keeps
adapter switching correct; batching across adapters is future work.

Adapters are verified before they serve: the artifact's ``kubetune.json`` must be complete, every file
must match its recorded sha256, and the adapter's base-model config hash must match the served base.
Loading and unloading happen in the running server (hot swap), through the vLLM-compatible
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` endpoints or :meth:`ModelServer.load_adapter`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

logger = logging.getLogger("kubetune.serve")


class ServingError(Exception):
    """A request or adapter operation that cannot be done; ``status`` is the HTTP status."""

    status = 400
    kind = "invalid_request_error"


class UnknownModel(ServingError):
    status, kind = 404, "model_not_found"


class AdapterInvalid(ServingError):
    status, kind = 422, "adapter_invalid"


@dataclass
class LoadedAdapter:
    name: str
    source: str
    sha256: str
    method: str
    format: str
    shared: bool  # True: a named adapter on the shared LoRA wrapper; False: its own model instance
    instance: Any = None
    loaded_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Route:
    """A model name that picks one of several adapters by weight."""

    name: str
    backends: tuple[tuple[str, int], ...]


def _config_sha256(model_dir: Path) -> str | None:
    from kubetune.worker.engine import config_sha256

    return config_sha256(model_dir)


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
        raise AdapterInvalid(str(exc)) from exc
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
        raise AdapterInvalid(f"{uri}: download failed: {type(exc).__name__}: {exc}") from exc
    return target


def _manifest_sha256(directory: Path) -> str:
    return hashlib.sha256((directory / "kubetune.json").read_bytes()).hexdigest()


class ModelServer:
    """A base model plus hot-swappable adapters. Thread-safe; generation is serialised."""

    def __init__(
        self,
        base_path: str | Path,
        *,
        device: str = "cpu",
        seed: int = 0,
        pvc_mount_root: str = "/mnt/pvc",
        cache_dir: str = "/tmp/kubetune-cache",
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_path = Path(base_path)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        # transformers stubs type .to()/.generate() too narrowly for a model loaded by Auto*.
        self.base: Any = cast(Any, AutoModelForCausalLM.from_pretrained(self.base_path))
        self.base.to(self.device)
        self.base.eval()
        self.base_config_sha256 = _config_sha256(self.base_path)
        self.base_name = self.base_path.name
        self._lora_host: Any = None  # peft.PeftModel wrapping self.base, once a LoRA adapter is loaded
        self.adapters: dict[str, LoadedAdapter] = {}
        self.routes: dict[str, Route] = {}
        self._lock = threading.RLock()
        self._rng = random.Random(seed)
        self._pvc_mount_root, self._cache_dir = pvc_mount_root, cache_dir

    # -- adapters ------------------------------------------------------------------------------

    def _verify(self, name: str, directory: Path) -> dict[str, Any]:
        from kubetune.worker.artifact import read_manifest, verify_artifact

        if not directory.is_dir():
            raise AdapterInvalid(f"adapter {name}: {directory} does not exist")
        manifest = read_manifest(directory)
        if manifest is None:
            raise AdapterInvalid(
                f"adapter {name}: {directory} is not a complete kubetune artifact (no kubetune.json)"
            )
        problems = verify_artifact(directory)
        if problems:
            raise AdapterInvalid(f"adapter {name}: {problems[0]}")
        base = manifest.get("base_model") or {}
        if manifest.get("format") != "full" and base.get("config_sha256") != self.base_config_sha256:
            raise AdapterInvalid(
                f"adapter {name} was trained on {base.get('uri')} (config "
                f"{str(base.get('config_sha256'))[:12]}), not on the served base "
                f"(config {str(self.base_config_sha256)[:12]})"
            )
        return manifest

    def load_adapter(self, name: str, source: str | Path) -> LoadedAdapter:
        """Load (or replace) adapter ``name`` from an artifact directory or URI, while serving."""
        from kubetune.worker.artifact import load_trained_model

        if name == self.base_name or name in self.routes:
            raise ServingError(f"adapter name {name!r} is already the base model or a route")
        source = str(source)
        directory = (
            resolve_uri(source, pvc_mount_root=self._pvc_mount_root, cache_dir=self._cache_dir)
            if "://" in source
            else Path(source)
        )
        manifest = self._verify(name, directory)
        is_lora = manifest["format"] == "peft" and manifest["method"] in ("lora", "qlora")
        with self._lock:
            if name in self.adapters:
                self.unload_adapter(name)
            if is_lora:
                if self._lora_host is None:
                    from peft import PeftModel

                    self._lora_host = PeftModel.from_pretrained(
                        self.base, directory, adapter_name=name
                    ).eval()
                else:
                    self._lora_host.load_adapter(directory, adapter_name=name)
                instance = None
            else:
                instance = load_trained_model(directory, self.base_path).to(self.device).eval()
            loaded = LoadedAdapter(
                name=name,
                source=source,
                sha256=_manifest_sha256(directory),
                method=manifest["method"],
                format=manifest["format"],
                shared=is_lora,
                instance=instance,
            )
            self.adapters[name] = loaded
        logger.info("loaded adapter %s (%s) from %s", name, loaded.method, directory)
        return loaded

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            loaded = self.adapters.pop(name, None)
            if loaded is None:
                raise UnknownModel(f"adapter {name!r} is not loaded")
            if loaded.shared:
                self._lora_host.delete_adapter(name)
            for route in [r for r in self.routes.values() if any(a == name for a, _ in r.backends)]:
                logger.warning("route %s now names an unloaded adapter %s", route.name, name)
        logger.info("unloaded adapter %s", name)

    def set_route(self, name: str, backends: list[tuple[str, int]]) -> None:
        if name == self.base_name or name in self.adapters:
            raise ServingError(f"route name {name!r} is already the base model or an adapter")
        if not backends or any(weight <= 0 for _, weight in backends):
            raise ServingError(f"route {name}: backends need positive weights")
        self.routes[name] = Route(name, tuple(backends))

    def replace_routes(self, routes: dict[str, list[tuple[str, int]]]) -> None:
        """Swap the whole route table at once (what the operator sends on every change)."""
        with self._lock:
            previous, self.routes = self.routes, {}
            try:
                for name, backends in routes.items():
                    self.set_route(name, backends)
            except ServingError:
                self.routes = previous
                raise

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters, *self.routes]

    def resolve(self, model: str) -> str:
        """The adapter (or base) name a request for ``model`` is served by."""
        route = self.routes.get(model)
        if route is not None:
            names = [a for a, _ in route.backends]
            return self._rng.choices(names, weights=[w for _, w in route.backends])[0]
        if model == self.base_name or model in self.adapters:
            return model
        raise UnknownModel(f"model {model!r} is not served here (served: {', '.join(self.model_names())})")

    # -- generation ----------------------------------------------------------------------------

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)

    def generate(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """Complete ``prompt`` with ``model``; returns text, served adapter, token counts, finish reason."""
        import torch

        served = self.resolve(model)
        encoded = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        prompt_tokens = int(encoded["input_ids"].shape[1])
        sampling = temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "do_sample": sampling,
            "pad_token_id": self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id,
        }
        if sampling:
            kwargs.update(temperature=temperature, top_p=top_p)
        with self._lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            loaded = self.adapters.get(served)
            if loaded is None:  # the base model
                if self._lora_host is not None:
                    with self._lora_host.disable_adapter():
                        output = self._lora_host.generate(**encoded, **kwargs)
                else:
                    output = self.base.generate(**encoded, **kwargs)
            elif loaded.shared:
                self._lora_host.set_adapter(served)
                output = self._lora_host.generate(**encoded, **kwargs)
            else:
                output = loaded.instance.generate(**encoded, **kwargs)
        new_tokens = output[0][prompt_tokens:]
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        finish = "length" if len(new_tokens) >= max_tokens else "stop"
        for marker in stop or []:
            if marker and marker in text:
                text, finish = text[: text.index(marker)], "stop"
        return {
            "text": text,
            "served_by": served,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(new_tokens),
            "finish_reason": finish,
        }


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
    """What ``GET /v1/adapters`` returns: the adapters, their sources and manifest hashes."""
    return {
        "base": {
            "name": server.base_name,
            "path": str(server.base_path),
            "config_sha256": server.base_config_sha256,
        },
        "adapters": [
            {
                "name": a.name,
                "source": a.source,
                "sha256": a.sha256,
                "method": a.method,
                "format": a.format,
                "shared_base": a.shared,
                "state": "Loaded",
            }
            for a in server.adapters.values()
        ],
        "routes": [
            {"name": r.name, "backends": [{"adapter": a, "weight": w} for a, w in r.backends]}
            for r in server.routes.values()
        ],
    }


def dumps(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"))
