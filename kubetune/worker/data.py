"""Datasets: read JSONL/JSON/Parquet/CSV, check every record, tokenize with loss masks, and batch.

Reading and checking need only the standard library (and pyarrow for Parquet), so bad data fails in
seconds, before any model is loaded. Every problem names the file and the line (JSONL, CSV), record
(JSON) or row (Parquet), as in ``train.jsonl line 17: missing "completion"``.

Formats:

* ``text``: ``{"text": ...}``; loss on every token.
* ``completion``: ``{"prompt": ..., "completion": ...}``; loss on the completion (and EOS) only.
* ``chat``: ``{"messages": [{"role", "content"}, ...]}`` rendered with the tokenizer's chat template;
  loss on the assistant turns only.

Batching either packs examples into full blocks (no padding at all) or groups examples of similar length
and pads each batch to its longest example. Both are deterministic in ``(seed, epoch)`` so every rank and
every restart sees the same order, which is what makes resume-by-step exact.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kubetune.worker.errors import DatasetInvalid, ModelInvalid

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant", "tool")
FORMAT_FIELDS = {"text": ("text",), "completion": ("prompt", "completion"), "chat": ("messages",)}


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from (``line 17``, ``record 3``, ``row 9``)."""

    where: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Example:
    """A tokenized record. ``labels`` holds ``IGNORE_INDEX`` where no loss is taken.

    Packed blocks also carry ``position_ids`` that restart at 0 with every record they hold.
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    eos_token_id: int | None
    chat_template: Any

    def __call__(self, text: Any, add_special_tokens: bool = ...) -> Any: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _decode(raw: bytes, name: str, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetInvalid(
            f"{name} {where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1})"
        ) from exc


def read_records(path: Path, name: str | None = None) -> list[Record]:
    """Read every record of a dataset file; the suffix picks the reader.

    Raises :class:`DatasetInvalid` for an unknown suffix, undecodable bytes, a malformed line or an
    empty file.
    """
    name = name or path.name
    suffix = path.suffix.lower()
    records: list[Record] = []
    if suffix == ".jsonl":
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                line = _decode(raw, name, f"line {number}").strip()
                if not line:
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetInvalid(f"{name} line {number}: invalid JSON: {exc.msg}") from exc
                if not isinstance(value, dict):
                    raise DatasetInvalid(
                        f"{name} line {number}: expected a JSON object, got {type(value).__name__}"
                    )
                records.append(Record(f"line {number}", value))
    elif suffix == ".json":
        text = _decode(path.read_bytes(), name, "file").lstrip("\ufeff")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetInvalid(f"{name} line {exc.lineno}: invalid JSON: {exc.msg}") from exc
        # Accept a bare list, or one top-level key holding the list (``{"data": [...]}``).
        if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
            value = next(iter(value.values()))
        if not isinstance(value, list):
            raise DatasetInvalid(f"{name}: expected a JSON array of objects")
        for number, item in enumerate(value, start=1):
            if not isinstance(item, dict):
                raise DatasetInvalid(f"{name} record {number}: expected an object, got {type(item).__name__}")
            records.append(Record(f"record {number}", item))
    elif suffix == ".csv":
        text = _decode(path.read_bytes(), name, "file").lstrip("\ufeff")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            for row in reader:
                if None in row:
                    raise DatasetInvalid(f"{name} line {reader.line_num}: more cells than header columns")
                records.append(Record(f"line {reader.line_num}", {k: v for k, v in row.items() if v != ""}))
        except csv.Error as exc:
            raise DatasetInvalid(f"{name} line {reader.line_num}: {exc}") from exc
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:
            raise DatasetInvalid(f"{name}: not a readable Parquet file: {exc}") from exc
        records = [Record(f"row {number}", row) for number, row in enumerate(rows, start=1)]
    else:
        raise DatasetInvalid(
            f"{name}: unsupported file type '{suffix}' (use .jsonl, .json, .parquet or .csv)"
        )
    if not records:
        raise DatasetInvalid(f"{name}: no records")
    return records


def detect_format(records: Sequence[Record], name: str) -> str:
    """The format named by the first record's fields (messages > prompt/completion > text)."""
    first = records[0]
    keys = set(first.data)
    if "messages" in keys:
        return "chat"
    if "prompt" in keys or "completion" in keys:
        return "completion"
    if "text" in keys:
        return "text"
    found = ", ".join(sorted(keys)) or "none"
    raise DatasetInvalid(
        f'{name} {first.where}: cannot detect the format: expected "text", "prompt"/"completion" or '
        f'"messages" (found: {found})'
    )


def validate_records(records: Sequence[Record], fmt: str, name: str) -> None:
    """Check every record has the format's fields with the right types; fail on the first that doesn't."""
    for record in records:
        data = record.data
        for field in FORMAT_FIELDS[fmt]:
            if field not in data or data[field] is None:
                raise DatasetInvalid(f'{name} {record.where}: missing "{field}"')
        if fmt == "chat":
            messages = data["messages"]
            if isinstance(messages, str):  # CSV and Parquet cells carry the list as JSON text
                try:
                    messages = json.loads(messages)
                except json.JSONDecodeError as exc:
                    raise DatasetInvalid(f'{name} {record.where}: "messages" is not valid JSON') from exc
                data["messages"] = messages
            if not isinstance(messages, list) or not messages:
                raise DatasetInvalid(f'{name} {record.where}: "messages" must be a non-empty list')
            for index, message in enumerate(messages):
                if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                    raise DatasetInvalid(f'{name} {record.where}: message {index} needs a string "content"')
                if message.get("role") not in CHAT_ROLES:
                    raise DatasetInvalid(
                        f"{name} {record.where}: message {index} has role {message.get('role')!r} "
                        f"(expected one of {', '.join(CHAT_ROLES)})"
                    )
            if not any(m["role"] == "assistant" for m in messages):
                raise DatasetInvalid(f"{name} {record.where}: no assistant message to train on")
        else:
            for field in FORMAT_FIELDS[fmt]:
                if not isinstance(data[field], str):
                    raise DatasetInvalid(
                        f'{name} {record.where}: "{field}" must be a string, got {type(data[field]).__name__}'
                    )
            if not data[FORMAT_FIELDS[fmt][-1]]:
                raise DatasetInvalid(f'{name} {record.where}: "{FORMAT_FIELDS[fmt][-1]}" is empty')


def load_records(path: Path, fmt: str, name: str | None = None) -> tuple[list[Record], str]:
    """Read, detect (when ``fmt`` is ``auto``) and validate; returns the records and the format used."""
    name = name or path.name
    records = read_records(path, name)
    if fmt == "auto":
        fmt = detect_format(records, name)
    validate_records(records, fmt, name)
    return records, fmt


def split_eval(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out ``round(fraction * n)`` records (at least 1 when fraction > 0 and n >= 2).

    Records are ranked by a hash of their content and the seed, so the split does not depend on file
    order, rank or restart. The training records keep their file order.
    """
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    count = min(len(records) - 1, max(1, round(fraction * len(records))))

    def rank(index: int) -> tuple[str, int]:
        payload = json.dumps(records[index].data, sort_keys=True, ensure_ascii=False, default=str)
        # The index only breaks ties between duplicate records.
        return hashlib.sha256(f"{seed}\0{payload}".encode()).hexdigest(), index

    held = set(sorted(range(len(records)), key=rank)[:count])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def _ids(encoded: Any) -> list[int]:
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return list(ids)


def _chat_segments(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], where: str
) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, trained) pieces, trained = an assistant turn.

    Works for any template whose rendering of a conversation prefix is a prefix of the whole rendering,
    which holds for the chat templates of Llama, Qwen, Mistral and our tiny model.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # Templates refuse an empty conversation, so a leading assistant turn has no rendered prefix.
        before = (
            tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
            if index
            else ""
        )
        upto = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not before.startswith(done) or not upto.startswith(before):
            raise ModelInvalid(
                f"{where}: the tokenizer's chat template does not render conversations prefix-stably, "
                "so assistant turns cannot be located; use the completion format instead"
            )
        if before[len(done) :]:
            segments.append((before[len(done) :], False))
        segments.append((upto[len(before) :], True))
        done = upto
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    if whole[len(done) :]:
        segments.append((whole[len(done) :], False))
    return segments


def tokenize_records(
    records: Sequence[Record], fmt: str, tokenizer: Tokenizer, max_length: int, name: str
) -> tuple[list[Example], int]:
    """Tokenize and mask; returns the examples and how many were dropped for having nothing to learn.

    Examples are cut to ``max_length`` tokens. Raises :class:`DatasetInvalid` when nothing is left.
    """
    eos = tokenizer.eos_token_id
    examples: list[Example] = []
    if fmt == "text":
        for encoded in tokenizer([r.data["text"] for r in records], add_special_tokens=True)["input_ids"]:
            tokens = list(encoded)
            if eos is not None and (not tokens or tokens[-1] != eos):
                tokens.append(eos)
            examples.append(Example(tokens, list(tokens)))
    elif fmt == "completion":
        prompts = tokenizer([r.data["prompt"] for r in records], add_special_tokens=True)["input_ids"]
        completions = tokenizer([r.data["completion"] for r in records], add_special_tokens=False)[
            "input_ids"
        ]
        for prompt, completion in zip(prompts, completions, strict=True):
            answer = list(completion) + ([eos] if eos is not None else [])
            examples.append(Example(list(prompt) + answer, [IGNORE_INDEX] * len(prompt) + answer))
    elif fmt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DatasetInvalid(
                f"{name}: chat records need a tokenizer with a chat template; this one has none"
            )
        for record in records:
            ids: list[int] = []
            labels: list[int] = []
            for text, trained in _chat_segments(tokenizer, record.data["messages"], f"{name} {record.where}"):
                piece = _ids(tokenizer(text, add_special_tokens=False))
                ids.extend(piece)
                labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
            examples.append(Example(ids, labels))
    else:  # pragma: no cover - the plan schema restricts formats
        raise ValueError(fmt)
    kept: list[Example] = []
    for example in examples:
        ids, labels = example.input_ids[:max_length], example.labels[:max_length]
        # Position 0 is never predicted (labels shift by one inside the model).
        if labels[1:].count(IGNORE_INDEX) < len(labels) - 1:
            kept.append(Example(ids, labels))
    if not kept:
        raise DatasetInvalid(f"{name}: no record has a token to learn within max_seq_length {max_length}")
    return kept, len(examples) - len(kept)


def pack_examples(examples: Sequence[Example], block_length: int, seed: int, epoch: int) -> list[Example]:
    """Shuffle, concatenate and cut into blocks of exactly ``block_length`` tokens.

    The tail that does not fill a block is dropped (unless it is all there is), so every epoch has the
    same number of blocks whatever the order. Position ids restart with each record: given them and no
    attention mask, transformers builds a block-diagonal causal mask, so records packed together do
    not attend to each other.
    """
    order = list(range(len(examples)))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for index in order:
        ids.extend(examples[index].input_ids)
        labels.extend(examples[index].labels)
        positions.extend(range(len(examples[index])))
    count = max(1, len(ids) // block_length)
    blocks = [slice(i * block_length, (i + 1) * block_length) for i in range(count)]
    return [Example(ids[b], labels[b], positions[b]) for b in blocks]


def batch_indices(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group: bool
) -> list[list[int]]:
    """Shuffled batches of indices; with ``group``, examples of similar length share a batch.

    Grouping sorts within windows of 64 batches and then shuffles the batches, which keeps the order
    random at the scale of the epoch while cutting padding inside each batch.
    """
    rng = random.Random(f"{seed}/{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group:
        window = batch_size * 64
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda k: -lengths[k])
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group:
        rng.shuffle(batches)
    return batches
