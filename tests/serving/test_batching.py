"""Dynamic batching in the serving runtime, in process (no HTTP).

Aspects:
- requests for different LoRA adapters (ranks 4 and 8) and the base, queued together, run as one
  mixed-adapter batch (stacked LoRA weights), and each gets the greedy text it gets alone; an IA3
  adapter batches on its own;
- per-row settings inside one batch: max_tokens, stop sequences, seeded sampling (the same seed
  gives the same text whatever the batch), n choices, ignore_eos;
- streamed deltas add up to the final text;
- a full queue refuses with 429 (QueueFull) and a stopped batcher with 503 (NotReady);
- an adapter's state: a failure keeps its reason and backs off, a due retry loads it.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serving.conftest import PROMPT

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def model_server(artifacts: dict[str, Path]) -> Any:
    from kubetune.worker.serving import ModelServer

    server = ModelServer(artifacts["base"], adapter_roots=[artifacts["root"]])
    server.base_name = "tiny"
    for name in ("lora-a", "lora-b", "ia3"):
        server.load_adapter(name, artifacts[name])
    return server


@pytest.fixture
def batcher(model_server: Any) -> Iterator[Any]:
    from kubetune.worker.batching import Batcher

    batcher = Batcher(model_server, max_batch_size=8, max_queue=16, max_wait_s=0)
    batcher.start()
    yield batcher
    batcher.stop()


def _request(server: Any, adapter: str, prompt: str = PROMPT, **params: Any) -> Any:
    from kubetune.worker.batching import GenerationRequest, SamplingParams

    n = params.pop("n", 1)
    stream = params.pop("stream", False)
    sampling = SamplingParams(**{"max_tokens": 6, "temperature": 0.0, **params})
    return GenerationRequest(adapter, server.encode(prompt), sampling, n=n, stream=stream)


async def _results(batcher: Any, requests: list[Any], *, hold: Any = None) -> list[dict[str, Any]]:
    """Submit every request (all at once while ``hold``, the batcher's queue lock, is held) and
    collect their events."""
    loop = asyncio.get_running_loop()
    for request in requests:
        request.loop = loop
    if hold is not None:
        hold.acquire()
    try:
        for request in requests:
            batcher.submit(request)
    finally:
        if hold is not None:
            hold.release()
    out = []
    for request in requests:
        texts: dict[int, str] = {}
        deltas: dict[int, str] = {}
        reasons: dict[int, str] = {}
        tokens: dict[int, int] = {}
        while True:
            event = await asyncio.wait_for(request.events.get(), 120)
            if event[0] == "delta":
                deltas[event[1]] = deltas.get(event[1], "") + event[2]
            elif event[0] == "finish":
                reasons[event[1]], tokens[event[1]], texts[event[1]] = event[2], event[3], event[4]
            elif event[0] == "error":
                raise event[1]
            else:
                break
        out.append({"texts": texts, "deltas": deltas, "reasons": reasons, "tokens": tokens})
    return out


def _alone(batcher: Any, server: Any, adapter: str, prompt: str = PROMPT, **params: Any) -> str:
    result = asyncio.run(_results(batcher, [_request(server, adapter, prompt, **params)]))
    return str(result[0]["texts"][0])


def test_mixed_adapters_share_one_batch(model_server: Any, batcher: Any) -> None:
    cases = [("lora-a", PROMPT), ("lora-b", "encode : d o g s"), ("tiny", PROMPT), ("lora-a", "encode : x")]
    alone = [_alone(batcher, model_server, adapter, prompt) for adapter, prompt in cases]
    sizes_before = dict(batcher.batch_sizes)
    requests = [_request(model_server, adapter, prompt) for adapter, prompt in cases]
    together = asyncio.run(_results(batcher, requests, hold=batcher._cond))
    assert [r["texts"][0] for r in together] == alone
    # Queued at once, the four requests ran as one batch of four.
    assert batcher.batch_sizes[4] == sizes_before.get(4, 0) + 1
    assert len(set(alone[:3])) > 1, "the adapters should not all answer alike"
    # The mixed batch went through the stacked LoRA path, not PEFT's loop over adapters.
    with model_server.model_lock:
        assert model_server._stacked_lora() is not None


def test_non_lora_adapter_batches_on_its_own(model_server: Any, batcher: Any) -> None:
    assert model_server.batch_group("ia3") == ("adapter", "ia3")
    assert model_server.batch_group("lora-a") == model_server.batch_group("tiny") == "lora"
    alone = _alone(batcher, model_server, "ia3")
    requests = [_request(model_server, "ia3"), _request(model_server, "lora-a")]
    together = asyncio.run(_results(batcher, requests, hold=batcher._cond))
    assert together[0]["texts"][0] == alone


def test_per_row_settings_in_one_batch(model_server: Any, batcher: Any) -> None:
    full = _alone(batcher, model_server, "tiny", max_tokens=8)
    words = full.split()
    assert len(words) >= 3, full
    stop = f" {words[2]}"
    requests = [
        _request(model_server, "tiny", max_tokens=8),
        _request(model_server, "tiny", max_tokens=2),
        _request(model_server, "tiny", max_tokens=8, stop=(stop,), stream=True),
        _request(model_server, "tiny", max_tokens=8, temperature=1.0, seed=7, n=2),
        _request(model_server, "tiny", max_tokens=8, temperature=1.0, top_p=0.5, seed=7),
        _request(model_server, "tiny", max_tokens=12, ignore_eos=True),
    ]
    long, short, stopped, sampled, nucleus, no_eos = asyncio.run(
        _results(batcher, requests, hold=batcher._cond)
    )
    assert long["texts"][0] == full and long["reasons"][0] in ("length", "stop")
    assert short["texts"][0] == _alone(batcher, model_server, "tiny", max_tokens=2)
    assert full.startswith(short["texts"][0]) and short["reasons"][0] == "length"
    assert stopped["texts"][0] == full[: full.index(stop)] and stopped["reasons"][0] == "stop"
    assert stopped["deltas"][0] == stopped["texts"][0]
    assert (no_eos["tokens"][0], no_eos["reasons"][0]) == (12, "length")
    assert set(sampled["texts"]) == {0, 1}
    # A seeded request samples the same text alone as in a batch.
    assert sampled["texts"][0] == _alone(batcher, model_server, "tiny", max_tokens=8, temperature=1.0, seed=7)
    assert nucleus["texts"][0] == _alone(
        batcher, model_server, "tiny", max_tokens=8, temperature=1.0, top_p=0.5, seed=7
    )


def test_queue_bounds_and_shutdown(model_server: Any) -> None:
    from kubetune.worker.batching import Batcher, NotReady, QueueFull

    batcher = Batcher(model_server, max_batch_size=2, max_queue=2)
    with pytest.raises(NotReady):
        batcher.submit(_request(model_server, "tiny"))
    batcher.start()
    with model_server.model_lock:  # the first request waits in generate, two more fill the queue
        batcher.submit(_request(model_server, "tiny"))
        from kubetune.localcluster.testing import wait_for

        wait_for(lambda: batcher.queued == 0, 30, description="the first request to be taken")
        batcher.submit(_request(model_server, "tiny"))
        batcher.submit(_request(model_server, "tiny"))
        with pytest.raises(QueueFull) as full:
            batcher.submit(_request(model_server, "tiny"))
        assert full.value.status == 429
    batcher.stop()
    with pytest.raises(NotReady) as stopped:
        batcher.submit(_request(model_server, "tiny"))
    assert stopped.value.status == 503


def test_failed_adapter_backs_off_then_loads(
    model_server: Any, artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    from kubetune.worker.serving import AdapterLoadError

    root = artifacts["root"]
    late = root / "late-adapter"
    with pytest.raises(AdapterLoadError) as missing:
        model_server.load_adapter("late", str(late))
    state = model_server.states["late"]
    assert (missing.value.reason, state.state, state.reason, state.attempts) == (
        "MissingFiles",
        "Failed",
        "MissingFiles",
        1,
    )
    # Outside the adapter roots, and a wrong recorded hash: refused before anything loads.
    outside = tmp_path_factory.mktemp("elsewhere") / "lora"
    shutil.copytree(artifacts["lora-a"], outside)
    with pytest.raises(AdapterLoadError) as escaped:
        model_server.load_adapter("outside", str(outside))
    assert escaped.value.reason == "PathOutsideRoots"
    with pytest.raises(AdapterLoadError) as wrong:
        model_server.load_adapter("wrong-hash", str(artifacts["lora-a"]), sha256="0" * 64)
    assert wrong.value.reason == "HashMismatch"
    with pytest.raises(AdapterLoadError) as invalid:
        model_server.load_adapter("../x", str(artifacts["lora-a"]))
    assert invalid.value.reason == "InvalidName"

    # The artifact appears; once the backoff has passed, the background retry loads it.
    shutil.copytree(artifacts["lora-b"], late)
    model_server.retry_due()
    assert model_server.states["late"].state == "Failed"  # still backing off
    state.next_retry_at = 0.0
    model_server.retry_due()
    assert model_server.states["late"].state == "Loaded" and "late" in model_server.adapters
    for name in ("late", "outside", "wrong-hash"):
        model_server.unload_adapter(name)
    assert "late" not in model_server.states
