"""``kubetune compare`` on sample FineTuneJobs (no cluster).

Aspects:
- the table carries the seeds' columns from status.result.metrics: trainable params and %, peak
  memory, checkpoint size, tokens/s, wall time, eval loss, quality, retention delta; a dash where
  nothing was measured (no planner cost, no retention set);
- quality is the share of the reference's eval-loss reduction: the full run when there is one,
  the best run otherwise; runs evaluated on different data are not ranked;
- the planner's cost estimate is shown when status.plan has one;
- an unfinished or failed job is a row that says its phase (and the failure reason), and the
  command exits 2;
- JSON and markdown carry the same rows; the manifest's loss curve reaches JSON and the plot;
- a manifest counts only when its sha256 is the one status names;
- latency per token comes from the AdapterDeployments that serve a run's artifact (named by
  FineTuneJob, or matched by manifest sha256 or URI), as a ratio to the bare base, unmerged and
  merged; a run no AdapterDeployment serves says "not served", one served but not yet measured
  says so.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from kubetune import compare


def job(
    name: str,
    method: str,
    eval_loss: float | None = None,
    phase: str = "Succeeded",
    dataset: str = "pvc://data/train.jsonl",
    **metrics: float,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if phase == "Succeeded":
        status["result"] = {
            "uri": f"pvc://data/out/{name}",
            "sizeBytes": 2_000_000,
            "metrics": {
                "total_parameters": 3_000_000,
                "trainable_parameters": 270_000,
                "trainable_percent": 9.0,
                "peak_memory_bytes": 800 * 2**20,
                "tokens_per_second": 5400.0,
                "wall_seconds": 75.0,
                "eval_loss_before": 3.0,
                "eval_loss": eval_loss,
                "artifact_size_bytes": 1_100_000,
                **metrics,
            },
        }
    elif phase == "Running":
        status["progress"] = {"summary": "40/100 (40%)"}
    elif phase == "Failed":
        status["conditions"] = [
            {"type": "Failed", "status": "True", "reason": "DatasetInvalid", "message": "no records"}
        ]
    return {
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {
            "method": {"type": method, **({"lora": {"rank": 8}} if method == "lora" else {})},
            "dataset": {"uri": dataset, "evalFraction": 0.1},
        },
        "status": status,
    }


def test_the_table_has_the_seed_columns_and_dashes_where_unmeasured() -> None:
    comparison = compare.build_comparison(
        "ns", "kubetune.dev/compare=x", [job("b-ia3", "ia3", 1.5), job("a-lora", "lora", 1.0)]
    )
    text = compare.render_table(comparison)
    header, first, second, *notes = text.splitlines()
    for column in compare.COLUMNS:
        assert column in header
    assert first.split()[:4] == ["a-lora", "lora", "(r=8)", "270"]
    assert "9.00%" in first and "800 MiB" in first and "1.05 MiB" in first and "5.4 k" in first
    assert "1m15s" in first and "1.0000" in first and "100% (ref)" in first
    cells = compare.table_rows(comparison)[0]
    assert cells[compare.COLUMNS.index("retention Δ")] == compare.DASH  # no retention set
    assert cells[-1] == "not served" and first.rstrip().endswith("not served")
    # ia3 reached half of lora's reduction (3.0 -> 1.5 against 3.0 -> 1.0).
    assert second.startswith("b-ia3") and " 75% " in second
    assert any("reference: the best run" in note for note in notes)


def test_the_full_run_is_the_reference_when_there_is_one() -> None:
    runs = [job("full", "full", 1.2), job("lora", "lora", 1.0, retention_delta=0.25)]
    comparison = compare.build_comparison("ns", "s", runs)
    assert comparison.reference == "full"
    quality = {run.name: run.quality_percent for run in comparison.runs}
    assert quality["full"] == pytest.approx(100.0) and quality["lora"] == pytest.approx(2.0 / 1.8 * 100)
    text = compare.render_table(comparison)
    assert "+0.2500" in text and "positive = forgetting" in text and "the full fine-tune" in text


def test_runs_on_different_eval_data_are_not_ranked() -> None:
    runs = [job("a", "lora", 1.0), job("b", "ia3", 1.5, dataset="pvc://data/other.jsonl")]
    comparison = compare.build_comparison("ns", "s", runs)
    assert comparison.reference is None and all(r.quality_percent is None for r in comparison.runs)
    assert "different datasets" in compare.render_table(comparison)


def test_the_planner_cost_is_shown_when_status_plan_has_one() -> None:
    priced = job("a", "lora", 1.0)
    priced["status"]["plan"] = {"trainableParameters": 270000, "estimatedCost": "$0.42"}
    comparison = compare.build_comparison("ns", "s", [priced, job("b", "ia3", 1.5)])
    assert [run.estimated_cost for run in comparison.runs] == ["$0.42", None]


def test_unfinished_and_failed_jobs_say_their_phase() -> None:
    runs = [job("a", "lora", 1.0), job("b", "ia3", phase="Running"), job("c", "full", phase="Failed")]
    comparison = compare.build_comparison("ns", "s", runs)
    rows = {row[0]: row for row in compare.table_rows(comparison)}
    assert rows["b"][2] == "Running 40/100 (40%)" and set(rows["b"][3:]) == {compare.DASH}
    assert rows["c"][2] == "Failed"
    assert "c: DatasetInvalid: no records" in compare.render_table(comparison)
    assert [r.name for r in comparison.unfinished] == ["b", "c"]


def test_json_and_markdown_carry_the_same_runs_and_the_curve(tmp_path: Path) -> None:
    curve = [
        {"step": 0, "eval_loss": 3.0},
        {"step": 10, "loss": 2.0},
        {"step": 20, "loss": 1.1, "eval_loss": 1.0},
    ]
    comparison = compare.build_comparison(
        "ns", "s", [job("a", "lora", 1.0), job("b", "ia3", 1.5)], {"a": {"loss_curve": curve}, "b": None}
    )
    document = json.loads(compare.render_json(comparison))
    assert [r["name"] for r in document["runs"]] == ["a", "b"] and document["reference"] == "a"
    assert document["runs"][0]["loss_curve"] == curve and document["runs"][0]["succeeded"]
    markdown = compare.render_markdown(comparison).splitlines()
    assert markdown[2].startswith("| job | method |") and markdown[4].startswith("| a | lora (r=8) |")

    pytest.importorskip("matplotlib")
    compare.plot(comparison, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_manifest_counts_only_when_status_names_it(tmp_path: Path) -> None:
    manifest = {"metrics": {"peak_memory_kind": "process_peak_rss"}, "loss_curve": [{"step": 1, "loss": 2.0}]}
    (tmp_path / "kubetune.json").write_text(json.dumps(manifest))
    obj = job("a", "lora", 1.0)
    obj["status"]["result"]["uri"] = f"file://{tmp_path}"
    obj["status"]["result"]["sha256"] = hashlib.sha256((tmp_path / "kubetune.json").read_bytes()).hexdigest()
    assert compare.read_manifest(obj, core=None) == (manifest, None)
    obj["status"]["result"]["sha256"] = "0" * 64
    found, note = compare.read_manifest(obj, core=None)
    assert found is None and note and "not the one status.result.sha256 names" in note
    obj["status"]["result"]["uri"] = f"file://{tmp_path}/missing"
    found, note = compare.read_manifest(obj, core=None)
    assert found is None and note and "not reachable" in note


def adapterdeployment(
    name: str, adapters: list[dict[str, Any]], merged: bool = False, base_ms: float | None = 10.0
) -> dict[str, Any]:
    """An AdapterDeployment as the API returns it; ``adapters``: spec entries plus status fields."""
    status_keys = ("sha256", "source", compare.ADAPTER_MS_PER_TOKEN, compare.UNMERGED_MS_PER_TOKEN, "state")
    status: dict[str, Any] = {
        "adapters": [{"name": a["name"], **{k: a[k] for k in status_keys if k in a}} for a in adapters]
    }
    if base_ms is not None:
        status[compare.BASE_MS_PER_TOKEN] = base_ms
    return {
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {
            "model": {"uri": "pvc://data/base"},
            "adapters": [{k: a[k] for k in ("name", "fineTuneJob", "uri") if k in a} for a in adapters],
            "mergeAdapter": merged,
        },
        "status": status,
    }


def test_latency_per_token_against_the_bare_base_unmerged_and_merged() -> None:
    lora, ia3 = job("a-lora", "lora", 1.0), job("b-ia3", "ia3", 1.5)
    lora["status"]["result"]["sha256"] = "ab" * 32
    served = [
        # Named by its FineTuneJob.
        adapterdeployment("multi", [{"name": "l", "fineTuneJob": "a-lora", "msPerToken": 12.5}]),
        # The same artifact by URI with its manifest hash, served merged by another deployment.
        adapterdeployment(
            "fast",
            [{"name": "m", "uri": "s3://x/y", "sha256": "ab" * 32, "msPerToken": 10.2}],
            merged=True,
            base_ms=10.0,
        ),
        # An unrelated adapter: matches neither name, hash nor URI.
        adapterdeployment("other", [{"name": "z", "uri": "s3://x/z", "sha256": "cd" * 32}]),
    ]
    comparison = compare.build_comparison("ns", "s", [lora, ia3], adapter_deployments=served)
    runs = {run.name: run for run in comparison.runs}
    assert [(s.adapter_deployment, s.merged) for s in runs["a-lora"].serving] == [
        ("fast", True),
        ("multi", False),
    ]
    assert runs["a-lora"].serving[1].ratio == pytest.approx(1.25)
    rows = {row[0]: row[-1] for row in compare.table_rows(comparison)}
    assert rows["a-lora"] == "12.5 ms (1.25x base 10 ms); merged 10.2 ms (1.02x base 10 ms)"
    assert rows["b-ia3"] == "not served"
    assert "measured by the serving runtime (AdapterDeployment fast, multi)" in compare.render_table(
        comparison
    )
    document = json.loads(compare.render_json(comparison))
    assert document["runs"][0]["serving"][1]["ms_per_token"] == 12.5


def test_a_served_run_without_a_measurement_says_so() -> None:
    lora = job("a-lora", "lora", 1.0)
    pending = adapterdeployment(
        "multi", [{"name": "l", "uri": "pvc://data/out/a-lora/"}], base_ms=None
    )  # matched by URI (trailing slash aside): no hash recorded on either side
    comparison = compare.build_comparison("ns", "s", [lora], adapter_deployments=[pending])
    assert compare.table_rows(comparison)[0][-1] == "served, not measured yet"
    # Without the base's figure the adapter's own latency still shows, with no ratio.
    pending["status"]["adapters"][0][compare.ADAPTER_MS_PER_TOKEN] = 7.0
    comparison = compare.build_comparison("ns", "s", [lora], adapter_deployments=[pending])
    assert compare.table_rows(comparison)[0][-1] == "7 ms"


def test_an_unfinished_run_is_never_matched_to_a_server() -> None:
    running = job("a-lora", "lora", phase="Running")
    served = adapterdeployment("multi", [{"name": "l", "fineTuneJob": "a-lora", "msPerToken": 5.0}])
    comparison = compare.build_comparison("ns", "s", [running], adapter_deployments=[served])
    assert comparison.runs[0].serving == [] and compare.table_rows(comparison)[0][-1] == compare.DASH


def test_a_merged_adapter_shows_its_pre_merge_probe_as_unmerged() -> None:
    lora = job("a-lora", "lora", 1.0)
    merged = adapterdeployment(
        "merged",
        [{"name": "l", "fineTuneJob": "a-lora", "msPerToken": 10.5, "unmergedMsPerToken": 13.0}],
        merged=True,
        base_ms=10.0,
    )
    comparison = compare.build_comparison("ns", "s", [lora], adapter_deployments=[merged])
    assert [(s.merged, s.ms_per_token) for s in comparison.runs[0].serving] == [(True, 10.5), (False, 13.0)]
    assert compare.table_rows(comparison)[0][-1] == (
        "13 ms (1.30x base 10 ms); merged 10.5 ms (1.05x base 10 ms)"
    )
