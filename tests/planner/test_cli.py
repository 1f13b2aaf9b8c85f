"""``kubetune plan``, offline.

Aspects:
- from a FineTuneJob manifest (config.json read from its file:// model URI) it prints one row per
  registered method, marks the job's method and ends with the recommendation;
- ``-o json`` parses and holds, under ``methods``, one object per method with status.plan's fields
  (valid against the CRD's model);
- a config lacking a field fails with exit code 2 and a message naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetune.api import methods
from kubetune.api.v1alpha1 import TrainingPlanStatus
from kubetune.cli import main

CONFIGS = Path(__file__).parent / "configs"


def _manifest(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    job = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "big"},
        "spec": {
            "model": {"uri": f"file://{CONFIGS}/llama-3-8b.json"},
            "dataset": {"uri": "pvc://data/train.jsonl"},
            "method": {"type": "full"},
            "training": {"batchSize": 1, "maxSeqLength": 1024, "maxSteps": 1000},
            "resources": {"gpusPerNode": 1, "gpuMemory": "24Gi"},
            "output": {"uri": "pvc://data/out"},
        },
    }
    path.write_text(yaml.safe_dump(job))
    return path


def test_the_table_lists_every_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(_manifest(tmp_path)), "--gpu", "H100"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0].lstrip("*") for line in out.splitlines()[3:9]]
    assert rows == list(methods.METHOD_NAMES)
    assert "*full" in out and "* full: full needs about" in out and "24.0Gi is available" in out
    assert "$" in out  # maxSteps gives the tokens, --gpu the speed and price


def test_json_has_the_status_plan_fields_per_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", str(_manifest(tmp_path)), "-o", "json", "--gpu-price", "H100=2"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [m["method"] for m in document["methods"]] == list(methods.METHOD_NAMES)
    for row in document["methods"]:
        plan = TrainingPlanStatus.model_validate({k: v for k, v in row.items() if k != "method"})
        assert plan.total_parameters == 8_030_261_248 and plan.recommendation
    by_name = {m["method"]: m for m in document["methods"]}
    assert by_name["full"]["fits"] is False and by_name["qlora"]["fits"] is True


def test_a_bad_config_names_the_missing_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = json.loads((CONFIGS / "qwen2.5-0.5b.json").read_text())
    del config["hidden_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["plan", "--config", str(path)]) == 2
    assert "'hidden_size'" in capsys.readouterr().err
