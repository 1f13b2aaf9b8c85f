"""`kubetune serve --plan` as a serving pod runs it, driven by the official `openai` client.

Aspects:
- isolation: with two good adapters and five bad ones (tampered file, other base model, missing
  directory, failed download, wrong recorded sha256) the server turns ready, serves the good ones
  and reports each bad one as Failed with its CamelCase reason; a route skips its failed backend;
- OpenAI compatibility through the `openai` client: completions and chat, n, seed, stop,
  max_tokens, streaming (chunks, [DONE], usage in the last chunk), errors as the client's typed
  exceptions; concurrent clients all get answers;
- auth: the admin endpoints answer 401 in OpenAI's shape without the admin token, the inference
  endpoints without an API key; the right tokens work.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving.conftest import PROMPT, ServeFactory, direct

pytestmark = pytest.mark.torch

ADMIN_TOKEN = "admin-secret-token"
API_KEY = "client-key-1"


def _tamper(directory: Path) -> None:
    weights = next(p for p in directory.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)


def _other_base(directory: Path) -> None:
    manifest = json.loads((directory / "kubetune.json").read_text())
    manifest["base_model"]["config_sha256"] = "f" * 64
    (directory / "kubetune.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def pod(artifacts: dict[str, Path], serve: ServeFactory, tmp_path_factory: pytest.TempPathFactory) -> str:
    from kubetune.worker.serving import _manifest_sha256
    from kubetune.worker.serving_plan import ServingPlan

    root = tmp_path_factory.mktemp("pod")
    claim = root / "mnt" / "adapters"
    for name, source, spoil in (
        ("lora-a", "lora-a", None),
        ("lora-b", "lora-b", None),
        ("tampered", "lora-a", _tamper),
        ("other-base", "lora-b", _other_base),
    ):
        shutil.copytree(artifacts[source], claim / name)
        if spoil:
            spoil(claim / name)
    adapters: list[dict[str, Any]] = [
        {"name": "lora-a", "uri": "pvc://adapters/lora-a", "sha256": _manifest_sha256(claim / "lora-a")},
        {"name": "lora-b", "uri": "pvc://adapters/lora-b"},
        {"name": "tampered", "uri": "pvc://adapters/tampered"},
        {"name": "other-base", "uri": "pvc://adapters/other-base"},
        {"name": "missing", "uri": "pvc://adapters/not-there"},
        {"name": "download", "uri": "hf://kubetune-tests/no-such-adapter"},
        {"name": "recorded", "uri": "pvc://adapters/lora-b", "sha256": "0" * 64},
    ]
    plan = ServingPlan.model_validate(
        {
            "model_uri": f"file://{artifacts['base']}",
            "served_model_name": "tiny",
            "adapters": adapters,
            "routes": [
                {
                    "name": "support",
                    "backends": [{"adapter": "lora-a", "weight": 1}, {"adapter": "tampered", "weight": 1}],
                }
            ],
            "pvc_mount_root": str(root / "mnt"),
            "cache_dir": str(root / "cache"),
        }
    )
    (root / "plan.json").write_text(plan.model_dump_json())
    (root / "admin-token").write_text(ADMIN_TOKEN + "\n")
    (root / "api-keys").write_text(f"{API_KEY}\nclient-key-2\n")
    return serve(
        "--plan",
        str(root / "plan.json"),
        "--api-key-file",
        str(root / "api-keys"),
        env={"KUBETUNE_ADMIN_TOKEN_FILE": str(root / "admin-token")},
    )


@pytest.fixture(scope="module")
def client(pod: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{pod}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_bad_adapters_fail_alone(pod: str, client: Any) -> None:
    states = {s["name"]: s for s in httpx.get(f"{pod}/v1/adapters").json()["states"]}
    assert {n: s["state"] for n, s in states.items() if s["state"] == "Loaded"} == {
        "lora-a": "Loaded",
        "lora-b": "Loaded",
    }
    assert {n: s["reason"] for n, s in states.items() if s["state"] == "Failed"} == {
        "tampered": "HashMismatch",
        "other-base": "BaseModelMismatch",
        "missing": "MissingFiles",
        "download": "DownloadFailed",
        "recorded": "HashMismatch",
    }
    assert all(s["message"] and s["attempts"] >= 1 for s in states.values() if s["state"] == "Failed")
    assert httpx.get(f"{pod}/ready").json() == {
        "ready": True,
        "waiting": [],
        "failed": ["tampered", "other-base", "missing", "download", "recorded"],
    }
    served = [m.id for m in client.models.list().data]
    assert served == ["tiny", "lora-a", "lora-b", "support"]
    # The route's failed backend takes no traffic; the failed adapter itself answers 503.
    for _ in range(6):
        raw = client.completions.with_raw_response.create(model="support", prompt=PROMPT, max_tokens=1)
        assert raw.headers["x-kubetune-adapter"] == "lora-a"
    import openai

    with pytest.raises(openai.InternalServerError) as unavailable:
        client.completions.create(model="tampered", prompt=PROMPT, max_tokens=1)
    assert unavailable.value.status_code == 503 and "HashMismatch" in unavailable.value.message


def test_openai_client(pod: str, client: Any, artifacts: dict[str, Path]) -> None:
    expected = direct(artifacts["lora-a"], artifacts["base"], PROMPT, 8)
    completion = client.completions.create(model="lora-a", prompt=PROMPT, max_tokens=8, temperature=0)
    assert completion.choices[0].text == expected
    assert completion.usage.completion_tokens >= 1

    chat = client.chat.completions.create(
        model="lora-b", messages=[{"role": "user", "content": PROMPT}], max_tokens=6, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")

    sampled = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, n=3, seed=11)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    again = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, n=3, seed=11)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]

    base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    words = base.choices[0].text.split()
    if len(words) >= 2:
        stopped = client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stop=[f" {words[1]}"]
        )
        assert stopped.choices[0].finish_reason == "stop"
        assert base.choices[0].text.startswith(stopped.choices[0].text)
        assert f" {words[1]}" not in stopped.choices[0].text

    # Eight clients at once: every one is answered, with its own adapter's text.
    models = ["lora-a", "lora-b", "tiny", "lora-a"] * 2
    with ThreadPoolExecutor(8) as pool:
        texts = list(
            pool.map(
                lambda m: (
                    client.completions.create(model=m, prompt=PROMPT, max_tokens=8, temperature=0)
                    .choices[0]
                    .text
                ),
                models,
            )
        )
    assert texts[0] == texts[3] == texts[4] == texts[7] == expected


def test_streaming(client: Any) -> None:
    whole = client.completions.create(model="lora-a", prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(
        client.completions.create(
            model="lora-a",
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason

    messages = [{"role": "user", "content": PROMPT}]
    reply = client.chat.completions.create(model="lora-b", messages=messages, max_tokens=6, temperature=0)
    stream = client.chat.completions.create(
        model="lora-b",
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == reply.choices[0].message.content
    )
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_errors_in_openai_shape(pod: str, client: Any) -> None:
    import openai

    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="nobody", prompt=PROMPT, max_tokens=1)
    assert unknown.value.body["type"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as invalid:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, temperature=5)
    assert invalid.value.body["param"] == "temperature"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{pod}/v1", api_key="wrong", max_retries=0).models.list()
    other_key = openai.OpenAI(base_url=f"{pod}/v1", api_key="client-key-2", max_retries=0)
    assert other_key.models.list().data[0].id == "tiny"


def test_admin_endpoints_need_the_token(pod: str, artifacts: dict[str, Path]) -> None:
    load = {"lora_name": "lora-c", "lora_path": "pvc://adapters/lora-b"}
    calls = [
        ("POST", "/v1/load_lora_adapter", load),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "lora-b"}),
        ("PUT", "/v1/routes", {"routes": []}),
    ]
    for token in (None, "wrong", API_KEY):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        for method, path, body in calls:
            refused = httpx.request(method, f"{pod}{path}", json=body, headers=headers)
            assert refused.status_code == 401, (path, token, refused.text)
            assert refused.json()["error"]["code"] == "invalid_api_key"
            assert refused.headers["www-authenticate"] == "Bearer"
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    loaded = httpx.post(f"{pod}/v1/load_lora_adapter", json=load, headers=admin, timeout=60)
    assert loaded.status_code == 200, loaded.text
    outside = {"lora_name": "outside", "lora_path": str(artifacts["lora-a"])}
    refused = httpx.post(f"{pod}/v1/load_lora_adapter", json=outside, headers=admin, timeout=60)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "PathOutsideRoots"
    unloaded = httpx.post(f"{pod}/v1/unload_lora_adapter", json={"lora_name": "lora-c"}, headers=admin)
    assert unloaded.status_code == 200
