"""Adapters of every method share the server's one base model in memory (issue 9, item 5).

Aspects:
- LoRA, IA3, prefix and bottleneck adapters loaded together hold no copy of a base tensor: what each
  adds is its own weights only, and ``/v1/adapters`` says ``shared_base`` for each;
- each gives the logits and the greedy text of the same artifact loaded alone on its own base
  (``load_trained_model``), through the batcher, while the LoRA host's layers sit in the same base;
- the hooks of IA3 and bottleneck adapters are attached only for their own batch: the base computes
  as itself before and after, and after an unload;
- a full fine-tune is the one kind still served as a model of its own.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.serving.conftest import PROMPT, direct, train

pytestmark = pytest.mark.torch

SHARED = ("lora-a", "ia3", "prefix", "bottleneck")


@pytest.fixture(scope="module")
def more_artifacts(artifacts: dict[str, Path]) -> dict[str, Path]:
    root, base = artifacts["root"], artifacts["base"]
    data = root / "train.jsonl"
    return {
        **artifacts,
        "prefix": train(base, data, root / "prefix", {"type": "prefix", "prefix": {"virtual_tokens": 4}}),
        "bottleneck": train(
            base, data, root / "bottleneck", {"type": "adapter", "adapter": {"bottleneck_size": 16}}
        ),
    }


@pytest.fixture(scope="module")
def server(more_artifacts: dict[str, Path]) -> Any:
    from kubetune.worker.serving import ModelServer

    server = ModelServer(more_artifacts["base"], adapter_roots=[more_artifacts["root"]])
    for name in SHARED:
        server.load_adapter(name, more_artifacts[name])
    return server


def _storages(tensors: Any) -> dict[int, int]:
    """data_ptr -> bytes of each distinct storage among ``tensors``."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _tensors(instance: Any) -> list[Any]:
    import torch

    if isinstance(instance, torch.nn.Module):
        return [*instance.parameters(), *instance.buffers()]
    if hasattr(instance, "adapter"):  # BottleneckHooks
        return list(instance.adapter.parameters())
    return [vector for vector, _ in instance.scales.values()]  # IA3Hooks


def test_no_adapter_holds_a_copy_of_the_base(server: Any) -> None:
    from kubetune.worker.serving import describe

    base = _storages([*server.base.parameters(), *server.base.buffers()])
    base_bytes = sum(base.values())
    for name in SHARED:
        loaded = server.adapters[name]
        assert loaded.kind == {"lora-a": "lora", "prefix": "prompt"}.get(name, "hooks")
        if loaded.instance is None:  # LoRA: its layers live inside the base, on the host
            continue
        own = {ptr: size for ptr, size in _storages(_tensors(loaded.instance)).items() if ptr not in base}
        # A copy of the base would be at least base_bytes; the adapters are a few percent of it.
        assert 0 < sum(own.values()) < 0.2 * base_bytes, (name, sum(own.values()), base_bytes)
    listed = {a["name"]: a["shared_base"] for a in describe(server)["adapters"]}
    assert listed == dict.fromkeys(SHARED, True)


def _logits(model: Any, tokenizer: Any) -> Any:
    import torch

    encoded = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        return model(**encoded).logits[:, -1]


def test_hooked_adapters_compute_as_their_own_model(server: Any, more_artifacts: dict[str, Path]) -> None:
    import torch

    from kubetune.worker.artifact import load_trained_model

    with server._base_only():
        bare = _logits(server.base, server.tokenizer)
    for name in ("ia3", "bottleneck"):
        alone = _logits(load_trained_model(more_artifacts[name], more_artifacts["base"]), server.tokenizer)
        with server._base_only(), server.adapters[name].instance.attached(server.base):
            shared = _logits(server.base, server.tokenizer)
        assert not torch.allclose(alone, bare, atol=1e-4), f"{name} should change the model"
        torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-5)
        with server._base_only():  # the hooks are gone again
            torch.testing.assert_close(_logits(server.base, server.tokenizer), bare, rtol=0, atol=0)


async def _greedy(server: Any, adapters: list[str], tokens: int) -> list[str]:
    from kubetune.worker.batching import Batcher, GenerationRequest, SamplingParams

    batcher = Batcher(server, max_batch_size=8, max_queue=16, max_wait_s=0)
    batcher.start()
    loop = asyncio.get_running_loop()
    try:
        requests = [
            GenerationRequest(a, server.encode(PROMPT), SamplingParams(max_tokens=tokens, temperature=0.0))
            for a in adapters
        ]
        for request in requests:
            request.loop = loop
            batcher.submit(request)
        texts = []
        for request in requests:
            while (event := await asyncio.wait_for(request.events.get(), 120))[0] != "done":
                if event[0] == "error":
                    raise event[1]
                if event[0] == "finish":
                    texts.append(event[4])
        return texts
    finally:
        batcher.stop()


def test_each_method_generates_what_it_generates_alone(server: Any, more_artifacts: dict[str, Path]) -> None:
    base = more_artifacts["base"]
    names = [*SHARED, server.base_name]
    texts = asyncio.run(_greedy(server, names, 8))
    expected = [direct(more_artifacts[n], base, PROMPT, 8) for n in SHARED] + [direct(None, base, PROMPT, 8)]
    assert texts == expected


def test_unloaded_hooks_leave_the_base_alone(more_artifacts: dict[str, Path]) -> None:
    import torch

    from kubetune.worker.serving import ModelServer

    server = ModelServer(more_artifacts["base"], adapter_roots=[more_artifacts["root"]])
    bare = _logits(server.base, server.tokenizer)
    server.load_adapter("ia3", more_artifacts["ia3"])
    asyncio.run(_greedy(server, ["ia3"], 2))
    server.unload_adapter("ia3")
    torch.testing.assert_close(_logits(server.base, server.tokenizer), bare, rtol=0, atol=0)
    expected = direct(None, more_artifacts["base"], PROMPT, 8)
    assert asyncio.run(_greedy(server, [server.base_name], 8)) == [expected]


def test_stacked_lora_weights_are_the_adapters_own(more_artifacts: dict[str, Path]) -> None:
    """A mixed LoRA batch stacks the adapters' weights; the adapters' PEFT weights become views of the
    stacks, so stacking holds no second copy, and later loads (which set requires_grad on them) work."""
    from kubetune.worker.serving import ModelServer

    server = ModelServer(more_artifacts["base"], adapter_roots=[more_artifacts["root"]])
    for name in ("lora-a", "lora-b"):
        server.load_adapter(name, more_artifacts[name])
    alone = [asyncio.run(_greedy(server, [name], 6))[0] for name in ("lora-a", "lora-b")]
    assert asyncio.run(_greedy(server, ["lora-a", "lora-b"], 6)) == alone
    stacked = server._stacked_lora()
    assert stacked is not None and stacked.stacks
    for module, (a, b, _) in stacked.stacks.items():
        for name in ("lora-a", "lora-b"):
            assert module.lora_A[name].weight.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
            assert module.lora_B[name].weight.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    server.load_adapter("ia3", more_artifacts["ia3"])
    server.load_adapter("lora-c", more_artifacts["lora-a"])
    assert asyncio.run(_greedy(server, ["lora-a", "lora-b", "lora-c"], 6)) == [*alone, alone[0]]
