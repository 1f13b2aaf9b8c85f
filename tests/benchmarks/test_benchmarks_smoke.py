"""The benchmark harnesses run end to end with minimal settings (no timings are asserted).

Aspects:
- ``benchmarks.method_comparison`` trains two methods through ``kubetune train``, measures their
  training memory, and writes a JSON and a markdown table with ratios against full fine-tuning;
- ``benchmarks.throughput`` runs the plain transformers + peft baseline and one kubetune variant and
  writes both files with a ratio;
- the pure helpers: ratios against full fine-tuning, table formatting, variable-length data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import method_comparison, throughput
from benchmarks.common import fmt, markdown_table

pytestmark = pytest.mark.torch


@pytest.mark.slow
def test_method_comparison_runs_end_to_end(tmp_path: Path) -> None:
    settings = method_comparison.Settings(
        size="tiny",
        pretrain_steps=2,
        steps=2,
        batch_size=4,
        train_records=40,
        retention_records=8,
        methods=("full", "adapter"),
        learning_rates={"full": (1e-3,), "adapter": (1e-3,)},
    )
    document = method_comparison.run(settings, tmp_path / "work", tmp_path / "results")

    written = json.loads((tmp_path / "results" / "method_comparison.json").read_text())
    assert [row["method"] for row in written["methods"]] == ["full", "adapter"]
    adapter = document["methods"][1]
    assert 0 < adapter["trainable_percent"] < 100
    assert adapter["checkpoint_bytes"] > 0 and adapter["training_memory"]["total"] > 0
    assert adapter["vs_full"]["checkpoint_size"] < 1
    assert "| adapter |" in (tmp_path / "results" / "method_comparison.md").read_text()


@pytest.mark.slow
def test_throughput_runs_end_to_end(tmp_path: Path) -> None:
    settings = throughput.Settings(
        size="tiny",
        steps=2,
        batch_size=4,
        max_seq_length=64,
        records=24,
        variants=("grouped",),
        repeats=1,
        baselines=(throughput.BASELINE,),  # the stronger ones: tests/benchmarks/test_baselines_smoke.py
    )
    document = throughput.run(settings, tmp_path / "work", tmp_path / "results")

    sides = {row["side"]: row for row in document["summary"]}
    assert set(sides) == {throughput.BASELINE, "kubetune-grouped"}
    assert all(row["tokens_per_second_median"] > 0 for row in sides.values())
    assert sides["kubetune-grouped"]["ratio_to_baseline"] is not None
    assert (tmp_path / "results" / "throughput.md").is_file()


def test_ratios_are_against_full_fine_tuning() -> None:
    def row(method: str, eval_loss: float, size: int) -> dict[str, object]:
        return {
            "method": method,
            "trainable_parameters": size,
            "training_memory_bytes": size,
            "peak_rss_bytes": 100,
            "checkpoint_bytes": size,
            "tokens_per_second": 10.0,
            "eval_loss_before": 4.0,
            "eval_loss": eval_loss,
            "retention_delta": 0.5,
        }

    rows = [row("full", 2.0, 1000), row("lora", 3.0, 10)]
    method_comparison.add_ratios(rows)
    assert rows[1]["vs_full"]["quality_recovered"] == pytest.approx(0.5)  # type: ignore[index]
    assert rows[1]["vs_full"]["checkpoint_size"] == pytest.approx(0.01)  # type: ignore[index]


def test_variable_length_records_vary_in_length() -> None:
    lengths = [len(r["text"].split()) for r in throughput.variable_length_records(200, seed=0)]
    assert min(lengths) < 20 < max(lengths)


def test_table_cells() -> None:
    assert (
        fmt(None) == "-" and fmt(12345) == "12,345" and fmt(0.12345) == "0.123" and fmt(12345.6) == "12,346"
    )
    assert markdown_table(["a", "b"], [[1, None]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | - |"]
