"""`kubetune serve`: one base, many adapters, OpenAI-compatible HTTP, on real sockets.

Aspects:
- the server process answers /health, /v1/models (base, adapters, routes) and /metrics;
- completions through an adapter equal the same artifact loaded directly, and the base stays the
  base while LoRA adapters share it; chat completions render the chat template;
- a weighted route spreads requests over its backends;
- hot swap: an adapter is loaded and unloaded in the running server, and a removed one answers 404
  in OpenAI's error shape;
- an artifact with a tampered file or without a manifest is refused with a reason, recorded as the
  adapter's Failed state (answered again from the record during its backoff), while the good
  adapters keep serving.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving.conftest import PROMPT, ServeFactory
from tests.serving.conftest import direct as _direct

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def server(artifacts: dict[str, Path], serve: ServeFactory) -> str:
    return serve(
        "--model", str(artifacts["base"]), "--served-model-name", "tiny",
        "--adapter", f"lora-a={artifacts['lora-a']}", "--adapter", f"ia3={artifacts['ia3']}",
        "--route", "canary=lora-a:1,ia3:1",
    )  # fmt: skip


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
    assert refused.json()["error"]["code"] == "HashMismatch"
    # Asked again during its backoff, the server answers the recorded failure without retrying.
    again = httpx.post(
        f"{server}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(tampered)}
    )
    assert again.status_code == 422 and again.json()["error"]["code"] == "HashMismatch"
    assert int(again.headers["retry-after"]) >= 1
    (tampered / "kubetune.json").unlink()
    refused = httpx.post(
        f"{server}/v1/load_lora_adapter", json={"lora_name": "bad-2", "lora_path": str(tampered)}
    )
    assert refused.status_code == 422 and "kubetune.json" in refused.json()["error"]["message"]
    assert refused.json()["error"]["code"] == "MissingFiles"
    # Failed adapters are reported, never served, and never take the good ones down.
    states = {s["name"]: s for s in httpx.get(f"{server}/v1/adapters").json()["states"]}
    assert states["bad"]["state"] == "Failed" and states["bad"]["reason"] == "HashMismatch"
    assert states["lora-a"]["state"] == "Loaded"
    assert _complete(server, "bad").status_code == 503
    assert _complete(server, "lora-a").status_code == 200
    assert httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "bad"}).status_code == 200
