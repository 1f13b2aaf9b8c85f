"""The throughput benchmark's strongest baselines (``Trainer`` grouping by length, TRL ``SFTTrainer``
with padding-free packing) run, count real tokens, and are ranked (no timings asserted).

Aspects:
- every baseline strategy trains through ``benchmarks.throughput`` beside a kubetune variant, and the
  summary gives each side its ratio to the first and to the best baseline;
- TRL's own token count equals the real tokens counted on a padding-free batch (no mask);
- the best baseline is the fastest median, whichever it is.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import plain_trainer, throughput


@pytest.mark.torch
@pytest.mark.slow
def test_every_baseline_runs_beside_kubetune(tmp_path: Path) -> None:
    settings = throughput.Settings(
        size="tiny", steps=2, batch_size=4, max_seq_length=64, records=24, variants=("packed",), repeats=1
    )
    document = throughput.run(settings, tmp_path / "work", tmp_path / "results")
    sides = {row["side"]: row for row in document["summary"]}
    assert set(sides) == {*throughput.BASELINES, "kubetune-packed"}
    assert all(row["tokens_per_second_median"] > 0 for row in sides.values())
    assert sides["kubetune-packed"]["best_baseline"] in throughput.BASELINES
    assert sides["kubetune-packed"]["ratio_to_best_baseline"] > 0
    markdown = (tmp_path / "results" / "throughput.md").read_text()
    assert "| trl-sft-packed |" in markdown and "| trainer-group-by-length |" in markdown


def test_padding_free_batches_count_every_token() -> None:
    torch = pytest.importorskip("torch")
    flat = {"input_ids": torch.ones(1, 37, dtype=torch.long), "position_ids": torch.zeros(1, 37)}
    padded = {
        "input_ids": torch.ones(2, 5),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    }
    assert plain_trainer.real_tokens(flat) == 37 and plain_trainer.real_tokens(padded) == 8


def test_ratios_against_the_first_and_the_best_baseline() -> None:
    settings = throughput.Settings(variants=("grouped",), repeats=1)
    speeds = {"transformers+peft": 100.0, "trainer-group-by-length": 250.0, "trl-sft-packed": 200.0}
    runs = [
        {"side": side, "repeat": 0, "tokens_per_second": speed, "real_tokens": 1, "train_seconds": 1,
         "process_seconds": 1}
        for side, speed in [*speeds.items(), ("kubetune-grouped", 300.0)]
    ]  # fmt: skip
    rows = {row["side"]: row for row in throughput.summarise(runs, settings)}
    assert rows["kubetune-grouped"]["ratio_to_baseline"] == pytest.approx(3.0)
    assert rows["kubetune-grouped"]["best_baseline"] == "trainer-group-by-length"
    assert rows["kubetune-grouped"]["ratio_to_best_baseline"] == pytest.approx(1.2)
