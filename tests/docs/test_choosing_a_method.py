"""docs/choosing-a-method.md quotes the measured results, not numbers typed from memory.

Aspects:
- each row of the page's "What we measured" table agrees with
  ``benchmarks/results/method_comparison.json`` (trainable %, checkpoint size, the ratios to full,
  the retention delta), to the digits the page shows; re-running the benchmark without updating the
  page fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _rows() -> dict[str, list[str]]:
    text = (ROOT / "docs" / "choosing-a-method.md").read_text(encoding="utf-8")
    section = text[text.index("## What we measured") : text.index("## Where the usual claims")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0].split()[0] in (
            "full",
            "lora",
            "qlora",
            "ia3",
            "prefix",
            "adapter",
        ):
            rows[cells[0].split()[0]] = cells[1:]
    return rows


def _close(shown: str, value: float) -> bool:
    number = float(re.sub(r"[^0-9.+-]", "", shown.split()[0]))
    digits = len(shown.split()[0].lstrip("+-").replace(".", "").lstrip("0")) or 1
    return number == pytest.approx(value, rel=0.6 * 10 ** (1 - digits))


def test_the_table_quotes_method_comparison_json() -> None:
    results = json.loads((ROOT / "benchmarks" / "results" / "method_comparison.json").read_text())
    methods = {m["method"]: m for m in results["methods"]}
    full = methods["full"]
    rows = _rows()
    assert set(rows) == set(methods)
    for name, (percent, checkpoint, memory, speed, loss, retention) in rows.items():
        m = methods[name]
        assert _close(percent, m["trainable_percent"]), (name, percent)
        assert _close(checkpoint, m["checkpoint_bytes"] / 2**20), (name, checkpoint)
        assert _close(memory, m["training_memory_bytes"] / full["training_memory_bytes"]), (name, memory)
        assert _close(speed, m["tokens_per_second"] / full["tokens_per_second"]), (name, speed)
        assert _close(loss, m["eval_loss"] / full["eval_loss"]), (name, loss)
        assert _close(retention, m["retention_delta"]), (name, retention)
