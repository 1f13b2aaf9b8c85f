"""The real-size method comparison (``benchmarks.method_comparison --config``), without training.

Aspects:
- ``--config`` takes a shipped config by name or a path, keeps its width and vocabulary, cuts the
  decoder layers (and per-layer lists), and refuses an unknown name with the known ones;
- the real-size markdown leaves out every loss column (random weights rank nothing) and the
  learning-rate grid, and keeps memory, sizes and trainable shares;
- docs/choosing-a-method.md's real-size table quotes ``method_comparison_realsize.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import method_comparison

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "method_comparison_realsize.json"


def test_a_real_config_keeps_its_width_and_loses_layers(tmp_path: Path) -> None:
    settings = method_comparison.Settings(config="qwen2.5-0.5b", layers=2)
    config = method_comparison.real_config(settings)
    assert config["num_hidden_layers"] == 2 and config["max_window_layers"] <= 2
    assert config["hidden_size"] == 896 and config["vocab_size"] == 151936
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"num_hidden_layers": 8, "layer_types": ["a"] * 8, "hidden_size": 4}))
    cut = method_comparison.real_config(method_comparison.Settings(config=str(path), layers=3))
    assert cut["layer_types"] == ["a"] * 3
    with pytest.raises(SystemExit, match=r"not one of: .*qwen2\.5-0\.5b"):
        method_comparison.real_config(method_comparison.Settings(config="qwen9"))


def test_the_real_size_markdown_has_no_losses() -> None:
    document = json.loads(RESULTS.read_text())
    markdown = method_comparison.render_markdown(document)
    headers = [line for line in markdown.splitlines() if line.startswith("| method |")]
    assert len(headers) == 3  # per method, against full, memory by group
    for column in method_comparison.RANDOM_WEIGHT_COLUMNS:
        assert not any(f"| {column} |" in header for header in headers), column
    assert "Learning-rate grid" not in markdown
    assert "| trainable params | trainable % | training memory MiB |" in markdown
    assert "2 decoder layers" in markdown and "load average" in markdown


def _section_rows() -> dict[str, list[str]]:
    text = (ROOT / "docs" / "choosing-a-method.md").read_text(encoding="utf-8")
    section = text[text.index("## At a real model's width") : text.index("## A starting point")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0].split()[0] in method_comparison.METHODS:
            rows[cells[0].split()[0]] = cells[1:]
    return rows


def test_the_docs_quote_the_real_size_results() -> None:
    methods = {m["method"]: m for m in json.loads(RESULTS.read_text())["methods"]}
    rows = _section_rows()
    assert set(rows) == set(methods)
    for name, (percent, checkpoint, memory, versus) in rows.items():
        m = methods[name]
        assert float(percent) == pytest.approx(m["trainable_percent"], rel=0.02), name
        assert float(checkpoint) == pytest.approx(m["checkpoint_bytes"] / 2**20, rel=0.02), name
        assert float(memory) == pytest.approx(m["training_memory_bytes"] / 2**20, rel=0.01), name
        assert float(versus) == pytest.approx(m["vs_full"]["training_memory"], rel=0.01), name
