"""Shared by the serving tests: tiny trained artifacts (once per session) and a `kubetune serve` process."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

PROMPT = "encode : c a t"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train(model: Path, data: Path, output: Path, method: dict[str, Any]) -> Path:
    from kubetune.worker.engine import train as run_training
    from kubetune.worker.plan import TrainingPlan

    plan = TrainingPlan.model_validate(
        {
            "name": output.name,
            "model": {"uri": str(model)},
            "dataset": {"uri": str(data), "eval_fraction": 0.1},
            "method": method,
            "training": {
                "max_steps": 12,
                "learning_rate": 2e-2,
                "warmup_ratio": 0.0,
                "batch_size": 8,
                "max_seq_length": 64,
                "gradient_checkpointing": False,
                "checkpoint_every_steps": 0,
            },
            "output": {"uri": str(output)},
            "progress": {"port": 0, "termination_message_path": str(output.parent / f"{output.name}.msg")},
        }
    )
    run_training(plan)
    return output


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny base and three adapters trained on it (LoRA r4, LoRA r8, IA3), all under one root."""
    import torch

    from kubetune.worker.testing import make_tiny_model, task_records, write_records

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serving")
    model = make_tiny_model(root / "tiny")
    data = write_records(root / "train.jsonl", task_records(120, fmt="completion"))
    return {
        "root": root,
        "base": model,
        "lora-a": train(model, data, root / "lora-a", {"type": "lora", "lora": {"rank": 4}}),
        "lora-b": train(model, data, root / "lora-b", {"type": "lora", "lora": {"rank": 8}}),
        "ia3": train(model, data, root / "ia3", {"type": "ia3"}),
    }


ServeFactory = Callable[..., str]


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeFactory]:
    """Start `kubetune serve ARGS...` on a free port; returns its URL once ``/ready`` answers 200.
    Every process is stopped at the end of the module, and its log must hold no traceback."""
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> str:
        from kubetune.localcluster.testing import wait_for

        port = free_port()
        log = tmp_path_factory.mktemp("serve-log") / "serve.log"
        command = [sys.executable, "-m", "kubetune", "serve", *args]
        command += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning"]
        with log.open("w") as out:
            proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})},
            )
        started.append((proc, log))
        url = f"http://127.0.0.1:{port}"
        wait_for(
            lambda: proc.poll() is None and httpx.get(f"{url}/ready", timeout=1).status_code == 200,
            # A bound against hangs, not a speed claim: on a loaded two-core machine the import of
            # torch alone has taken over a minute.
            300,
            interval=0.5,
            ignore=(httpx.HTTPError,),
            description=lambda: f"the server to be ready; log:\n{log.read_text()[-3000:]}",
        )
        return url

    yield start
    for proc, log in started:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        proc.kill()
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def direct(artifact: Path | None, base: Path, prompt: str, tokens: int) -> str:
    """Greedy text from the artifact (or the base) loaded in this process, the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.worker.artifact import load_trained_model

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = (
        load_trained_model(artifact, base) if artifact else AutoModelForCausalLM.from_pretrained(base).eval()
    )
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **encoded, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return str(tokenizer.decode(out[0][encoded["input_ids"].shape[1] :], skip_special_tokens=True))
