"""The training and serving runtime. ``kubetune.worker.plan`` is importable without torch.

Importing peft imports bitsandbytes whenever it is installed (``peft.helpers`` does so at module
level), and bitsandbytes imports torch's inductor compiler: about 4 CPU-seconds in every worker
process, although only QLoRA uses it. The module is therefore loaded lazily: ``import bitsandbytes``
and ``find_spec`` still succeed, and the real import happens at the first attribute access, which
only the QLoRA path makes (it touches the module up front, from the main thread, because Python
3.11's lazy loader is not thread-safe).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
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


_defer_heavy_optional_imports()
