"""Bad inputs fail fast with a distinct exit code and a one-line termination message.

Aspects:
- a table of bad plans, datasets, models, targets and outputs, each mapped to its exit code and the
  exact reason-prefixed message written to the termination message path;
- dataset problems are reported before the model is even looked at (cheapest check first);
- out-of-memory and a missing optional dependency map to their own codes;
- the real `kubetune train` process exits with the code and writes the message (not only in-process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune.cli import main
from kubetune.worker.testing import task_records
from tests.worker.conftest import plan_dict, write_plan

pytestmark = pytest.mark.torch

Case = Callable[[Path, Path, Path], tuple[Any, int, str]]


def _plan(model: Path, dataset: Path, tmp: Path, **override: Any) -> dict[str, Any]:
    return plan_dict(model, dataset, tmp / "out" / "artifact", **override)


def _jsonl(tmp: Path, lines: list[str], name: str = "train.jsonl") -> Path:
    path = tmp / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _good_lines(count: int) -> list[str]:
    return [json.dumps(r) for r in task_records(count, fmt="completion")]


def missing_completion(tmp: Path, model: Path, good: Path) -> tuple[Any, int, str]:
    lines = _good_lines(20)
    lines[16] = json.dumps({"prompt": "encode : a :"})
    return (
        _plan(model, _jsonl(tmp, lines), tmp),
        12,
        'DatasetInvalid: train.jsonl line 17: missing "completion"',
    )


def invalid_json_line(tmp: Path, model: Path, good: Path) -> tuple[Any, int, str]:
    lines = _good_lines(5)
    lines[2] = '{"prompt": "a", "completion": '
    return (
        _plan(model, _jsonl(tmp, lines), tmp),
        12,
        "DatasetInvalid: train.jsonl line 3: invalid JSON: Expecting value",
    )


def empty_dataset(tmp: Path, model: Path, good: Path) -> tuple[Any, int, str]:
    return (_plan(model, _jsonl(tmp, ["", "  "]), tmp), 12, "DatasetInvalid: train.jsonl: no records")


def wrong_encoding(tmp: Path, model: Path, good: Path) -> tuple[Any, int, str]:
    path = tmp / "train.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    return (
        _plan(model, path, tmp),
        12,
        "DatasetInvalid: train.jsonl line 2: not valid UTF-8 (byte 0xe9 at byte 14)",
    )


def wrong_type(tmp: Path, model: Path, good: Path) -> tuple[Any, int, str]:
    path = _jsonl(tmp, [json.dumps({"text": "a"}), json.dumps({"text": 5})])
    return (
        _plan(model, path, tmp),
        12,
        'DatasetInvalid: train.jsonl line 2: "text" must be a string, got int',
    )


def undetectable_format(tmp: Path, model: Path, good: Path) -> tuple[Any, int, str]:
    path = _jsonl(tmp, [json.dumps({"question": "a", "answer": "b"})])
    message = (
        "DatasetInvalid: train.jsonl line 1: cannot detect the format: expected "
        '"text", "prompt"/"completion" or "messages" (found: answer, question)'
    )
    return (_plan(model, path, tmp), 12, message)


def bad_chat_role(tmp: Path, model: Path, good: Path) -> tuple[Any, int, str]:
    record = {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "a"}]}
    message = (
        "DatasetInvalid: train.jsonl line 1: message 0 has role 'human' "
        "(expected one of system, user, assistant, tool)"
    )
    return (_plan(model, _jsonl(tmp, [json.dumps(record)]), tmp), 12, message)


def unsupported_suffix(tmp: Path, model: Path, good: Path) -> tuple[Any, int, str]:
    path = tmp / "train.txt"
    path.write_text("hello\n")
    message = "DatasetInvalid: train.txt: unsupported file type '.txt' (use .jsonl, .json, .parquet or .csv)"
    return (_plan(model, path, tmp), 12, message)


def dataset_not_found(tmp: Path, model: Path, good: Path) -> tuple[Any, int, str]:
    return (_plan(model, tmp / "nope.jsonl", tmp), 11, f"DatasetNotFound: {tmp / 'nope.jsonl'}: no such file")


def model_not_found(tmp: Path, model: Path, good: Path) -> tuple[Any, int, str]:
    return (
        _plan(tmp / "no-model", good, tmp),
        13,
        f"ModelNotFound: {tmp / 'no-model'}: no such model directory",
    )


def model_config_broken(tmp: Path, model: Path, good: Path) -> tuple[Any, int, str]:
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    return (_plan(broken, good, tmp), 14, f"ModelInvalid: {broken}: cannot load the tokenizer")


def unknown_target(tmp: Path, model: Path, good: Path) -> tuple[Any, int, str]:
    plan = _plan(model, good, tmp, method={"type": "lora", "lora": {"target_modules": ["q_proj", "qkv"]}})
    message = (
        'TargetModuleNotFound: lora.target_modules: "qkv" matches no module of LlamaForCausalLM '
        "(its linear layers: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
    )
    return (plan, 15, message)


def output_taken(tmp: Path, model: Path, good: Path) -> tuple[Any, int, str]:
    taken = tmp / "out" / "artifact"
    taken.mkdir(parents=True)
    (taken / "somebody-elses.txt").write_text("x")
    return (_plan(model, good, tmp), 17, f"OutputError: {taken}: exists and is not a kubetune artifact")


def output_holds_another_plans_artifact(tmp: Path, model: Path, good: Path) -> tuple[Any, int, str]:
    taken = tmp / "out" / "artifact"
    taken.mkdir(parents=True)
    (taken / "kubetune.json").write_text(json.dumps({"method": "lora", "plan_fingerprint": "another plan"}))
    message = f"OutputError: {taken}: holds the artifact of a different training plan; choose another output"
    return (_plan(model, good, tmp), 17, message)


def fp16_on_cpu(tmp: Path, model: Path, good: Path) -> tuple[Any, int, str]:
    return (
        _plan(model, good, tmp, training={"precision": "fp16"}),
        10,
        "PlanInvalid: training.precision fp16 needs a GPU",
    )


def path_escape(tmp: Path, model: Path, good: Path) -> tuple[Any, int, str]:
    plan = _plan(model, good, tmp)
    plan["dataset"]["uri"] = "pvc://data/../../etc/passwd"
    return (plan, 10, "PlanInvalid: pvc://data/../../etc/passwd: '..' segments are not allowed in URIs")


def plan_typo(tmp: Path, model: Path, good: Path) -> tuple[Any, int, str]:
    plan = _plan(model, good, tmp)
    plan["training"]["learning_rat"] = 1.0
    return (plan, 10, "PlanInvalid: invalid plan: 1 validation error for TrainingPlan; training.learning_rat")


CASES: list[Case] = [
    missing_completion,
    invalid_json_line,
    empty_dataset,
    wrong_encoding,
    wrong_type,
    undetectable_format,
    bad_chat_role,
    unsupported_suffix,
    dataset_not_found,
    model_not_found,
    model_config_broken,
    unknown_target,
    output_taken,
    output_holds_another_plans_artifact,
    fp16_on_cpu,
    path_escape,
    plan_typo,
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
def test_bad_input_fails_fast_with_code_and_message(
    tmp_path: Path, tiny_model: Path, task_files: dict[str, Path], case: Case
) -> None:
    plan, code, message = case(tmp_path, tiny_model, task_files["completion"])
    plan_file = write_plan(tmp_path / "plan.json", plan)
    termination = tmp_path / "termination-log"
    started = time.monotonic()
    assert main(["train", "--plan", str(plan_file), "--termination-message-path", str(termination)]) == code
    assert time.monotonic() - started < 20
    written = termination.read_text()
    assert written.count("\n") == 1 and written.startswith(message), written
    if case is not output_holds_another_plans_artifact:
        assert not (tmp_path / "out" / "artifact" / "kubetune.json").exists()


def test_dataset_is_checked_before_the_model(tmp_path: Path) -> None:
    lines = [*_good_lines(3), "[1, 2]"]
    plan = _plan(tmp_path / "no-such-model", _jsonl(tmp_path, lines), tmp_path)
    termination = tmp_path / "t"
    code = main(
        [
            "train",
            "--plan",
            str(write_plan(tmp_path / "p.json", plan)),
            "--termination-message-path",
            str(termination),
        ]
    )
    assert code == 12
    assert (
        termination.read_text().strip()
        == "DatasetInvalid: train.jsonl line 4: expected a JSON object, got list"
    )


def test_out_of_memory_maps_to_its_code(
    tmp_path: Path, tiny_model: Path, task_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from kubetune.worker import engine

    def explode(*args: Any, **kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(engine, "evaluate", explode)
    termination = tmp_path / "t"
    plan_file = write_plan(tmp_path / "p.json", _plan(tiny_model, task_files["completion"], tmp_path))
    assert main(["train", "--plan", str(plan_file), "--termination-message-path", str(termination)]) == 16
    assert termination.read_text().startswith("OutOfMemory: out of accelerator memory (CUDA out of memory.")


def test_missing_bitsandbytes_maps_to_dependency_missing(
    tmp_path: Path, tiny_model: Path, task_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    termination = tmp_path / "t"
    plan = _plan(tiny_model, task_files["completion"], tmp_path, method={"type": "qlora"})
    plan_file = write_plan(tmp_path / "p.json", plan)
    assert main(["train", "--plan", str(plan_file), "--termination-message-path", str(termination)]) == 18
    assert termination.read_text().startswith(
        "DependencyMissing: method qlora needs the bitsandbytes package"
    )


def test_real_process_exit_code_and_message(tmp_path: Path) -> None:
    lines = _good_lines(20)
    lines[16] = json.dumps({"prompt": "encode : a :"})
    plan = _plan(tmp_path / "no-model", _jsonl(tmp_path, lines), tmp_path)
    termination = tmp_path / "termination-log"
    plan["progress"]["termination_message_path"] = str(termination)
    env = {**os.environ, "KUBETUNE_PLAN": json.dumps(plan)}
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", "train"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 12, result.stderr
    assert termination.read_text() == 'DatasetInvalid: train.jsonl line 17: missing "completion"\n'
