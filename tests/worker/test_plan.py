"""The TrainingPlan contract and the torch-free half of the worker.

Aspects:
- a minimal plan gets the documented defaults; unknown keys and out-of-range values are refused;
- plans load from JSON text, a file, or the KUBETUNE_PLAN variable (JSON or path) and round-trip;
- an unknown plan_version is refused rather than guessed;
- plan, errors, progress and train_cli import with torch blocked (the operator imports them);
- exit codes are distinct, below 128, and the termination message is one line;
- URIs: schemes, `..` refused, pvc:// resolved under its mount and kept inside it;
- the progress reporter serves /progress, /metrics and /healthz and rewrites its file atomically.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from kubetune.worker import errors
from kubetune.worker.plan import StorageSpec, TrainingPlan, load_plan
from kubetune.worker.progress import ProgressReporter, prometheus_text, read_progress_file
from kubetune.worker.sources import local_path, split_uri

MINIMAL = {
    "model": {"uri": "/models/tiny"},
    "dataset": {"uri": "/data/train.jsonl"},
    "output": {"uri": "/out/a"},
}


def test_minimal_plan_gets_defaults() -> None:
    plan = TrainingPlan.model_validate(MINIMAL)
    assert plan.plan_version == 1
    assert plan.method.type == "lora"
    assert plan.method.quantization.type == "nf4" and plan.method.quantization.double_quant
    assert plan.training.checkpoint_every_steps == 200
    assert plan.progress.port == 9400
    assert plan.progress.termination_message_path == "/dev/termination-log"
    assert plan.model.trust_remote_code is False


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"training": {"learning_rate": 0}}, "learning_rate"),
        ({"training": {"batch_size": 0}}, "batch_size"),
        ({"dataset": {"uri": "/d.jsonl", "eval_fraction": 0.9}}, "eval_fraction"),
        ({"method": {"type": "lorra"}}, "type"),
        ({"method": {"type": "lora", "lora": {"rank": 0}}}, "rank"),
        ({"trainig": {}}, "trainig"),
        ({"name": "Bad_Name"}, "name"),
        ({"progress": {"port": 70000}}, "port"),
    ],
)
def test_invalid_plans_are_refused(override: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        TrainingPlan.model_validate({**MINIMAL, **override})


def test_plan_round_trips_through_json_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = TrainingPlan.model_validate({**MINIMAL, "method": {"type": "qlora", "lora": {"rank": 4}}})
    text = plan.model_dump_json()
    path = tmp_path / "plan.json"
    path.write_text(text)
    assert load_plan(text) == plan
    assert load_plan(path) == plan
    monkeypatch.setenv("KUBETUNE_PLAN", text)
    from kubetune.worker.train_cli import _read_plan

    class Args:
        plan = None

    assert _read_plan(Args()) == plan  # type: ignore[arg-type]
    monkeypatch.setenv("KUBETUNE_PLAN", str(path))
    assert _read_plan(Args()) == plan  # type: ignore[arg-type]


def test_unknown_plan_version_is_refused() -> None:
    with pytest.raises(ValueError, match="plan_version"):
        load_plan(json.dumps({**MINIMAL, "plan_version": 2}))


def test_contract_modules_import_without_torch() -> None:
    script = """
import sys
HEAVY = ('torch', 'transformers', 'peft', 'bitsandbytes', 'accelerate', 'safetensors')
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in HEAVY:
            raise ModuleNotFoundError('blocked ' + name)
sys.meta_path.insert(0, Block())
import kubetune.worker.plan, kubetune.worker.errors, kubetune.worker.progress, kubetune.worker.train_cli
import kubetune.worker.data, kubetune.worker.sources, kubetune.worker.artifact, kubetune.worker.methods
print('ok')
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_exit_codes_are_distinct_and_below_signal_range() -> None:
    codes = [t.exit_code for t in errors.ERROR_TYPES]
    assert len(codes) == len(set(codes))
    assert all(0 < code < 128 for code in codes if code != errors.Preempted.exit_code)
    assert errors.REASON_BY_EXIT_CODE[143] == "Preempted" and errors.RETRYABLE["Preempted"]
    assert errors.REASON_BY_EXIT_CODE[12] == "DatasetInvalid"
    assert errors.RETRYABLE["SourceUnavailable"] and not errors.RETRYABLE["DatasetInvalid"]
    message = errors.DatasetInvalid('train.jsonl line 3:\n  missing\t"x"').termination_message()
    assert message == 'DatasetInvalid: train.jsonl line 3: missing "x"'


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/abs/model", ("file", "/abs/model")),
        ("file:///abs/model", ("file", "/abs/model")),
        ("pvc://claim/sub/dir", ("pvc", "claim/sub/dir")),
        ("hf://Qwen/Qwen2.5-0.5B", ("hf", "Qwen/Qwen2.5-0.5B")),
        ("s3://bucket/key/x", ("s3", "bucket/key/x")),
    ],
)
def test_uri_schemes(uri: str, expected: tuple[str, str]) -> None:
    assert split_uri(uri) == expected


@pytest.mark.parametrize(
    "uri", ["pvc://claim/../etc", "/data/../etc/passwd", "ftp://x/y", "file://host/x", "relative/x"]
)
def test_bad_uris_are_plan_errors(uri: str) -> None:
    with pytest.raises(errors.PlanInvalid):
        split_uri(uri)


def test_pvc_resolves_under_its_mount_and_not_outside(tmp_path: Path) -> None:
    storage = StorageSpec(pvc_mount_root=str(tmp_path))
    (tmp_path / "claim" / "models").mkdir(parents=True)
    assert local_path("pvc://claim/models", storage) == tmp_path / "claim" / "models"
    (tmp_path / "claim" / "escape").symlink_to("/etc")
    with pytest.raises(errors.PlanInvalid, match="outside"):
        local_path("pvc://claim/escape/passwd", storage)


def test_progress_server_and_file(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    file = tmp_path / "progress.json"
    reporter = ProgressReporter(file=file, port=port, host="127.0.0.1")
    try:
        reporter.update(phase="training", step=3, total_steps=10, loss=2.5, tokens_per_second=100.0)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=5).read()
        assert json.loads(body)["step"] == 3
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "kubetune_train_step 3.0" in metrics and 'kubetune_train_phase{phase="training"} 1' in metrics
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read() == b"ok"
        report = read_progress_file(file)
        assert report is not None and report.total_steps == 10 and report.updated_at
        assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed away
    finally:
        reporter.close()
    assert "kubetune_train_loss 2.5" in prometheus_text(reporter.report)


def test_inactive_reporter_writes_nothing(tmp_path: Path) -> None:
    reporter = ProgressReporter(file=tmp_path / "p.json", port=0, active=False)
    reporter.update(step=5)
    assert not (tmp_path / "p.json").exists()
