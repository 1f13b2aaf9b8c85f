"""Checkpoints, resume after the process is killed, preemption, and idempotent reruns.

Aspects:
- a `kubetune train` process killed with SIGKILL mid-run resumes from its newest complete checkpoint,
  losing at most checkpoint_every_steps steps, and ends with the same weights as an uninterrupted run;
- at most keep_checkpoints checkpoints exist, and they are removed once the artifact is published;
- the progress file follows the run and records the step it resumed from;
- SIGTERM (preemption) writes a checkpoint at the current step and exits 143 with a Preempted message;
- success writes a JSON summary (uri, sha256 of kubetune.json, size, format, metrics) as the
  termination message;
- a rerun after success finds the published artifact and does nothing;
- a checkpoint from a different plan is ignored rather than loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune.worker.plan import ProgressReport
from tests.worker.conftest import plan_dict, write_plan

pytestmark = pytest.mark.torch

STEPS = 150
EVERY = 10


def _start(plan_file: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same arithmetic as the in-process reference run
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "kubetune", "train", "--plan", str(plan_file)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


def _wait_for(predicate: Any, process: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            pytest.fail(
                f"process ended ({process.returncode}) before the condition held:\n{log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def _plan(tiny_model: Path, dataset: Path, output: Path, **training: Any) -> dict[str, Any]:
    return plan_dict(
        tiny_model,
        dataset,
        output,
        training={"max_steps": STEPS, "checkpoint_every_steps": EVERY, "keep_checkpoints": 2, **training},
    )


def _adapter(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


@pytest.mark.slow
def test_resume_after_kill_matches_an_uninterrupted_run(
    tmp_path: Path, tiny_model: Path, task_files: dict[str, Path]
) -> None:
    from kubetune.worker.engine import train
    from kubetune.worker.plan import TrainingPlan

    output = tmp_path / "out" / "killed"
    plan = _plan(tiny_model, task_files["completion"], output)
    plan_file = write_plan(tmp_path / "plan.json", plan)
    checkpoints = output.parent / ".killed.kubetune" / "checkpoints"
    log = tmp_path / "train.log"

    first = _start(plan_file, log)
    _wait_for(lambda: any(p.name == "step-00000010" for p in checkpoints.glob("step-*")), first, 120, log)
    first.send_signal(signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL
    assert not output.exists()
    complete = [p for p in checkpoints.iterdir() if not p.name.endswith(".tmp")]
    assert 1 <= len(complete) <= 2
    newest = max(int(p.name.removeprefix("step-")) for p in complete)
    assert newest < STEPS

    second = _start(plan_file, log)
    assert second.wait(180) == 0, log.read_text()[-3000:]
    manifest = json.loads((output / "kubetune.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] == newest
    # Success leaves the operator a one-line summary naming the artifact by its manifest's sha256.
    summary = json.loads(Path(plan["progress"]["termination_message_path"]).read_text())
    assert summary["sha256"] == hashlib.sha256((output / "kubetune.json").read_bytes()).hexdigest()
    assert summary["uri"] == str(output) and summary["format"] == "peft"
    assert summary["sizeBytes"] == manifest["size_bytes"] and summary["progress"]["step"] == STEPS
    assert manifest["metrics"]["steps"] == STEPS
    assert not checkpoints.exists()
    progress = ProgressReport.model_validate_json(
        (output.parent / ".killed.kubetune" / "progress.json").read_text()
    )
    assert progress.phase == "succeeded" and progress.step == STEPS and progress.resumed_from_step == newest

    reference_plan = _plan(tiny_model, task_files["completion"], tmp_path / "out" / "reference")
    train(TrainingPlan.model_validate(reference_plan))
    resumed, reference = _adapter(output), _adapter(tmp_path / "out" / "reference")
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert (resumed[name] - tensor).abs().max().item() < 1e-4, name

    # A rerun (e.g. the pod restarted after finishing) publishes nothing new.
    assert train(TrainingPlan.model_validate(plan)) == manifest
    assert json.loads((output / "kubetune.json").read_text())["created_at"] == manifest["created_at"]


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_143(
    tmp_path: Path, tiny_model: Path, task_files: dict[str, Path]
) -> None:
    output = tmp_path / "out" / "preempted"
    termination = tmp_path / "termination-log"
    plan = _plan(
        tiny_model, task_files["completion"], output, max_steps=100_000, checkpoint_every_steps=100_000
    )
    plan["progress"]["termination_message_path"] = str(termination)
    progress_file = output.parent / ".preempted.kubetune" / "progress.json"
    log = tmp_path / "train.log"
    process = _start(write_plan(tmp_path / "plan.json", plan), log)

    def training_started() -> bool:
        try:
            report = ProgressReport.model_validate_json(progress_file.read_text())
        except (OSError, ValueError):
            return False
        return report.phase == "training" and report.step >= 1

    _wait_for(training_started, process, 120, log)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 143, log.read_text()[-3000:]
    message = termination.read_text()
    assert message.startswith("Preempted: stopped by SIGTERM at step ") and message.endswith(
        "rerun to resume\n"
    )
    step = int(message.split("at step ")[1].split(";")[0])
    assert (
        output.parent / ".preempted.kubetune" / "checkpoints" / f"step-{step:08d}" / "state.json"
    ).is_file()


def test_checkpoint_of_another_plan_is_ignored(
    tmp_path: Path, tiny_model: Path, task_files: dict[str, Path]
) -> None:
    from kubetune.worker.engine import train
    from kubetune.worker.plan import TrainingPlan

    output = tmp_path / "out" / "a"
    checkpoints = output.parent / ".a.kubetune" / "checkpoints"
    stale = checkpoints / "step-00000005"
    stale.mkdir(parents=True)
    (stale / "state.json").write_text(json.dumps({"step": 5, "fingerprint": "another plan"}))
    manifest = train(
        TrainingPlan.model_validate(_plan(tiny_model, task_files["completion"], output, max_steps=8))
    )
    assert manifest["metrics"]["resumed_from_step"] is None
