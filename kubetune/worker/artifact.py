"""The published artifact: staging, the ``kubetune.json`` manifest, atomic publication, and loading.

Layout of an artifact directory::

    adapter_config.json, adapter_model.safetensors      # format "peft" (lora, qlora, ia3, prefix)
    config.json, model.safetensors, ...                 # format "full"
    kubetune_adapter_config.json, adapter_model.safetensors   # format "bottleneck"
    tokenizer.json, tokenizer_config.json, ...          # always
    logs/                                               # TensorBoard event files
    kubetune.json                                       # manifest, always written last

A local artifact is assembled in ``.<name>.staging`` beside the final directory (same filesystem) and
made visible by one ``rename``: a reader either sees no directory or a complete one. For ``s3://`` the
files are uploaded first and ``kubetune.json`` last, so its presence is the completion marker there.
The manifest lists the sha256 and size of every other file; ``sha256(kubetune.json)`` identifies the
whole artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from kubetune.worker.errors import OutputError

MANIFEST = "kubetune.json"
MANIFEST_VERSION = 1
#: Most points kept in the manifest's ``loss_curve``: enough to draw it, small enough to read at once.
LOSS_CURVE_POINTS = 200


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_inventory(directory: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "size"}}`` for every file under ``directory`` except the manifest."""
    inventory: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if path.is_file() and relative != MANIFEST:
            inventory[relative] = {"sha256": file_sha256(path), "size": path.stat().st_size}
    return inventory


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add the file inventory and total size to ``manifest`` and write it; returns what was written."""
    files = file_inventory(directory)
    document = {"manifest_version": MANIFEST_VERSION, **manifest, "files": files}
    document["size_bytes"] = sum(entry["size"] for entry in files.values())
    (directory / MANIFEST).write_bytes(manifest_bytes(document))
    return document


def manifest_bytes(document: dict[str, Any]) -> bytes:
    """The exact bytes of ``kubetune.json`` for a manifest document."""
    return (json.dumps(document, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


def artifact_sha256(document: dict[str, Any]) -> str:
    """sha256 of ``kubetune.json``, which lists the sha256 of every other file: the artifact's identity."""
    return hashlib.sha256(manifest_bytes(document)).hexdigest()


def success_summary(document: dict[str, Any], uri: str, limit: int = 4000) -> str:
    """One-line JSON for the termination message of a successful run (the operator's ``status.result``).

    Keys: ``uri``, ``sha256`` (of ``kubetune.json``), ``sizeBytes``, ``format``, ``metrics`` and
    ``progress`` (the final step). Metrics are dropped if the line would exceed ``limit`` bytes, since
    the kubelet keeps only 4096.
    """
    metrics = document.get("metrics", {})
    summary: dict[str, Any] = {
        "uri": uri,
        "sha256": artifact_sha256(document),
        "sizeBytes": document.get("size_bytes", 0),
        "format": document.get("format"),
        "metrics": {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()},
        "progress": {
            "step": metrics.get("steps"),
            "totalSteps": metrics.get("steps"),
            "epoch": metrics.get("epochs"),
            "loss": metrics.get("train_loss"),
            "evalLoss": metrics.get("eval_loss"),
        },
    }
    text = json.dumps(summary, separators=(",", ":"), default=str)
    if len(text.encode()) > limit:
        summary.pop("metrics")
        text = json.dumps(summary, separators=(",", ":"), default=str)
    return text


def record_loss_point(
    curve: list[dict[str, Any]],
    step: int,
    *,
    loss: float | None = None,
    eval_loss: float | None = None,
    limit: int = LOSS_CURVE_POINTS,
) -> None:
    """Add ``loss`` and/or ``eval_loss`` at optimizer step ``step`` to ``curve`` (in place).

    A point is ``{"step", "loss"?, "eval_loss"?}``; values for the step already last in the curve
    join that point. Past ``limit`` points every other older point is dropped (first and last
    kept), so a long run keeps its whole shape at a coarser grain instead of only its end.
    """
    if loss is None and eval_loss is None:
        return
    if curve and curve[-1]["step"] == step:
        point = curve[-1]
    else:
        point = {"step": step}
        curve.append(point)
    if loss is not None:
        point["loss"] = loss
    if eval_loss is not None:
        point["eval_loss"] = eval_loss
    if len(curve) > limit:
        # Points carrying an eval loss are rarer and are what quality is judged on: always kept.
        kept = [p for i, p in enumerate(curve[:-1]) if i % 2 == 0 or "eval_loss" in p]
        curve[:] = [*kept, curve[-1]]


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a complete artifact, or ``None``."""
    try:
        value = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def verify_artifact(directory: Path) -> list[str]:
    """Problems found checking every file against the manifest (empty list = intact)."""
    manifest = read_manifest(directory)
    if manifest is None:
        return [f"{directory}: no readable {MANIFEST}"]
    problems = []
    for relative, entry in manifest.get("files", {}).items():
        path = directory / relative
        if not path.is_file():
            problems.append(f"{relative}: missing")
        elif file_sha256(path) != entry["sha256"]:
            problems.append(f"{relative}: sha256 mismatch")
    return problems


def staging_dir(final: Path) -> Path:
    """Where the artifact for ``final`` is assembled: a hidden sibling, hence the same filesystem."""
    return final.parent / f".{final.name}.staging"


def check_output_free(final: Path) -> bool:
    """True if ``final`` already holds a complete artifact; raises if it holds something else.

    Called before training so a taken output fails in seconds, not after hours.
    """
    if read_manifest(final) is not None:
        return True
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise OutputError(f"{final}: exists and is not a kubetune artifact; refusing to overwrite it")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        probe = final.parent / f".{final.name}.probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{final.parent}: not writable: {exc.strerror or exc}") from exc
    return False


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish_local(staging: Path, final: Path) -> None:
    """Make ``staging`` visible as ``final`` with one rename (``final`` may be an empty directory)."""
    _fsync_tree(staging)
    try:
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()  # e.g. created empty by whoever mounted the volume
        os.rename(staging, final)
    except OSError as exc:
        raise OutputError(f"{final}: cannot publish the artifact: {exc.strerror or exc}") from exc


def publish_remote(staging: Path, uri: str) -> None:
    """Upload ``staging`` to an fsspec URI, the manifest last."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(uri)
        for path in sorted(staging.rglob("*")):
            if path.is_file() and path.name != MANIFEST:
                fs.put_file(str(path), f"{root.rstrip('/')}/{path.relative_to(staging).as_posix()}")
        fs.put_file(str(staging / MANIFEST), f"{root.rstrip('/')}/{MANIFEST}")
    except Exception as exc:
        raise OutputError(f"{uri}: upload failed: {type(exc).__name__}: {exc}") from exc
    shutil.rmtree(staging, ignore_errors=True)


def load_trained_model(artifact: str | Path, base_model: str | Path | None = None, **kwargs: Any) -> Any:
    """Load an artifact into a ready-to-run model (eval mode); ``base_model`` defaults to the manifest's.

    ``kwargs`` go to ``from_pretrained`` of the base (e.g. ``dtype``). Supports the formats ``full``,
    ``peft`` and ``bottleneck``. The tokenizer is in the artifact directory itself.
    """
    from transformers import AutoModelForCausalLM

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    if manifest is None:
        raise OutputError(f"{artifact}: not a complete kubetune artifact (no {MANIFEST})")
    fmt = manifest["format"]
    if fmt == "full":
        model = AutoModelForCausalLM.from_pretrained(artifact, **kwargs)
        return model.eval()
    if base_model is None:
        base_model = manifest["base_model"]["path"]
    base = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    if fmt == "peft":
        from peft import PeftModel

        return PeftModel.from_pretrained(base, artifact).eval()
    if fmt == "bottleneck":
        from kubetune.worker.bottleneck import load_bottleneck_adapter

        return load_bottleneck_adapter(base, artifact).eval()
    raise OutputError(f"{artifact}: unknown artifact format {fmt!r}")
