"""Resolve the plan's URIs to local paths: ``file://``, bare absolute paths, ``pvc://``, ``hf://``, ``s3://``.

Remote inputs are downloaded into ``storage.cache_dir``; local ones are used in place. Paths never
escape their root: ``..`` segments are refused before anything is touched, and a ``pvc://`` path must
still lie under its claim's mount after symlinks are resolved.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from kubetune.worker.errors import (
    AccessDenied,
    DatasetNotFound,
    KubetuneError,
    ModelNotFound,
    PlanInvalid,
    SourceUnavailable,
)
from kubetune.worker.plan import StorageSpec

SCHEMES = ("file", "pvc", "hf", "s3")


def _check_segments(uri: str, path: str) -> None:
    if any(part == ".." for part in path.replace("\\", "/").split("/")):
        raise PlanInvalid(f"{uri}: '..' segments are not allowed in URIs")


def split_uri(uri: str) -> tuple[str, str]:
    """Return ``(scheme, rest)``; a bare absolute path is ``file``. Raises :class:`PlanInvalid`."""
    if uri.startswith("/"):
        _check_segments(uri, uri)
        return "file", uri
    parsed = urlparse(uri)
    if parsed.scheme not in SCHEMES:
        raise PlanInvalid(f"{uri}: unsupported URI scheme (use file://, pvc://, hf:// or s3://)")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise PlanInvalid(f"{uri}: file:// URIs must be absolute (file:///path)")
        rest = parsed.path
    else:
        rest = f"{parsed.netloc}{parsed.path}".strip("/")
        if not parsed.netloc:
            raise PlanInvalid(f"{uri}: missing {'claim' if parsed.scheme == 'pvc' else 'name'}")
    _check_segments(uri, rest)
    return parsed.scheme, rest


def local_path(uri: str, storage: StorageSpec) -> Path | None:
    """The local path a ``file``/``pvc`` URI names, or ``None`` for remote schemes."""
    scheme, rest = split_uri(uri)
    if scheme == "file":
        return Path(rest)
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        root = Path(storage.pvc_mount_root) / claim
        path = root / sub if sub else root
        # Symlinks inside a volume could point anywhere on the node's view of the pod.
        resolved = path.resolve()
        if resolved != root.resolve() and root.resolve() not in resolved.parents:
            raise PlanInvalid(f"{uri}: resolves outside the volume mount {root}")
        return path
    return None


def _hf_error(uri: str, exc: Exception, missing: type[KubetuneError]) -> KubetuneError:
    name = type(exc).__name__
    if name in ("GatedRepoError",) or "401" in str(exc) or "403" in str(exc):
        return AccessDenied(f"{uri}: access denied ({name}); set the token in the credentials secret")
    if name in ("RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError"):
        return missing(f"{uri}: not found on the Hugging Face Hub ({name})")
    return SourceUnavailable(f"{uri}: download failed: {name}: {exc}")


def resolve_model(uri: str, revision: str | None, token_env: str, storage: StorageSpec) -> Path:
    """Return a local directory holding the model (config, weights, tokenizer)."""
    path = local_path(uri, storage)
    if path is not None:
        if not path.is_dir():
            raise ModelNotFound(f"{uri}: no such model directory")
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{uri}: directory has no config.json")
        return path
    scheme, rest = split_uri(uri)
    target = Path(storage.cache_dir) / "models" / scheme / rest / (revision or "default")
    if scheme == "hf":
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(
                repo_id=rest,
                revision=revision,
                token=os.environ.get(token_env) or None,
                local_dir=target,
                # Weights in safetensors only: pickled .bin weights can run code when loaded.
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"],
            )
        except Exception as exc:
            raise _hf_error(uri, exc, ModelNotFound) from exc
        return target
    _fsspec_get(uri, target, recursive=True, missing=ModelNotFound)
    return target


def resolve_file(uri: str, storage: StorageSpec, *, missing: type[KubetuneError] = DatasetNotFound) -> Path:
    """Return a local file for a dataset URI (``hf://datasets/org/name/path/in/repo`` for the Hub)."""
    path = local_path(uri, storage)
    if path is not None:
        if not path.is_file():
            raise missing(f"{uri}: no such file")
        return path
    scheme, rest = split_uri(uri)
    target = Path(storage.cache_dir) / "files" / scheme / rest
    if scheme == "hf":
        from huggingface_hub import hf_hub_download

        parts = rest.split("/")
        if len(parts) < 4 or parts[0] != "datasets":
            raise PlanInvalid(f"{uri}: dataset files on the Hub are hf://datasets/<org>/<name>/<file>")
        try:
            downloaded = hf_hub_download(
                repo_id="/".join(parts[1:3]),
                filename="/".join(parts[3:]),
                repo_type="dataset",
                token=os.environ.get("HF_TOKEN") or None,
                local_dir=Path(storage.cache_dir) / "files" / "hf",
            )
        except Exception as exc:
            raise _hf_error(uri, exc, missing) from exc
        return Path(downloaded)
    _fsspec_get(uri, target, recursive=False, missing=missing)
    return target


def _fsspec_get(uri: str, target: Path, *, recursive: bool, missing: type[KubetuneError]) -> None:
    import fsspec

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fs, remote = fsspec.core.url_to_fs(uri)
        if not fs.exists(remote):
            raise missing(f"{uri}: not found")
        fs.get(remote.rstrip("/") + ("/" if recursive else ""), str(target), recursive=recursive)
    except KubetuneError:
        raise
    except PermissionError as exc:
        raise AccessDenied(f"{uri}: access denied: {exc}") from exc
    except Exception as exc:
        raise SourceUnavailable(f"{uri}: download failed: {type(exc).__name__}: {exc}") from exc
