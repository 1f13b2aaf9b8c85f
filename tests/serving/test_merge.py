"""``mergeAdapter``: one LoRA adapter served merged into the base weights (PEFT's merge_and_unload).

Aspects:
- the merged model's logits equal the unmerged adapter's (PeftModel over the same base) within
  float32 tolerance, while differing from the base's (the adapter changes the model), and greedy
  generation gives the same tokens;
- the base is not served under its own name while an adapter is merged into it;
- one adapter only: a second one is refused with a reason;
- replacing the adapter (by an IA3 one, then another LoRA) merges the new version into a fresh base,
  not on top of the old one, and unloading it serves the base's own weights again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.serving.conftest import PROMPT

pytestmark = pytest.mark.torch


def _logits(model: Any, tokenizer: Any) -> Any:
    import torch

    encoded = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        return model(**encoded).logits


def _greedy(model: Any, tokenizer: Any) -> list[int]:
    import torch

    encoded = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **encoded, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return [int(t) for t in out[0][encoded["input_ids"].shape[1] :]]


def test_merged_adapter_serves_like_the_unmerged_one(artifacts: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.worker.artifact import load_trained_model
    from kubetune.worker.serving import AdapterLoadError, ModelServer, UnknownModel

    torch.manual_seed(0)
    server = ModelServer(artifacts["base"], merge=True)
    tokenizer = server.tokenizer
    base_logits = _logits(server.base, tokenizer)
    assert server.model_names() == ["tiny"]

    server.load_adapter("support", str(artifacts["lora-a"]))
    assert server.model_names() == ["support"]
    with pytest.raises(UnknownModel, match="merged"):
        server.resolve("tiny")
    merged = server.adapters["support"].instance
    # Plain layers: no LoRA module is left in the served model.
    assert not any("lora" in name for name, _ in merged.named_modules())
    unmerged = load_trained_model(artifacts["lora-a"], artifacts["base"])
    reference = _logits(unmerged, tokenizer)
    assert not torch.allclose(reference, base_logits, atol=1e-3), "the adapter should change the model"
    torch.testing.assert_close(_logits(merged, tokenizer), reference, atol=1e-4, rtol=1e-4)
    assert _greedy(merged, tokenizer) == _greedy(unmerged, tokenizer)

    with pytest.raises(AdapterLoadError, match="one adapter") as second:
        server.load_adapter("other", str(artifacts["lora-b"]))
    assert second.value.reason == "UnsupportedArtifact"
    server.unload_adapter("other")  # forget the failure
    # IA3 scales merge too (the method registry says which methods merge).
    server.load_adapter("support", str(artifacts["ia3"]))
    torch.testing.assert_close(
        _logits(server.adapters["support"].instance, tokenizer),
        _logits(load_trained_model(artifacts["ia3"], artifacts["base"]), tokenizer),
        atol=1e-4,
        rtol=1e-4,
    )

    # A new version under the same name: merged into a fresh base, not on top of the first.
    server.load_adapter("support", str(artifacts["lora-b"]))
    torch.testing.assert_close(
        _logits(server.adapters["support"].instance, tokenizer),
        _logits(load_trained_model(artifacts["lora-b"], artifacts["base"]), tokenizer),
        atol=1e-4,
        rtol=1e-4,
    )

    server.unload_adapter("support")
    assert server.model_names() == ["tiny"] and server.resolve("tiny") == "tiny"
    fresh = AutoModelForCausalLM.from_pretrained(artifacts["base"]).eval()
    torch.testing.assert_close(_logits(server.base, tokenizer), _logits(fresh, tokenizer))
