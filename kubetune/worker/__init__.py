"""The training and serving runtime. ``kubetune.worker.plan`` is importable without torch.

Importing peft imports bitsandbytes whenever it is installed (``peft.helpers`` does so at module
level), and bitsandbytes imports torch's inductor compiler: about 4 CPU-seconds in every worker
process, although only QLoRA uses it. The module is therefore loaded lazily: ``import bitsandbytes``
and ``find_spec`` still succeed, and the real import happens at the first attribute access, which
only the QLoRA path makes (it touches the module up front, from the main thread, because Python
3.11's lazy loader is not thread-safe).

OpenMP's threads (torch's intra-op pool) spin while they wait for work unless told otherwise. A pod
rarely owns its cores: under a CPU limit the spinning spends the CFS quota, and beside other pods it
takes their time. Measured on 2 busy cores, 60 steps of a small model with 2 threads: 20.8 CPU-s
spinning, 4.2 passive, 3.2 with one thread. So the worker defaults to passive waiting; a pod with
dedicated cores can set ``OMP_WAIT_POLICY=ACTIVE``. It must be set before torch loads its OpenMP
runtime, which reads it once.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

_DEFERRED = frozenset({"bitsandbytes"})


class _DeferredImport(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name not in _DEFERRED:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


def _defer_heavy_optional_imports() -> None:
    if any(isinstance(finder, _DeferredImport) for finder in sys.meta_path):
        return
    if _DEFERRED.isdisjoint(sys.modules):
        sys.meta_path.insert(0, _DeferredImport())


def skip_bitsandbytes() -> None:
    """For a process that will quantize nothing: make bitsandbytes look absent.

    Deferring it is not enough for LoRA: for every layer it injects, peft checks ``find_spec`` and then
    ``isinstance`` against bitsandbytes' layer classes, which loads the module anyway. peft caches that
    check per process, so only a process that runs one known plan (``kubetune train``) may decide this;
    in-process callers never do.
    """
    module = sys.modules.get("bitsandbytes")
    if module is None or type(module).__name__ == "_LazyModule":  # absent, or not executed yet
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]


_defer_heavy_optional_imports()
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
