"""Serving throughput of ``kubetune serve`` against a naive server (transformers ``generate`` per request).

Both servers are separate processes with the same thread budget, the same HTTP stack (FastAPI on
uvicorn), the same base model (the ``small`` Llama of ``kubetune.worker.testing``) and the same eight
LoRA adapters (r 16 on every attention and MLP projection, a few training steps each, different
seeds). The naive server (:func:`baseline_app`, which imports nothing from kubetune) is what the first
kubetune runtime did and what a plain script does: one request at a time under a lock,
``set_adapter`` then ``generate``.

Load: ``requests`` completions of exactly ``max_tokens`` tokens each (greedy, ``ignore_eos``; the
naive server suppresses EOS with ``min_new_tokens``; cipher prompts of varying length), sent by one
client one after the other (*sequential*) or by ``clients`` concurrent clients (one asyncio loop),
all to one adapter (*1 adapter*) or spread round-robin over eight (*8 adapters mixed*).
Measured per mode: requests/s, completion tokens/s, latency p50/p99; repeats are interleaved between
the servers, and the table gives medians. A second phase starts ``kubetune serve`` with no adapter and
measures the adapter load latency over the admin API (p50/p99 of ``load_repeats`` loads) and the
server's resident memory (VmRSS) bare and with the eight adapters loaded.

Run (about 5 minutes on 2 shared CPU cores)::

    .venv/bin/python -m benchmarks.serving       # writes benchmarks/results/serving.{json,md}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, get_args

from benchmarks.common import (
    DEFAULT_WORK_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    ModelSize,
    environment,
    markdown_table,
    median,
    prepare_model,
    ratio,
    thread_env,
    write_results,
)

logger = logging.getLogger("benchmarks.serving")

KUBETUNE, BASELINE = "kubetune", "naive generate"
READY = {KUBETUNE: "/ready", BASELINE: "/health"}
MODES = ("sequential, 1 adapter", "concurrent, 1 adapter", "concurrent, 8 adapters mixed")


@dataclass(frozen=True)
class Settings:
    """Requests and tokens are counts; ``threads`` is torch threads per server process."""

    size: ModelSize = "small"
    adapters: int = 8
    adapter_steps: int = 10
    requests: int = 64
    max_tokens: int = 16
    clients: int = 8
    repeats: int = 3
    load_repeats: int = 16
    max_batch_size: int = 16
    threads: int = 1
    seed: int = 0


# -- the naive baseline ------------------------------------------------------------------------


def baseline_app(model_dir: str, adapters: dict[str, str]) -> Any:
    """transformers + peft, one ``generate`` per request under a lock: the naive way to serve."""
    import torch
    from fastapi import FastAPI
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    names = list(adapters)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0]).eval()
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    def complete(body: dict[str, Any]) -> dict[str, Any]:
        encoded = tokenizer(body["prompt"], return_tensors="pt")
        with lock, torch.inference_mode():
            model.set_adapter(body["model"])
            max_tokens = body.get("max_tokens", 16)
            out = model.generate(
                **encoded,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens if body.get("ignore_eos") else 0,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0][encoded["input_ids"].shape[1] :]
        return {
            "choices": [{"text": tokenizer.decode(new, skip_special_tokens=True)}],
            "usage": {"completion_tokens": len(new)},
        }

    return app


# -- setup -----------------------------------------------------------------------------------


def prepare_adapters(model_dir: Path, work_dir: Path, settings: Settings) -> dict[str, Path]:
    """``settings.adapters`` LoRA artifacts on ``model_dir``, trained a few steps each, reused."""
    from kubetune.worker.engine import train
    from kubetune.worker.plan import TrainingPlan
    from kubetune.worker.testing import task_records, write_records

    out: dict[str, Path] = {}
    for index in range(settings.adapters):
        name = f"lora-{index}"
        output = work_dir / f"{model_dir.name}-{name}-steps{settings.adapter_steps}"
        out[name] = output
        if (output / "kubetune.json").is_file():
            continue
        shutil.rmtree(output, ignore_errors=True)
        data = write_records(work_dir / f"{name}.jsonl", task_records(64, seed=index, shift=1 + index))
        plan = {
            "name": name,
            "model": {"uri": str(model_dir)},
            "dataset": {"uri": str(data), "eval_fraction": 0.0},
            "method": {"type": "lora", "lora": {"rank": 16, "alpha": 32}},
            "training": {
                "max_steps": settings.adapter_steps,
                "learning_rate": 1e-3,
                "batch_size": 8,
                "max_seq_length": 64,
                "gradient_checkpointing": False,
                "checkpoint_every_steps": 0,
                "seed": index,
            },
            "output": {"uri": str(output), "work_dir": str(work_dir / f".{output.name}.work")},
            "progress": {"port": 0, "termination_message_path": str(work_dir / f"{name}.termination")},
        }
        train(TrainingPlan.model_validate(plan))
    return out


def prompts(count: int, seed: int) -> list[str]:
    from kubetune.worker.testing import task_records

    return [r["prompt"] for r in task_records(count, seed=seed)]


@contextlib.contextmanager
def server(command: list[str], threads: int, log: Path, ready: str) -> Iterator[tuple[str, int]]:
    """A server subprocess on a free port; yields (url, pid) once ``ready`` (a path) answers 200."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [*command, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(command, env=thread_env(threads), cwd=REPO_ROOT, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[:4]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + ready, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[:4]} not ready after 600 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- measuring -------------------------------------------------------------------------------


def drive(url: str, jobs: list[tuple[str, str]], clients: int, max_tokens: int) -> dict[str, Any]:
    """Send every (model, prompt) job with ``clients`` concurrent clients (one asyncio loop, so the
    clients cost little CPU); wall time and latencies. Every request generates ``max_tokens``
    tokens (``ignore_eos``), so both servers do the same work."""
    import asyncio

    import httpx

    latencies: list[float] = []
    tokens: list[int] = []

    async def client(queue: list[tuple[str, str]], session: httpx.AsyncClient) -> None:
        while queue:
            model, prompt = queue.pop()
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            body["ignore_eos"] = True
            started = time.monotonic()
            response = await session.post(f"{url}/v1/completions", json=body)
            latencies.append(time.monotonic() - started)
            response.raise_for_status()
            tokens.append(int(response.json()["usage"]["completion_tokens"]))

    async def main() -> float:
        queue = list(reversed(jobs))
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(timeout=300, limits=limits) as session:
            started = time.monotonic()
            await asyncio.gather(*(client(queue, session) for _ in range(clients)))
            return time.monotonic() - started

    wall = asyncio.run(main())
    return {
        "requests": len(jobs),
        "clients": clients,
        "seconds": wall,
        "requests_per_second": len(jobs) / wall,
        "completion_tokens": sum(tokens),
        "tokens_per_second": sum(tokens) / wall,
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p99_s": percentile(latencies, 0.99),
    }


def jobs_for(mode: str, adapters: list[str], texts: list[str]) -> tuple[list[tuple[str, str]], int]:
    mixed = mode.endswith("mixed")
    jobs = [(adapters[i % len(adapters)] if mixed else adapters[0], text) for i, text in enumerate(texts)]
    return jobs, 1 if mode.startswith("sequential") else 0


def adapter_phase(
    model_dir: Path, adapters: dict[str, Path], settings: Settings, work_dir: Path
) -> dict[str, Any]:
    """Load latency over the admin API and resident memory, bare and with every adapter loaded."""
    import httpx

    command = [sys.executable, "-m", "kubetune", "serve", "--model", str(model_dir)]
    command += ["--device", "cpu", "--log-level", "warning"]
    with server(command, settings.threads, work_dir / "kubetune-memory.log", "/ready") as (url, pid):
        httpx.post(f"{url}/v1/completions", json={"model": model_dir.name, "prompt": "a", "max_tokens": 2})
        bare = rss_bytes(pid)
        loads: list[float] = []
        for name, path in adapters.items():
            started = time.monotonic()
            httpx.post(
                f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=120
            ).raise_for_status()
            loads.append(time.monotonic() - started)
        for name in adapters:
            httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "a", "max_tokens": 2})
        loaded = rss_bytes(pid)
        name, path = next(iter(adapters.items()))
        while len(loads) < settings.load_repeats:
            httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}).raise_for_status()
            started = time.monotonic()
            httpx.post(
                f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=120
            ).raise_for_status()
            loads.append(time.monotonic() - started)
    return {
        "adapter_loads": len(loads),
        "load_latency_p50_s": percentile(loads, 0.5),
        "load_latency_p99_s": percentile(loads, 0.99),
        "load_latencies_s": loads,
        "rss_bare_bytes": bare,
        "rss_with_adapters_bytes": loaded,
        "adapters_loaded": len(adapters),
        "rss_ratio": loaded / bare,
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for side in (BASELINE, KUBETUNE):
        for mode in MODES:
            mine = [r for r in runs if r["side"] == side and r["mode"] == mode]
            if not mine:
                continue
            rows.append(
                {
                    "side": side,
                    "mode": mode,
                    "clients": mine[0]["clients"],
                    "runs": len(mine),
                    "requests_per_second": median([r["requests_per_second"] for r in mine]),
                    "tokens_per_second": median([r["tokens_per_second"] for r in mine]),
                    "latency_p50_s": median([r["latency_p50_s"] for r in mine]),
                    "latency_p99_s": median([r["latency_p99_s"] for r in mine]),
                    "per_repeat_rps": [round(r["requests_per_second"], 1) for r in mine],
                }
            )
    by = {(r["side"], r["mode"]): r for r in rows}
    for row in rows:
        sequential = by.get((row["side"], MODES[0]))
        baseline = by.get((BASELINE, row["mode"]))
        rps = row["requests_per_second"]
        row["vs_sequential"] = ratio(rps, sequential["requests_per_second"]) if sequential else None
        row["vs_baseline"] = ratio(rps, baseline["requests_per_second"]) if baseline else None
    return rows


def per_repeat_ratios(runs: list[dict[str, Any]], side: str, mode: str, over: str, key: str) -> list[float]:
    """``mode`` / ``over`` within each repeat of ``side``: the two ran minutes apart at most, so these
    ratios are less exposed to a shared machine's swings than the ratio of medians."""
    found = {(r["mode"], r["repeat"]): r[key] for r in runs if r["side"] == side}
    repeats = sorted({r["repeat"] for r in runs})
    return [
        round(found[(mode, k)] / found[(over, k)], 2)
        for k in repeats
        if (mode, k) in found and (over, k) in found and found[(over, k)]
    ]


def render_markdown(document: dict[str, Any]) -> str:
    s, env, rows = document["settings"], document["environment"], document["summary"]
    by = {(r["side"], r["mode"]): r for r in rows}
    runs = document["runs"]

    def repeats(side: str, mode: str, over: str, key: str) -> str:
        return ", ".join(str(v) for v in per_repeat_ratios(runs, side, mode, over, key))

    concurrency = (MODES[1], MODES[0], "requests_per_second")
    mixing = (MODES[2], MODES[1], "tokens_per_second")
    headline = [
        (
            "8 concurrent clients vs sequential (1 adapter), requests/s",
            by[(KUBETUNE, MODES[1])]["vs_sequential"],
            repeats(KUBETUNE, *concurrency),
            by[(BASELINE, MODES[1])]["vs_sequential"],
            repeats(BASELINE, *concurrency),
            ">= 4",
        ),
        (
            "8 adapters mixed vs 1 adapter (8 concurrent clients), tokens/s",
            ratio(
                by[(KUBETUNE, MODES[2])]["tokens_per_second"], by[(KUBETUNE, MODES[1])]["tokens_per_second"]
            ),
            repeats(KUBETUNE, *mixing),
            ratio(
                by[(BASELINE, MODES[2])]["tokens_per_second"], by[(BASELINE, MODES[1])]["tokens_per_second"]
            ),
            repeats(BASELINE, *mixing),
            ">= 0.8",
        ),
    ]
    memory = document["adapter_phase"]
    text = [
        "# Serving throughput: `kubetune serve` vs naive `generate` per request\n",
        f"Model `{s['size']}`, {s['adapters']} LoRA adapters (r 16), {s['requests']} requests of "
        f"{s['max_tokens']} tokens each (greedy, EOS ignored), {s['clients']} concurrent clients, "
        f"{s['repeats']} interleaved repeats (medians), {s['threads']} torch thread per server, "
        f"batch size {s['max_batch_size']}. "
        f"Commit `{env['git_commit']}`, {env['cpus_available']} CPUs available"
        f"{', GPU ' + env['cuda'] if env['cuda'] else ', no GPU'}, measured {env['measured_at']}.\n",
        "## Ratios\n",
        "Ratios of medians, and the same ratio within each repeat (the two runs of a repeat are "
        "minutes apart at most).\n",
        markdown_table(
            [
                "ratio",
                KUBETUNE,
                f"{KUBETUNE} per repeat",
                BASELINE,
                f"{BASELINE} per repeat",
                "target (kubetune)",
            ],
            headline,
        ),
        "## Throughput\n",
        markdown_table(
            [
                "server",
                "mode",
                "clients",
                "requests/s",
                "tokens/s",
                "latency p50 s",
                "latency p99 s",
                "vs sequential",
                "vs naive",
                "per repeat requests/s",
            ],
            [
                [
                    r["side"],
                    r["mode"],
                    r["clients"],
                    r["requests_per_second"],
                    r["tokens_per_second"],
                    r["latency_p50_s"],
                    r["latency_p99_s"],
                    r["vs_sequential"],
                    r["vs_baseline"],
                    ", ".join(str(v) for v in r["per_repeat_rps"]),
                ]
                for r in rows
            ],
        ),
        "## Adapters: load latency and memory (`kubetune serve`)\n",
        markdown_table(
            [
                "loads",
                "load p50 s",
                "load p99 s",
                "RSS bare MiB",
                "RSS with adapters MiB",
                "adapters",
                "ratio",
            ],
            [
                [
                    memory["adapter_loads"],
                    memory["load_latency_p50_s"],
                    memory["load_latency_p99_s"],
                    memory["rss_bare_bytes"] / (1 << 20),
                    memory["rss_with_adapters_bytes"] / (1 << 20),
                    memory["adapters_loaded"],
                    memory["rss_ratio"],
                ]
            ],
        ),
    ]
    return "\n".join(text)


def merge_run(
    settings: Settings, work_dir: Path, results_dir: Path, name: str = "serving_merge"
) -> dict[str, Any]:
    """mergeAdapter: per-token latency of one LoRA adapter merged into the base vs the same adapter
    unmerged, as ``kubetune serve`` runs them (``ModelServer`` with and without ``merge``; the
    unmerged one generates through PEFT's LoRA layers, the merged one through plain layers).

    In process, one request at a time (batch 1, greedy, ``max_tokens`` tokens, EOS ignored), the two
    sides alternating request by request, so that a busy machine slows both alike; per repeat, the
    median seconds per generated token of each side.
    """
    import torch

    from kubetune.worker.serving import ModelServer

    torch.set_num_threads(settings.threads)
    work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(work_dir, size=settings.size, pretrain_steps=0, seed=settings.seed)
    adapter, path = next(iter(prepare_adapters(model_dir, work_dir, replace(settings, adapters=1)).items()))
    servers = {"unmerged": ModelServer(model_dir), "merged": ModelServer(model_dir, merge=True)}
    models = {}
    for side, srv in servers.items():
        srv.load_adapter(adapter, str(path))
        models[side] = srv.model_names()
    generators = {
        "unmerged": servers["unmerged"]._lora_host,  # what a one-adapter batch runs
        "merged": servers["merged"].adapters[adapter].instance,
    }
    servers["unmerged"]._lora_host.set_adapter(adapter)
    tokenizer = servers["merged"].tokenizer
    texts = prompts(settings.requests, settings.seed)

    def seconds_per_token(side: str, text: str) -> float:
        encoded = tokenizer(text, return_tensors="pt")
        started = time.perf_counter()
        with torch.inference_mode():
            out = generators[side].generate(
                **encoded,
                max_new_tokens=settings.max_tokens,
                min_new_tokens=settings.max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        elapsed = time.perf_counter() - started
        return elapsed / (out.shape[1] - encoded["input_ids"].shape[1])

    for side in generators:  # warm-up
        seconds_per_token(side, texts[0])
    runs: list[dict[str, Any]] = []
    for repeat in range(settings.repeats):
        samples: dict[str, list[float]] = {side: [] for side in generators}
        for index, text in enumerate(texts):
            for side in list(generators) if (index + repeat) % 2 == 0 else reversed(list(generators)):
                samples[side].append(seconds_per_token(side, text))
        for side, values in samples.items():
            runs.append(
                {
                    "side": side,
                    "repeat": repeat,
                    "ms_per_token": median(values) * 1000,
                    "requests": len(values),
                }
            )
            logger.info("repeat %d %s: %.2f ms/token", repeat, side, median(values) * 1000)
    ms = {side: median([r["ms_per_token"] for r in runs if r["side"] == side]) for side in generators}
    per_repeat = [
        round(1 - m["ms_per_token"] / u["ms_per_token"], 3)
        for u, m in zip(
            [r for r in runs if r["side"] == "unmerged"],
            [r for r in runs if r["side"] == "merged"],
            strict=True,
        )
    ]
    env = environment(settings.threads)
    load = os.getloadavg()
    document = {
        "benchmark": "serving_merge",
        "settings": asdict(settings),
        "environment": env,
        "load_average": load,
        "models": models,
        "ms_per_token": ms,
        "latency_saving": round(1 - ms["merged"] / ms["unmerged"], 3),
        "latency_saving_per_repeat": per_repeat,
        "runs": runs,
    }
    s = asdict(settings)
    lines = [
        "# mergeAdapter: one LoRA adapter merged into the base vs unmerged (`ModelServer`)\n",
        f"Model `{s['size']}`, one LoRA adapter (r 16), {s['requests']} requests of {s['max_tokens']} tokens "
        f"(batch 1, greedy, EOS ignored) per side and repeat, the sides alternating request by request, "
        f"{s['repeats']} repeats (median of the per-repeat medians), {s['threads']} torch thread. Commit "
        f"`{env['git_commit']}`, {env['cpus_available']} CPUs available, load average "
        f"{load[0]:.1f} at the end.\n",
        markdown_table(
            ["served", "ms per token (median)"], [[side, round(ms[side], 3)] for side in generators]
        ),
        f"\nPer-token latency saving of the merged model: **{1 - ms['merged'] / ms['unmerged']:.1%}** "
        f"(per repeat: {', '.join(f'{v:.1%}' for v in per_repeat)}).\n",
    ]
    write_results(name, document, "\n".join(lines), results_dir)
    return document


# -- memory per method ------------------------------------------------------------------------

#: The memory phase's base: the ``small`` Llama widened to ~90 M parameters (~350 MB in float32), so
#: that its weights, not the Python and torch runtime (~0.5 GB of RSS), are what a copy would cost.
MEMORY_MODEL = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
}
#: One adapter per method, each method's defaults (what a FineTuneJob gets without settings).
MEMORY_METHODS: dict[str, dict[str, Any]] = {
    "lora": {"type": "lora"},
    "ia3": {"type": "ia3"},
    "prefix": {"type": "prefix"},
    "bottleneck": {"type": "adapter"},
}


def memory_model(work_dir: Path, seed: int) -> Path:
    from kubetune.worker.testing import make_tiny_model

    directory = work_dir / f"model-memory-seed{seed}"
    if not (directory / ".complete").is_file():
        shutil.rmtree(directory, ignore_errors=True)
        make_tiny_model(directory, size="small", seed=seed, config_overrides=MEMORY_MODEL)
        (directory / ".complete").write_text("")
    return directory


def memory_adapter(model_dir: Path, work_dir: Path, method: str, count: int) -> list[Path]:
    """``count`` copies of one trained ``method`` artifact (2 steps: the values do not matter for memory,
    and each copy is loaded as its own adapter with its own tensors)."""
    from kubetune.worker.engine import train
    from kubetune.worker.plan import TrainingPlan
    from kubetune.worker.testing import task_records, write_records

    trained = work_dir / f"{model_dir.name}-{method}"
    if not (trained / "kubetune.json").is_file():
        shutil.rmtree(trained, ignore_errors=True)
        data = write_records(work_dir / "memory.jsonl", task_records(32, seed=0))
        plan = {
            "name": f"memory-{method}",
            "model": {"uri": str(model_dir)},
            "dataset": {"uri": str(data), "eval_fraction": 0.0},
            "method": MEMORY_METHODS[method],
            "training": {
                "max_steps": 2,
                "batch_size": 4,
                "max_seq_length": 32,
                "gradient_checkpointing": False,
                "checkpoint_every_steps": 0,
            },
            "output": {"uri": str(trained), "work_dir": str(work_dir / f".{trained.name}.work")},
            "progress": {"port": 0, "termination_message_path": str(work_dir / f"{method}.termination")},
        }
        train(TrainingPlan.model_validate(plan))
    copies = []
    for index in range(count):
        copy = work_dir / "memory-copies" / f"{method}-{index}"
        if not (copy / "kubetune.json").is_file():
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(trained, copy)
        copies.append(copy)
    return copies


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def memory_run(
    settings: Settings,
    work_dir: Path,
    results_dir: Path,
    counts: Sequence[int] = (1, 4, 8),
    name: str = "serving_memory",
) -> dict[str, Any]:
    """Replica memory (VmRSS of ``kubetune serve``) with N adapters of each method vs the bare base, and
    for LoRA vs N merged copies (mergeAdapter serves one adapter per replica: N adapters merged are N
    replicas, each measured as one ``--merge-adapter`` server).

    Per method one server: bare (after one base request), then adapters loaded over the admin API up
    to each N, and after each N one request per adapter, all at once (LoRA adapters then run as one
    mixed batch, building the stacked weights), before reading RSS.
    """
    import httpx

    work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = memory_model(work_dir, settings.seed)
    base_bytes = _directory_bytes(model_dir)
    serve = [sys.executable, "-m", "kubetune", "serve", "--model", str(model_dir), "--device", "cpu"]
    serve += ["--log-level", "warning"]
    rows: list[dict[str, Any]] = []
    for method in MEMORY_METHODS:
        copies = memory_adapter(model_dir, work_dir, method, max(counts))
        log = work_dir / f"memory-{method}.log"
        with server(serve, settings.threads, log, "/ready") as (url, pid):
            drive(url, [(model_dir.name, "a")], 1, 2)
            bare = rss_bytes(pid)
            loaded = 0
            for count in counts:
                while loaded < count:
                    httpx.post(
                        f"{url}/v1/load_lora_adapter",
                        json={"lora_name": f"{method}-{loaded}", "lora_path": str(copies[loaded])},
                        timeout=600,
                    ).raise_for_status()
                    loaded += 1
                drive(url, [(f"{method}-{i}", "a") for i in range(count)], count, 2)
                rss = rss_bytes(pid)
                rows.append(
                    {
                        "method": method,
                        "adapters": count,
                        "rss_bare_bytes": bare,
                        "rss_bytes": rss,
                        "ratio_to_bare": rss / bare,
                        "adapter_artifact_bytes": _directory_bytes(copies[0]),
                    }
                )
                logger.info("%s x%d: %.0f MiB (bare %.0f MiB)", method, count, rss / 2**20, bare / 2**20)
    lora = memory_adapter(model_dir, work_dir, "lora", 1)[0]
    merged_command = [*serve, "--adapter", f"lora-0={lora}", "--merge-adapter"]
    with server(merged_command, settings.threads, work_dir / "memory-merged.log", "/ready") as (url, pid):
        drive(url, [("lora-0", "a")], 1, 2)
        merged_rss = rss_bytes(pid)
    for row in rows:
        if row["method"] == "lora":
            row["merged_copies_bytes"] = row["adapters"] * merged_rss
            row["ratio_to_merged_copies"] = row["rss_bytes"] / row["merged_copies_bytes"]
    env = environment(settings.threads)
    load = os.getloadavg()
    document = {
        "benchmark": "serving_memory",
        "settings": {"threads": settings.threads, "counts": list(counts), "seed": settings.seed},
        "model": {**MEMORY_MODEL, "weights_bytes": base_bytes},
        "methods": MEMORY_METHODS,
        "environment": env,
        "load_average": load,
        "merged_replica_rss_bytes": merged_rss,
        "rows": rows,
    }
    mib = 2**20
    lines = [
        "# Replica memory with N adapters per method (`kubetune serve`)\n",
        f"Base: the `small` Llama widened to hidden {MEMORY_MODEL['hidden_size']}, "
        f"{MEMORY_MODEL['num_hidden_layers']} layers ({base_bytes / mib:.0f} MiB on disk, float32), on "
        f"CPU. One adapter per method with its default settings, trained 2 steps and loaded N times under "
        f"different names over the admin API; after each N, one 2-token request per adapter, all at once. "
        f"Memory is the server process's VmRSS; *bare* is the same server with the base only, after one "
        f"request. N merged copies: N replicas of `kubetune serve --merge-adapter` (one adapter each), "
        f"each measured at {merged_rss / mib:.0f} MiB. Commit `{env['git_commit']}`, "
        f"{env['cpus_available']} CPUs available, {env['platform']}, {settings.threads} torch thread, "
        f"load average {load[0]:.1f} at the end, measured {env['measured_at']}.\n",
        markdown_table(
            [
                "method",
                "adapters",
                "RSS bare MiB",
                "RSS MiB",
                "vs bare",
                "adapter on disk MiB",
                "N merged copies MiB",
                "vs N merged copies",
            ],
            [
                [
                    r["method"],
                    r["adapters"],
                    r["rss_bare_bytes"] / mib,
                    r["rss_bytes"] / mib,
                    r["ratio_to_bare"],
                    r["adapter_artifact_bytes"] / mib,
                    r["merged_copies_bytes"] / mib if "merged_copies_bytes" in r else "",
                    r.get("ratio_to_merged_copies", ""),
                ]
                for r in rows
            ],
        ),
        "Target: <= 1.1x the bare base for LoRA. A copy of the base per adapter (how IA3, prefix and "
        f"bottleneck adapters were served before) would add about {base_bytes / mib:.0f} MiB per adapter.\n",
    ]
    write_results(name, document, "\n".join(lines), results_dir)
    return document


def run(settings: Settings, work_dir: Path, results_dir: Path, name: str = "serving") -> dict[str, Any]:
    work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(work_dir, size=settings.size, pretrain_steps=0, seed=settings.seed)
    adapters = prepare_adapters(model_dir, work_dir, settings)
    names = list(adapters)
    texts = prompts(settings.requests, settings.seed)
    adapter_args = [arg for n, p in adapters.items() for arg in ("--adapter", f"{n}={p}")]
    kubetune_serve = [sys.executable, "-m", "kubetune", "serve", "--model", str(model_dir)]
    naive_serve = [sys.executable, "-m", "benchmarks.serving", "baseline-server", "--model", str(model_dir)]
    options = ["--device", "cpu", "--log-level", "warning", "--max-batch-size", str(settings.max_batch_size)]
    commands = {KUBETUNE: [*kubetune_serve, *adapter_args, *options], BASELINE: [*naive_serve, *adapter_args]}
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        urls = {
            side: stack.enter_context(
                server(cmd, settings.threads, work_dir / f"{side.split()[0]}.log", READY[side])
            )[0]
            for side, cmd in commands.items()
        }
        for url in urls.values():  # warm-up: every adapter once, a few concurrent requests
            drive(url, [(n, texts[0]) for n in names] * 2, settings.clients, settings.max_tokens)
        for repeat in range(settings.repeats):
            order = list(urls) if repeat % 2 == 0 else list(reversed(urls))
            for side in order:
                for mode in MODES:
                    jobs, clients = jobs_for(mode, names, texts)
                    result = drive(urls[side], jobs, clients or settings.clients, settings.max_tokens)
                    runs.append({"side": side, "mode": mode, "repeat": repeat, **result})
                    logger.info("%s / %s: %.1f requests/s", side, mode, result["requests_per_second"])
    adapter_phase_result = adapter_phase(model_dir, adapters, settings, work_dir)
    document = {
        "benchmark": "serving",
        "settings": asdict(settings),
        "environment": environment(settings.threads),
        "summary": summarise(runs),
        "adapter_phase": adapter_phase_result,
        "runs": runs,
    }
    write_results(name, document, render_markdown(document), results_dir)
    return document


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None, allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command")
    baseline = sub.add_parser("baseline-server", help="run the naive server (used by the benchmark)")
    baseline.add_argument("--model", required=True)
    baseline.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    baseline.add_argument("--host", default="127.0.0.1")
    baseline.add_argument("--port", type=int, default=8001)
    sub.add_parser(
        "merge", help="only mergeAdapter's per-token latency, merged vs unmerged (results: serving_merge.*)"
    )
    sub.add_parser(
        "memory", help="only replica memory with 1, 4 and 8 adapters per method (results: serving_memory.*)"
    )
    parser.add_argument("--size", choices=get_args(ModelSize), default=defaults.size)
    parser.add_argument("--adapters", type=int, default=defaults.adapters)
    parser.add_argument("--adapter-steps", type=int, default=defaults.adapter_steps)
    parser.add_argument("--requests", type=int, default=defaults.requests)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--load-repeats", type=int, default=defaults.load_repeats)
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads per server")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR / "serving")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="serving", help="results file name (without suffix)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request costs the clients CPU
    if args.command == "baseline-server":
        import uvicorn

        adapters = dict(item.partition("=")[::2] for item in args.adapter)
        uvicorn.run(baseline_app(args.model, adapters), host=args.host, port=args.port, log_level="warning")
        return 0
    settings = Settings(
        size=args.size,
        adapters=args.adapters,
        adapter_steps=args.adapter_steps,
        requests=args.requests,
        max_tokens=args.max_tokens,
        clients=args.clients,
        repeats=args.repeats,
        load_repeats=args.load_repeats,
        max_batch_size=args.max_batch_size,
        threads=args.threads,
    )
    if args.command == "merge":
        merged = merge_run(settings, args.work_dir, args.results_dir)
        print(
            json.dumps({k: merged[k] for k in ("ms_per_token", "latency_saving", "load_average")}, indent=2)
        )
        return 0
    if args.command == "memory":
        memory = memory_run(settings, args.work_dir, args.results_dir)
        print(json.dumps(memory["rows"], indent=2))
        return 0
    document = run(settings, args.work_dir, args.results_dir, args.name)
    print(render_markdown(document))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
