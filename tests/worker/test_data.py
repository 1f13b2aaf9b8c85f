"""Dataset reading, checking, masking and batching.

Aspects:
- every file type (JSONL, JSON, CSV, Parquet) x every format (text, completion, chat) reads back the
  records written, and `auto` detects the format;
- loss masks: completion trains on the completion + EOS only, chat on assistant turns only, text on all;
- truncation to max_seq_length, and records left with nothing to learn are dropped;
- the eval split is deterministic, independent of file order, and disjoint from training;
- packing yields full blocks with no padding, the same number every epoch;
- length grouping cuts padding against random batching and keeps every example exactly once.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kubetune.worker import data
from kubetune.worker.testing import task_records, write_records


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("fmt", ["text", "completion", "chat"])
def test_every_file_type_and_format_reads_back(tmp_path: Path, suffix: str, fmt: str) -> None:
    records = task_records(5, fmt=fmt)  # type: ignore[arg-type]
    path = write_records(tmp_path / f"train{suffix}", records)
    loaded, detected = data.load_records(path, "auto")
    assert detected == fmt
    assert [r.data for r in loaded] == records


def test_where_names_line_record_and_row(tmp_path: Path) -> None:
    records = task_records(2, fmt="text")
    assert [r.where for r in data.read_records(write_records(tmp_path / "a.jsonl", records))] == [
        "line 1",
        "line 2",
    ]
    assert data.read_records(write_records(tmp_path / "a.json", records))[1].where == "record 2"
    assert (
        data.read_records(write_records(tmp_path / "a.csv", records))[1].where == "line 3"
    )  # line 1 = header
    assert data.read_records(write_records(tmp_path / "a.parquet", records))[1].where == "row 2"


def test_split_is_deterministic_disjoint_and_order_independent() -> None:
    records = [data.Record(f"line {i}", r) for i, r in enumerate(task_records(100, fmt="text"), 1)]
    train, held = data.split_eval(records, 0.1, seed=7)
    assert len(held) == 10 and len(train) == 90
    assert not {id(r) for r in train} & {id(r) for r in held}
    _, again_held = data.split_eval(records, 0.1, seed=7)
    assert [r.where for r in again_held] == [r.where for r in held]
    shuffled = list(records)
    random.Random(1).shuffle(shuffled)
    _, shuffled_held = data.split_eval(shuffled, 0.1, seed=7)
    assert sorted(r.where for r in shuffled_held) == sorted(r.where for r in held)
    _, other_seed = data.split_eval(records, 0.1, seed=8)
    assert {r.where for r in other_seed} != {r.where for r in held}
    assert data.split_eval(records, 0.0, seed=7) == (records, [])


def test_packing_fills_blocks_and_is_stable_across_epochs() -> None:
    examples = [data.Example(list(range(n)), list(range(n))) for n in (5, 9, 13, 7, 11, 3)]
    blocks = data.pack_examples(examples, 8, seed=1, epoch=0)
    assert all(len(b) == 8 for b in blocks)
    assert len(blocks) == sum(len(e) for e in examples) // 8
    assert len(data.pack_examples(examples, 8, seed=1, epoch=1)) == len(blocks)
    assert data.pack_examples(examples, 8, seed=1, epoch=0) == blocks


def test_length_grouping_cuts_padding_and_keeps_every_example() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(4, 200) for _ in range(512)]

    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = data.batch_indices(lengths, 8, seed=3, epoch=0, group=True)
    plain = data.batch_indices(lengths, 8, seed=3, epoch=0, group=False)
    assert sorted(i for b in grouped for i in b) == list(range(512))
    assert padding(grouped) < padding(plain) / 4
    assert data.batch_indices(lengths, 8, seed=3, epoch=1, group=True) != grouped


@pytest.fixture(scope="module")
def tokenizer() -> object:
    pytest.importorskip("transformers")
    from kubetune.worker.testing import build_tokenizer

    return build_tokenizer()


@pytest.mark.torch
class TestTokenization:
    def _decode_trained(self, tokenizer: object, example: data.Example) -> list[str]:
        ids = [
            i
            for i, label in zip(example.input_ids, example.labels, strict=True)
            if label != data.IGNORE_INDEX
        ]
        return tokenizer.convert_ids_to_tokens(ids)  # type: ignore[attr-defined, no-any-return]

    def test_completion_trains_on_completion_and_eos_only(self, tokenizer: object) -> None:
        record = data.Record("line 1", {"prompt": "encode : a b :", "completion": "b c"})
        [example], dropped = data.tokenize_records([record], "completion", tokenizer, 64, "t")  # type: ignore[arg-type]
        assert dropped == 0
        assert self._decode_trained(tokenizer, example) == ["b", "c", "</s>"]
        assert tokenizer.convert_ids_to_tokens(example.input_ids)[0] == "<s>"  # type: ignore[attr-defined]

    def test_chat_trains_on_assistant_turns_only(self, tokenizer: object) -> None:
        messages = [
            {"role": "system", "content": "the cipher"},
            {"role": "user", "content": "encode : a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "encode : c"},
            {"role": "assistant", "content": "d e"},
        ]
        [example], _ = data.tokenize_records(
            [data.Record("line 1", {"messages": messages})], "chat", tokenizer, 64, "t"
        )  # type: ignore[arg-type]
        assert self._decode_trained(tokenizer, example) == ["b", "</s>", "d", "e", "</s>"]

    def test_text_trains_on_everything(self, tokenizer: object) -> None:
        [example], _ = data.tokenize_records(
            [data.Record("l", {"text": "count : 1 2"})], "text", tokenizer, 64, "t"
        )  # type: ignore[arg-type]
        assert example.labels == example.input_ids and example.input_ids[-1] == tokenizer.eos_token_id  # type: ignore[attr-defined]

    def test_truncation_and_dropping(self, tokenizer: object) -> None:
        long_prompt = data.Record("line 1", {"prompt": " ".join(["a"] * 50), "completion": "b"})
        short = data.Record("line 2", {"prompt": "encode : a :", "completion": "b"})
        examples, dropped = data.tokenize_records([long_prompt, short], "completion", tokenizer, 16, "t")  # type: ignore[arg-type]
        assert dropped == 1 and len(examples) == 1 and len(examples[0]) <= 16
        with pytest.raises(data.DatasetInvalid, match="max_seq_length 16"):
            data.tokenize_records([long_prompt], "completion", tokenizer, 16, "t")  # type: ignore[arg-type]
