"""Remote inputs and outputs, without a network.

Aspects:
- hf:// models: the repo id, revision and the token from the plan's token_env reach huggingface_hub,
  only safetensors/JSON/tokenizer files are fetched, and Hub errors map to ModelNotFound, AccessDenied
  or SourceUnavailable;
- hf://datasets/... files go through hf_hub_download with repo_type dataset;
- fsspec downloads and uploads (exercised on fsspec's in-memory filesystem, which stands in for s3://):
  a missing remote is DatasetNotFound, and an uploaded artifact gets its manifest last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune.worker import artifact, errors, sources
from kubetune.worker.plan import StorageSpec


class RepositoryNotFoundError(Exception):
    """Stands in for huggingface_hub's class of the same name (matched by name)."""


class GatedRepoError(Exception):
    pass


def test_hf_model_download_passes_revision_token_and_safe_patterns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    calls: list[dict[str, Any]] = []

    def fake_snapshot_download(**kwargs: Any) -> str:
        calls.append(kwargs)
        Path(kwargs["local_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(kwargs["local_dir"]) / "config.json").write_text("{}")
        return str(kwargs["local_dir"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("MY_TOKEN", "hf_secret")
    storage = StorageSpec(cache_dir=str(tmp_path))
    path = sources.resolve_model("hf://org/model", "v1.0", "MY_TOKEN", storage)
    assert (path / "config.json").is_file() and path.is_relative_to(tmp_path)
    [call] = calls
    assert call["repo_id"] == "org/model" and call["revision"] == "v1.0" and call["token"] == "hf_secret"
    assert "*.safetensors" in call["allow_patterns"] and not any(".bin" in p for p in call["allow_patterns"])


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (RepositoryNotFoundError("404"), errors.ModelNotFound),
        (GatedRepoError("gated"), errors.AccessDenied),
        (ConnectionError("reset by peer"), errors.SourceUnavailable),
    ],
)
def test_hf_errors_map_to_reasons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised: Exception, expected: type[errors.KubetuneError]
) -> None:
    import huggingface_hub

    def fail(**kwargs: Any) -> str:
        raise raised

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(expected, match="hf://org/model"):
        sources.resolve_model("hf://org/model", None, "HF_TOKEN", StorageSpec(cache_dir=str(tmp_path)))


def test_hf_dataset_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    seen: dict[str, Any] = {}

    def fake_download(**kwargs: Any) -> str:
        seen.update(kwargs)
        target = Path(kwargs["local_dir"]) / kwargs["filename"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text('{"text": "a"}\n')
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    path = sources.resolve_file(
        "hf://datasets/org/set/data/train.jsonl", StorageSpec(cache_dir=str(tmp_path))
    )
    assert path.read_text().startswith('{"text"')
    assert seen["repo_id"] == "org/set" and seen["filename"] == "data/train.jsonl"
    assert seen["repo_type"] == "dataset"
    with pytest.raises(errors.PlanInvalid, match=r"hf://datasets/<org>/<name>/<file>"):
        sources.resolve_file("hf://org/set/train.jsonl", StorageSpec(cache_dir=str(tmp_path)))


def test_fsspec_download_and_missing(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/train.jsonl", b'{"text": "a"}\n')
    target = tmp_path / "train.jsonl"
    sources._fsspec_get(
        "memory://bucket/train.jsonl", target, recursive=False, missing=errors.DatasetNotFound
    )
    assert target.read_bytes() == b'{"text": "a"}\n'
    with pytest.raises(errors.DatasetNotFound, match=r"memory://bucket/nope\.jsonl: not found"):
        sources._fsspec_get(
            "memory://bucket/nope.jsonl", tmp_path / "x", recursive=False, missing=errors.DatasetNotFound
        )


def test_remote_publication_uploads_manifest_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    staging = tmp_path / "staging"
    (staging / "logs").mkdir(parents=True)
    (staging / "adapter_model.safetensors").write_bytes(b"weights")
    (staging / "logs" / "events").write_bytes(b"e")
    artifact.write_manifest(staging, {"method": "lora", "format": "peft"})
    fs = fsspec.filesystem("memory")
    order: list[str] = []
    original = type(fs).put_file

    def recording_put_file(self: Any, lpath: str, rpath: str, **kwargs: Any) -> Any:
        order.append(Path(rpath).name)
        return original(self, lpath, rpath, **kwargs)

    monkeypatch.setattr(type(fs), "put_file", recording_put_file)
    artifact.publish_remote(staging, "memory://adapters/run-1")
    assert order[-1] == "kubetune.json" and sorted(order) == [
        "adapter_model.safetensors",
        "events",
        "kubetune.json",
    ]
    assert fs.cat("/adapters/run-1/logs/events") == b"e"
    assert not staging.exists()
