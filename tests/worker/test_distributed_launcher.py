"""The pod's torchrun launcher (``python -m kubetune.worker.distributed``), without training.

Aspects:
- a plan whose dataset is missing fails before torch is imported, with the worker's own exit code
  (DatasetNotFound, 11) and its termination message, as one pod's ``kubetune train`` would;
- a worker's exit code, or the signal that killed it, is what the launcher exits with.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kubetune.worker.distributed import exit_code_of_failure

LAUNCH = """
import sys
from kubetune.worker.distributed import launch
code = launch(sys.argv[1:])
print(code, "torch" in sys.modules)
"""


def test_a_missing_dataset_fails_before_torch_with_its_exit_code(tmp_path: Path) -> None:
    plan = {"model": {"uri": str(tmp_path / "model")}, "dataset": {"uri": str(tmp_path / "missing.jsonl")},
            "output": {"uri": str(tmp_path / "out")}}  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    termination = tmp_path / "termination"
    torchrun = ["--nnodes=2", "--nproc-per-node=1", "--node-rank=1", "--rdzv-backend=static",
                "--master-addr=nowhere.invalid", "--master-port=29500", "--max-restarts=0"]  # fmt: skip
    train = ["-m", "kubetune", "train", "--plan", str(tmp_path / "plan.json"),
             "--termination-message-path", str(termination)]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", LAUNCH, *torchrun, *train], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.split() == ["11", "False"], result.stderr[-2000:]
    assert termination.read_text().startswith("DatasetNotFound: ")


def test_exit_codes_of_failed_workers() -> None:
    assert exit_code_of_failure(12) == 12
    assert exit_code_of_failure(-15) == 143  # SIGTERM
    assert exit_code_of_failure(-9) == 137  # SIGKILL
    assert exit_code_of_failure(0) == 1  # a failure reported without a code is still a failure
