"""``benchmarks/gpu.sh`` and ``benchmarks/gpu_bench.py``: the parts that run without a GPU.

Aspects:
- ``gpu.sh --check`` names what it needs and refuses to measure without a CUDA GPU (exit 2);
- the measuring code runs end to end on a tiny config (CPU, in-process, two steps): every planned
  (method, side) run trains real tokens, LoRA trains fewer parameters than full fine-tuning, each run
  carries the planner's memory estimate, the kubetune-over-baseline ratios exist per method, and the
  JSON and markdown results are written;
- what a machine lacks (bitsandbytes, trl, Liger Kernel, a GPU for Liger) is skipped by name, not
  failed;
- unknown methods or sides are refused with the flag's name.
No timings are asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_bench

REPO = Path(__file__).resolve().parents[2]

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def test_gpu_sh_says_what_it_needs_and_refuses_without_a_gpu() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal is for machines without one")
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--steps", "1"],
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": "/tmp"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "GPU: none" in proc.stdout
    assert "not measuring" in proc.stderr
    assert not (REPO / "benchmarks" / "results" / "gpu.json").exists() or "gpu.json" in proc.stdout


@pytest.mark.torch
@pytest.mark.slow
def test_the_measurements_run_on_a_tiny_config(tmp_path: Path) -> None:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    settings = gpu_bench.Settings(
        config=str(config),
        methods=("lora", "full"),
        sides=("kubetune", "trainer"),
        steps=2,
        batch_size=2,
        max_seq_length=32,
        records=12,
        device="cpu",
        in_process=True,
    )
    document = gpu_bench.run(settings, tmp_path / "work", tmp_path / "results", name="gpu_smoke")
    runs = {(r["method"], r["name"]): r for r in document["runs"]}
    assert set(runs) == {(m, s) for m in ("lora", "full") for s in ("kubetune", "trainer")}
    for run in runs.values():
        assert run["error"] is None, run["error"]
        assert run["real_tokens"] > 0 and run["tokens_per_second"] > 0
        estimate = run["extra"]["planner_estimate"]
        assert estimate["weights"] > 0 and estimate["overhead"] == 0  # no CUDA context on CPU
        assert run["mfu"] is None  # no GPU peak to divide by
    for side in ("kubetune", "trainer"):
        assert runs["lora", side]["trainable_parameters"] < runs["full", side]["trainable_parameters"]
    # Both sides train the same LoRA (rank 16 on every projection) and the same full model.
    assert runs["lora", "kubetune"]["trainable_parameters"] == runs["lora", "trainer"]["trainable_parameters"]
    assert runs["full", "kubetune"]["trainable_parameters"] == runs["full", "trainer"]["trainable_parameters"]
    pairs = {(r["method"], r["baseline"]) for r in document["ratios"]}
    assert pairs == {("lora", "trainer"), ("full", "trainer")}
    assert all(r["ratio"] > 0 for r in document["ratios"])
    assert any("Liger" in reason for reason in document["skipped"])  # CPU: never with Liger
    written = json.loads((tmp_path / "results" / "gpu_smoke.json").read_text())
    assert written["runs"] == document["runs"]
    markdown = (tmp_path / "results" / "gpu_smoke.md").read_text()
    assert "| lora | kubetune |" in markdown and "| full | trainer |" in markdown


def test_missing_extras_are_skipped_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_bench, "available", lambda module: module not in ("bitsandbytes", "trl"))
    runs, skipped = gpu_bench.plan_runs(gpu_bench.Settings())
    assert {m for m, _, _ in runs} == {"lora", "full"} and {s for _, s, _ in runs} == {"kubetune", "trainer"}
    assert any(r.startswith("qlora: bitsandbytes") for r in skipped)
    assert any(r.startswith("trl:") for r in skipped)


def test_unknown_methods_are_refused_by_flag() -> None:
    with pytest.raises(SystemExit, match="--methods: unknown"):
        gpu_bench.main(["run", "--methods", "lora,dora"])
