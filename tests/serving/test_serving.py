"""`kubetune serve`: one base, many adapters, OpenAI-compatible HTTP, on real sockets.

Aspects:
- the server process answers /health, /v1/models (base, adapters, routes) and /metrics;
- completions through an adapter equal the same artifact loaded directly, and the base stays the
  base while LoRA adapters share it; chat completions render the chat template;
- a weighted route spreads requests over its backends;
- hot swap: an adapter is loaded and unloaded in the running server, and a removed one answers 404
  in OpenAI's error shape;
- an artifact with a tampered file or without a manifest is refused with a reason.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.torch

PROMPT = "encode : c a t"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train(model: Path, data: Path, output: Path, method: dict[str, Any]) -> Path:
    from kubetune.worker.engine import train
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
    train(plan)
    return output


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    from kubetune.worker.testing import make_tiny_model, task_records, write_records

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serving")
    model = make_tiny_model(root / "tiny")
    data = write_records(root / "train.jsonl", task_records(120, fmt="completion"))
    return {
        "base": model,
        "lora-a": _train(model, data, root / "lora-a", {"type": "lora", "lora": {"rank": 4}}),
        "lora-b": _train(model, data, root / "lora-b", {"type": "lora", "lora": {"rank": 8}}),
        "ia3": _train(model, data, root / "ia3", {"type": "ia3"}),
    }


@pytest.fixture(scope="module")
def server(artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    command = [
        sys.executable, "-m", "kubetune", "serve",
        "--model", str(artifacts["base"]), "--served-model-name", "tiny",
        "--adapter", f"lora-a={artifacts['lora-a']}", "--adapter", f"ia3={artifacts['ia3']}",
        "--route", "canary=lora-a:1,ia3:1",
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning",
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    url = f"http://127.0.0.1:{port}"
    from kubetune.localcluster.testing import wait_for

    try:
        wait_for(
            lambda: proc.poll() is None and httpx.get(f"{url}/health", timeout=1).status_code == 200,
            120,
            interval=0.5,
            ignore=(httpx.HTTPError,),
            description=lambda: f"the server to be ready; log:\n{log.read_text()[-3000:]}",
        )
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def _direct(artifact: Path | None, base: Path, prompt: str, tokens: int) -> str:
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


def _complete(url: str, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def test_models_health_and_metrics(server: str) -> None:
    ids = [m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"]]
    assert ids == ["tiny", "lora-a", "ia3", "canary"]
    _complete(server, "tiny")
    assert (
        'kubetune_serve_requests_total{code="200",model="tiny",served_by="tiny"}'
        in httpx.get(f"{server}/metrics").text
    )


def test_adapters_serve_what_they_learned(server: str, artifacts: dict[str, Path]) -> None:
    base = artifacts["base"]
    for model, artifact in (("lora-a", artifacts["lora-a"]), ("ia3", artifacts["ia3"]), ("tiny", None)):
        response = _complete(server, model)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "text_completion" and body["model"] == model
        assert body["usage"]["completion_tokens"] >= 1
        assert response.headers["x-kubetune-adapter"] == model
        assert body["choices"][0]["text"] == _direct(artifact, base, PROMPT, 8), model
    # Training changed the model: the adapter does not just echo the base.
    assert (
        _complete(server, "lora-a").json()["choices"][0]["text"]
        != _complete(server, "tiny").json()["choices"][0]["text"]
    )


def test_chat_completion(server: str) -> None:
    body = {
        "model": "lora-a",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 6,
        "temperature": 0,
    }
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"


def test_route_spreads_requests(server: str) -> None:
    served = {_complete(server, "canary", max_tokens=1).headers["x-kubetune-adapter"] for _ in range(24)}
    assert served == {"lora-a", "ia3"}


def test_hot_swap_and_errors(server: str, artifacts: dict[str, Path], tmp_path: Path) -> None:
    loaded = httpx.post(
        f"{server}/v1/load_lora_adapter",
        json={"lora_name": "lora-b", "lora_path": str(artifacts["lora-b"])},
        timeout=60,
    )
    assert loaded.status_code == 200, loaded.text
    assert "lora-b" in [m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"]]
    assert _complete(server, "lora-b").json()["choices"][0]["text"] == _direct(
        artifacts["lora-b"], artifacts["base"], PROMPT, 8
    )
    # lora-a still serves its own weights while lora-b shares the base.
    assert _complete(server, "lora-a").json()["choices"][0]["text"] == _direct(
        artifacts["lora-a"], artifacts["base"], PROMPT, 8
    )

    assert httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "lora-b"}).status_code == 200
    gone = _complete(server, "lora-b")
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "model_not_found"

    tampered = tmp_path / "tampered"
    shutil.copytree(artifacts["lora-a"], tampered)
    weights = next(p for p in tampered.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    refused = httpx.post(
        f"{server}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(tampered)}
    )
    assert refused.status_code == 422 and "sha256" in json.dumps(refused.json()), refused.text
    (tampered / "kubetune.json").unlink()
    refused = httpx.post(
        f"{server}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(tampered)}
    )
    assert refused.status_code == 422 and "kubetune.json" in refused.json()["error"]["message"]
