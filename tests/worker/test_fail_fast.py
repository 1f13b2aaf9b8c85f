"""``kubetune train`` fails fast: local sources are checked before torch is imported.

Aspects (each run as ``python -m kubetune train`` with torch, transformers and peft blocked from
importing, so passing proves the check ran before them):
- a dataset with a broken line exits with DatasetInvalid (12), naming the file and line in the
  termination message;
- a missing dataset file exits with DatasetNotFound (11), a missing model directory with
  ModelNotFound (13);
- a bad separate eval file is caught too;
- a good dataset and model get past the checks and only then reach the training engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BLOCKED = """
import runpy, sys
HEAVY = ('torch', 'transformers', 'peft', 'bitsandbytes', 'accelerate', 'safetensors')
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in HEAVY:
            raise ModuleNotFoundError('blocked ' + name)
sys.meta_path.insert(0, Block())
sys.argv = ['kubetune', 'train', '--plan', sys.argv[1], '--termination-message-path', sys.argv[2]]
runpy.run_module('kubetune', run_name='__main__')
"""


def _train_without_torch(tmp_path: Path, **dataset: str) -> tuple[int, str]:
    model = tmp_path / "model"
    plan = {
        "model": {"uri": f"file://{model}"},
        "dataset": {"format": "auto", **dataset},
        "output": {"uri": f"file://{tmp_path / 'out'}"},
    }
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    termination = tmp_path / "termination-log"
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED, str(plan_file), str(termination)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, termination.read_text() if termination.exists() else result.stderr


def _files(tmp_path: Path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(4)))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"\n')
    return good


def test_bad_dataset_fails_before_torch(tmp_path: Path) -> None:
    _files(tmp_path)
    code, message = _train_without_torch(tmp_path, uri=f"file://{tmp_path / 'bad.jsonl'}")
    assert code == 12 and message.startswith("DatasetInvalid: ") and "line 2" in message, message


def test_missing_sources_fail_before_torch(tmp_path: Path) -> None:
    good = _files(tmp_path)
    code, message = _train_without_torch(tmp_path, uri=f"file://{tmp_path / 'absent.jsonl'}")
    assert code == 11 and message.startswith("DatasetNotFound: "), message
    (tmp_path / "model" / "config.json").unlink()
    code, message = _train_without_torch(tmp_path, uri=f"file://{good}")
    assert code == 13 and message.startswith("ModelNotFound: "), message


def test_bad_eval_file_fails_before_torch(tmp_path: Path) -> None:
    good = _files(tmp_path)
    code, message = _train_without_torch(
        tmp_path, uri=f"file://{good}", eval_uri=f"file://{tmp_path / 'bad.jsonl'}"
    )
    assert code == 12 and "bad.jsonl" in message, message


def test_good_sources_reach_the_engine(tmp_path: Path) -> None:
    good = _files(tmp_path)
    code, message = _train_without_torch(tmp_path, uri=f"file://{good}")
    # Past every check, the engine's import of torch is the first thing to fail.
    assert code != 0 and "blocked torch" in message, message
