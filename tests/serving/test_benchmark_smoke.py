"""``benchmarks.serving`` runs end to end with minimal settings (no timings are asserted).

Aspects:
- both servers (kubetune and the naive baseline) answer every mode, and the JSON and markdown
  results hold the ratios, the load latencies and the memory figures;
- the mergeAdapter benchmark: both sides measured in every repeat, the merged server serving the
  adapter alone;
- the pure helpers: percentiles, the summary's ratios.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import serving


def test_percentile_and_summary() -> None:
    assert serving.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert serving.percentile([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0
    runs = [
        {"side": side, "mode": mode, "clients": 1, "requests_per_second": rps, "tokens_per_second": rps * 4}
        | {"latency_p50_s": 0.1, "latency_p99_s": 0.2}
        for side, mode, rps in (
            (serving.BASELINE, serving.MODES[0], 10.0),
            (serving.BASELINE, serving.MODES[1], 5.0),
            (serving.KUBETUNE, serving.MODES[0], 10.0),
            (serving.KUBETUNE, serving.MODES[1], 40.0),
        )
    ]
    rows = {(r["side"], r["mode"]): r for r in serving.summarise(runs)}
    assert rows[(serving.KUBETUNE, serving.MODES[1])]["vs_sequential"] == 4.0
    assert rows[(serving.KUBETUNE, serving.MODES[1])]["vs_baseline"] == 8.0


@pytest.mark.torch
@pytest.mark.slow
def test_serving_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    settings = serving.Settings(
        size="tiny",
        adapters=2,
        adapter_steps=1,
        requests=4,
        max_tokens=4,
        clients=2,
        repeats=1,
        load_repeats=3,
    )
    document = serving.run(settings, tmp_path / "work", tmp_path / "results")

    written = json.loads((tmp_path / "results" / "serving.json").read_text())
    assert {(r["side"], r["mode"]) for r in written["summary"]} == {
        (side, mode) for side in (serving.BASELINE, serving.KUBETUNE) for mode in serving.MODES
    }
    assert all(r["requests_per_second"] > 0 for r in document["summary"])
    assert all(run["completion_tokens"] == 4 * 4 for run in document["runs"])  # EOS ignored on both
    phase = document["adapter_phase"]
    assert phase["adapter_loads"] == 3 and phase["rss_with_adapters_bytes"] > 0
    assert "| kubetune | concurrent, 8 adapters mixed |" in (tmp_path / "results" / "serving.md").read_text()


@pytest.mark.torch
@pytest.mark.slow
def test_merge_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    settings = serving.Settings(size="tiny", adapters=1, adapter_steps=1, requests=3, max_tokens=4, repeats=2)
    document = serving.merge_run(settings, tmp_path / "work", tmp_path / "results")

    written = json.loads((tmp_path / "results" / "serving_merge.json").read_text())
    assert set(written["ms_per_token"]) == {"unmerged", "merged"}
    assert len(written["latency_saving_per_repeat"]) == 2
    # The merged server serves the adapter and not the base; the unmerged one serves both.
    base = next(iter((tmp_path / "work").glob("model-*"))).name
    assert written["models"] == {"merged": ["lora-0"], "unmerged": [base, "lora-0"]}
    assert {(r["side"], r["requests"]) for r in document["runs"]} == {("merged", 3), ("unmerged", 3)}
    assert all(r["ms_per_token"] > 0 for r in document["runs"])
    assert "Per-token latency saving" in (tmp_path / "results" / "serving_merge.md").read_text()
