"""Tiny models and synthetic data for tests, benchmarks and the demo; no network anywhere.

* :func:`make_tiny_model` writes a random-init Llama-architecture causal LM (``tiny``: about 0.1 M
  parameters, ``small``: about 3 M) with a word-level tokenizer built offline, including a chat template.
  With ``pretrain_steps`` it is first trained on the *retention* distribution, so that forgetting can be
  measured against something the base model actually knew.
* :func:`task_records` is the fine-tuning task, a Caesar cipher over letters
  (``encode : c a t`` -> ``d b u``): the completion is a function of the prompt, so loss falls within
  tens of steps on CPU and keeps falling as the model learns the rule.
* :func:`retention_records` is a different distribution (counting: ``count : 3 4 5 6 7``) used to
  measure forgetting.
* :func:`write_records` writes records as JSONL, JSON, CSV or Parquet, chosen by the file suffix.
"""

from __future__ import annotations

import copy
import csv
import json
import random
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

LETTERS = list(string.ascii_lowercase)
DIGITS = [str(d) for d in range(10)]
WORDS = ["encode", "count", "cipher", "the", "a", "is", "and", "of", "text", "hello", "world", ":", ",", "."]
SPECIAL = ["[PAD]", "[UNK]", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]

# Each turn ends with EOS so a generated assistant turn stops by itself.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8},
}


def build_tokenizer() -> Any:
    """A word-level fast tokenizer over the synthetic vocabulary (unknown words map to ``[UNK]``)."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    # dict.fromkeys drops repeats ("a" is a letter and a word) so the ids stay contiguous: a gap
    # would give the last token an id equal to the vocabulary size.
    vocab = {token: index for index, token in enumerate(dict.fromkeys(SPECIAL + LETTERS + DIGITS + WORDS))}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(SPECIAL)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(
    directory: str | Path,
    *,
    size: Literal["tiny", "small"] = "tiny",
    seed: int = 0,
    pretrain_steps: int = 0,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny Llama + tokenizer to ``directory`` (created) and return it.

    ``pretrain_steps`` > 0 trains the model first on :func:`retention_records` (batch 16, lr 3e-3),
    which takes about a second per 20 steps for ``tiny`` on one CPU core. ``config_overrides`` are
    applied to the ``LlamaConfig`` (e.g. ``{"intermediate_size": 120}``).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        hidden_size=SIZES[size]["hidden_size"],
        intermediate_size=SIZES[size]["intermediate_size"],
        num_hidden_layers=SIZES[size]["num_hidden_layers"],
        num_attention_heads=SIZES[size]["num_attention_heads"],
    )
    config.update(config_overrides or {})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if pretrain_steps:
        _pretrain(model, tokenizer, pretrain_steps, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    # safetensors writes its file 0600; the workers that read the model run as another user.
    for path in directory.iterdir():
        path.chmod(0o644)
    return directory


def _pretrain(model: Any, tokenizer: Any, steps: int, seed: int) -> None:
    import torch

    texts = [r["text"] for r in retention_records(512, seed=seed + 1)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    rng = random.Random(seed)
    for _ in range(steps):
        batch = tokenizer(rng.sample(texts, 16), return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _encode(word: list[str], shift: int) -> list[str]:
    return [LETTERS[(LETTERS.index(c) + shift) % 26] for c in word]


def task_records(
    count: int, *, seed: int = 0, fmt: Literal["text", "completion", "chat"] = "completion", shift: int = 1
) -> list[dict[str, Any]]:
    """``count`` cipher records (3-8 letters each) in the given format."""
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for _ in range(count):
        word = [rng.choice(LETTERS) for _ in range(rng.randint(3, 8))]
        prompt = "encode : " + " ".join(word)
        answer = " ".join(_encode(word, shift))
        if fmt == "text":
            records.append({"text": f"{prompt} : {answer}"})
        elif fmt == "completion":
            records.append({"prompt": prompt + " :", "completion": answer})
        else:
            records.append(
                {
                    "messages": [
                        {"role": "system", "content": "the cipher"},
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
    return records


def retention_records(count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` counting records in text format: ``count : 3 4 5 6`` (digits, wrapping at 9)."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        start, length = rng.randint(0, 9), rng.randint(4, 9)
        records.append({"text": "count : " + " ".join(DIGITS[(start + i) % 10] for i in range(length))})
    return records


def write_records(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """Write records in the format named by the suffix (.jsonl, .json, .csv, .parquet)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    elif suffix == ".csv":
        columns = list(dict.fromkeys(key for record in records for key in record))
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            for record in records:
                writer.writerow(
                    {k: json.dumps(v) if not isinstance(v, str) else v for k, v in record.items()}
                )
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        raise ValueError(f"unsupported suffix {suffix}")
    return path


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``override`` merged in, recursively for nested mappings (for building
    plan dictionaries in tests and benchmarks; ``base`` is never modified)."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
