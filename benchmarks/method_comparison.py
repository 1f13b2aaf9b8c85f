"""Full fine-tuning vs LoRA, QLoRA, IA3, prefix tuning and bottleneck adapters, on the tiny model.

Every method trains the same base (``kubetune.worker.testing``'s Llama, pretrained on the *counting*
distribution so that it knows something it can forget) on the same synthetic *cipher* task, through
``kubetune train`` as a worker pod would run it. Only the method and its learning rate differ: each
method gets a small learning-rate grid of its own (IA3 and prefix tuning need larger rates than full
fine-tuning) and the rate with the lowest eval loss is reported.

Per method, from the engine's ``kubetune.json`` manifest: trainable parameters and %, eval loss before
and after, retention loss before and after (the forgetting measure: positive delta = forgot), tokens/s
(real tokens; median over the grid's runs, which differ only in learning rate), process peak RSS and
artifact sizes. Measured here, in-process: training memory by tensor accounting
(:mod:`benchmarks.memory`), because CPU peak RSS is dominated by the runtime at this model size.
Ratios are against full fine-tuning in the same run.

Run (about 30 minutes on 2 shared CPU cores)::

    .venv/bin/python -m benchmarks.method_comparison   # writes benchmarks/results/method_comparison.*
    .venv/bin/python -m benchmarks.method_comparison --help

**Real size** (``--config qwen2.5-0.5b --layers 2``): the base is a real architecture's
``config.json`` (from ``tests/planner/configs/``, or a path) at its full width and vocabulary, cut to
a few decoder layers and randomly initialised, so trainable shares, checkpoint sizes and the memory
split between weights, optimizer state and activations are those of the real model per layer
(embeddings and the output layer at their real size). Random weights make losses meaningless as a
quality measure (no retention set, no learning-rate grid: one rate per method); memory and speed do
not depend on the weights. A few steps of short sequences keep it to minutes of CPU::

    .venv/bin/python -m benchmarks.method_comparison --config qwen2.5-0.5b --layers 2 \
        --steps 6 --batch-size 2 --max-seq-length 64 --name method_comparison_realsize
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

from benchmarks.common import (
    DEFAULT_WORK_DIR,
    RESULTS_DIR,
    BenchmarkError,
    ModelSize,
    environment,
    markdown_table,
    median,
    mib,
    plan_for,
    prepare_model,
    ratio,
    run_kubetune,
    weight_bytes,
    write_results,
)
from benchmarks.memory import MEMORY_GROUPS, measure_training_memory

logger = logging.getLogger("benchmarks.method_comparison")

METHODS = ("full", "lora", "qlora", "ia3", "prefix", "adapter")

#: Learning-rate grid per method. Centred on each method's usual range: parameter-efficient methods with
#: few parameters (IA3's scaling vectors, prefix tuning's virtual tokens) need larger steps.
LEARNING_RATES: dict[str, tuple[float, ...]] = {
    "full": (1e-4, 3e-4, 1e-3, 3e-3),
    "lora": (3e-4, 1e-3, 3e-3, 1e-2),
    "qlora": (3e-4, 1e-3, 3e-3, 1e-2),
    "ia3": (3e-3, 1e-2, 3e-2, 1e-1),
    "prefix": (3e-3, 1e-2, 3e-2, 1e-1),
    "adapter": (1e-3, 3e-3, 1e-2, 3e-2),
}


#: Columns left out of the real-size tables: on random weights they measure nothing.
RANDOM_WEIGHT_COLUMNS = frozenset(
    {
        "eval loss before",
        "eval loss after",
        "retention loss before",
        "retention delta",
        "eval loss",
        "quality recovered",
    }
)
#: Real architectures' config.json files shipped with the planner's tests (``--config NAME``).
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "tests" / "planner" / "configs"


@dataclass(frozen=True)
class Settings:
    """What every run shares. Steps are optimizer steps; lengths are tokens."""

    size: ModelSize = "small"
    #: A real architecture (a name in CONFIGS_DIR or a config.json path), random init, instead of size.
    config: str | None = None
    #: Decoder layers kept of ``config``'s (its width and vocabulary are kept whole).
    layers: int = 2
    pretrain_steps: int = 300
    steps: int = 200
    batch_size: int = 16
    max_seq_length: int = 64
    train_records: int = 4000
    retention_records: int = 200
    eval_fraction: float = 0.1
    methods: tuple[str, ...] = METHODS
    learning_rates: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(LEARNING_RATES))
    threads: int = 1
    seed: int = 0


def real_config(settings: Settings) -> dict[str, Any]:
    """``settings.config``'s config.json, cut to ``settings.layers`` decoder layers."""
    assert settings.config is not None
    path = Path(settings.config)
    if not path.is_file():
        path = CONFIGS_DIR / f"{settings.config}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.json")))
        raise SystemExit(f"--config {settings.config!r}: no such file, and not one of: {known}")
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    config["num_hidden_layers"] = settings.layers
    for key in ("max_window_layers", "first_k_dense_replace"):
        if key in config:
            config[key] = min(config[key], settings.layers)
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][: settings.layers]
    return config


def prepare_real_model(work_dir: Path, settings: Settings) -> Path:
    """A randomly initialised model of ``settings.config`` with the test tokenizer (whose ids fall
    inside any real vocabulary), so ``kubetune train`` can tokenize the synthetic task for it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kubetune.worker.testing import build_tokenizer

    config = real_config(settings)
    directory = work_dir / f"model-{Path(settings.config or '').stem}-{settings.layers}l-seed{settings.seed}"
    marker = directory / ".complete"
    if marker.is_file():
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    tokenizer = build_tokenizer()
    if len(tokenizer) > config["vocab_size"]:
        raise SystemExit(f"--config {settings.config}: vocabulary smaller than the test tokenizer's")
    config.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    marker.write_text("")
    return directory


def prepare_data(work_dir: Path, settings: Settings) -> tuple[Path, Path | None]:
    """The cipher task (completion format: loss on the answer) and the retention set (counting;
    none for a randomly initialised base, which has nothing to forget)."""
    from kubetune.worker.testing import retention_records, task_records, write_records

    train = write_records(
        work_dir / "data" / "cipher.jsonl", task_records(settings.train_records, seed=settings.seed)
    )
    if settings.config is not None:
        return train, None
    # A seed the base model's pretraining did not use, so these exact records were not memorised.
    retention = write_records(
        work_dir / "data" / "retention.jsonl",
        retention_records(settings.retention_records, seed=settings.seed + 101),
    )
    return train, retention


def method_block(method: str) -> dict[str, Any]:
    """The plan's method block: the method's defaults (LoRA r16/alpha 32 on every projection, adapters
    with bottleneck 64 in Houlsby placement, 20 prefix tokens, IA3 on k/v/down)."""
    return {"type": method}


def run_method(
    method: str, settings: Settings, model_dir: Path, train: Path, retention: Path | None, work_dir: Path
) -> dict[str, Any]:
    """Run ``method`` once per learning rate; returns every run and the best (lowest eval loss)."""
    runs: list[dict[str, Any]] = []
    for learning_rate in settings.learning_rates[method]:
        output = work_dir / "runs" / f"{method}-lr{learning_rate:g}"
        plan = plan_for(
            model_dir=model_dir,
            train_file=train,
            output=output,
            method=method_block(method),
            dataset={
                "format": "completion",
                "eval_fraction": settings.eval_fraction,
                **({"retention_uri": str(retention)} if retention is not None else {}),
            },
            training={
                "max_steps": settings.steps,
                "learning_rate": learning_rate,
                "lr_scheduler": "cosine",
                "warmup_ratio": 0.05,
                "batch_size": settings.batch_size,
                "max_seq_length": settings.max_seq_length,
                "logging_every_steps": max(1, settings.steps // 10),
                "seed": settings.seed,
            },
        )
        logger.info("%s lr=%g: training %d steps", method, learning_rate, settings.steps)
        try:
            run = run_kubetune(plan, threads=settings.threads)
        except BenchmarkError as error:
            # One method failing (e.g. a kernel missing on this CPU) must not hide the others' results.
            logger.warning("%s lr=%g failed: %s", method, learning_rate, error)
            runs.append({"learning_rate": learning_rate, "error": error.reason})
            continue
        metrics = run.metrics
        runs.append(
            {
                "learning_rate": learning_rate,
                "metrics": metrics,
                "weight_bytes": weight_bytes(run.manifest),
                "artifact_bytes": run.manifest.get("size_bytes"),
                "artifact_files": sorted(run.manifest.get("files", {})),
                "process_seconds": run.process_seconds,
            }
        )
        logger.info(
            "%s lr=%g: eval loss %.4f, retention delta %.4f, %.0f tokens/s",
            method,
            learning_rate,
            metrics.get("eval_loss") or float("nan"),
            metrics.get("retention_delta") or float("nan"),
            metrics.get("tokens_per_second") or 0.0,
        )
        shutil.rmtree(output, ignore_errors=True)
    finished = [r for r in runs if "metrics" in r]
    if not finished:
        return {"runs": runs, "best": None, "error": runs[0]["error"] if runs else "no runs"}
    finite = [r for r in finished if r["metrics"].get("eval_loss") is not None]
    best = min(finite or finished, key=lambda r: r["metrics"].get("eval_loss") or float("inf"))
    return {"runs": runs, "best": best}


def summarise(method: str, result: dict[str, Any], memory: dict[str, int]) -> dict[str, Any]:
    best = result["best"]
    metrics = best["metrics"]
    speeds = [
        r["metrics"]["tokens_per_second"]
        for r in result["runs"]
        if r.get("metrics", {}).get("tokens_per_second")
    ]
    return {
        "method": method,
        "learning_rate": best["learning_rate"],
        "total_parameters": metrics["total_parameters"],
        "trainable_parameters": metrics["trainable_parameters"],
        "trainable_percent": metrics["trainable_percent"],
        "training_memory_bytes": memory["total"],
        "training_memory": memory,
        "peak_rss_bytes": metrics["peak_memory_bytes"],
        "peak_memory_kind": metrics["peak_memory_kind"],
        "checkpoint_bytes": best["weight_bytes"],
        "artifact_bytes": best["artifact_bytes"],
        "tokens_per_second": median(speeds) if speeds else None,
        "tokens_per_second_runs": speeds,
        "eval_loss_before": metrics["eval_loss_before"],
        "eval_loss": metrics["eval_loss"],
        "retention_loss_before": metrics.get("retention_loss_before"),
        "retention_loss_after": metrics.get("retention_loss_after"),
        "retention_delta": metrics.get("retention_delta"),
        "train_seconds": metrics["train_seconds"],
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios against full fine-tuning in the same run (None when full was not run)."""
    full = next((row for row in rows if row["method"] == "full" and "error" not in row), None)
    for row in rows:
        if full is None or "error" in row:
            row["vs_full"] = None
            continue
        gained_full = full["eval_loss_before"] - full["eval_loss"]
        gained = row["eval_loss_before"] - row["eval_loss"]
        row["vs_full"] = {
            "trainable_parameters": ratio(row["trainable_parameters"], full["trainable_parameters"]),
            "training_memory": ratio(row["training_memory_bytes"], full["training_memory_bytes"]),
            "peak_rss": ratio(row["peak_rss_bytes"], full["peak_rss_bytes"]),
            "checkpoint_size": ratio(row["checkpoint_bytes"], full["checkpoint_bytes"]),
            "tokens_per_second": ratio(row["tokens_per_second"], full["tokens_per_second"]),
            "eval_loss": ratio(row["eval_loss"], full["eval_loss"]),
            # Share of full fine-tuning's eval-loss improvement this method achieved (1.0 = as good).
            "quality_recovered": ratio(gained, gained_full),
            "retention_delta": ratio(row["retention_delta"], full["retention_delta"]),
        }


def lr_cell(row: dict[str, Any], settings: dict[str, Any]) -> str:
    """The chosen learning rate, starred when it is the edge of a grid of several (a better one may lie
    beyond)."""
    grid = sorted(settings["learning_rates"].get(row["method"], ()))
    edge = len(grid) > 1 and row["learning_rate"] in (grid[0], grid[-1])
    return f"{row['learning_rate']:g}{' *' if edge else ''}"


def render_markdown(document: dict[str, Any]) -> str:
    env = document["environment"]
    settings = document["settings"]
    rows = [row for row in document["methods"] if "error" not in row]
    failed = [row for row in document["methods"] if "error" in row]
    real = settings.get("config") is not None

    def table(headers: list[str], rows: list[list[Any]]) -> str:
        """A markdown table; at real size without the columns random weights make meaningless."""
        keep = [i for i, h in enumerate(headers) if not (real and h in RANDOM_WEIGHT_COLUMNS)]
        return markdown_table([headers[i] for i in keep], [[row[i] for i in keep] for row in rows])

    model = f"`{settings['config']}`, {settings['layers']} layers" if real else f"`{settings['size']}`"
    parameters = min((row["total_parameters"] for row in rows), default="?")
    if real:
        base = (
            f"Base: `{settings['config']}`'s config.json at its real width and vocabulary, cut to "
            f"{settings['layers']} decoder layers, randomly initialised ({parameters} parameters), with "
            "the test tokenizer. Random weights: losses would measure nothing, so they are left out; "
            "memory, sizes, trainable shares and speed do not depend on the weights. One learning "
            "rate per method."
        )
    else:
        base = (
            f"Base: `{settings['size']}` Llama from `kubetune.worker.testing` ({parameters} parameters), "
            f"pretrained {settings['pretrain_steps']} steps on the counting distribution; learning rate "
            "= best eval loss from the method's grid."
        )
    load = env.get("load_average")
    lines = [
        f"# Method comparison ({model} model, synthetic cipher task)",
        "",
        f"Measured {env['measured_at']} at commit `{env['git_commit']}` on {env['processor']}, "
        f"{env['cpus_available']} CPU cores available (shared with other work"
        + (f"; load average {env.get('load_average_start')} at the start, {load} at the end" if load else "")
        + f"), {env['threads_per_run']} thread(s) per run, GPU: {env['cuda'] or 'none'}; torch "
        f"{env['torch']}, transformers {env['transformers']}, peft {env['peft']}.",
        "",
        f"{base} Each method: {settings['steps']} steps, batch {settings['batch_size']}, max length "
        f"{settings['max_seq_length']}, cosine schedule, fp32 on CPU. Generated by "
        "`python -m benchmarks.method_comparison`; the numbers come from the engine's `kubetune.json` "
        "except training memory (tensor accounting, `benchmarks/memory.py`).",
        "",
        "## Per method",
        "",
    ]
    lines.append(
        table(
            [
                "method",
                "lr",
                "trainable params",
                "trainable %",
                "training memory MiB",
                "peak RSS MiB",
                "checkpoint MiB",
                "tokens/s",
                "eval loss before",
                "eval loss after",
                "retention loss before",
                "retention delta",
            ],
            [
                [
                    row["method"],
                    lr_cell(row, settings),
                    row["trainable_parameters"],
                    row["trainable_percent"],
                    mib(row["training_memory_bytes"]),
                    mib(row["peak_rss_bytes"]),
                    mib(row["checkpoint_bytes"]),
                    row["tokens_per_second"],
                    row["eval_loss_before"],
                    row["eval_loss"],
                    row["retention_loss_before"],
                    row["retention_delta"],
                ]
                for row in rows
            ],
        )
    )
    if any(row.get("vs_full") for row in rows):
        lines += ["", "## Against full fine-tuning (ratios, same run)", ""]
        lines.append(
            table(
                [
                    "method",
                    "trainable params",
                    "training memory",
                    "peak RSS",
                    "checkpoint size",
                    "tokens/s",
                    "eval loss",
                    "quality recovered",
                    "retention delta",
                ],
                [
                    [
                        row["method"],
                        *(
                            row["vs_full"][key]
                            for key in (
                                "trainable_parameters",
                                "training_memory",
                                "peak_rss",
                                "checkpoint_size",
                                "tokens_per_second",
                                "eval_loss",
                                "quality_recovered",
                                "retention_delta",
                            )
                        ),
                    ]
                    for row in rows
                    if row.get("vs_full")
                ],
            )
        )
    lines += ["", "## Training memory by group (MiB, one step)", ""]
    lines.append(
        markdown_table(
            ["method", "weights", "gradients", "optimizer", "activations", "total"],
            [
                [row["method"], *(mib(row["training_memory"][group]) for group in (*MEMORY_GROUPS, "total"))]
                for row in rows
            ],
        )
    )
    if not real:  # at real size: one rate per method, and losses that mean nothing
        lines += ["", "## Learning-rate grid (eval loss / retention delta / tokens/s)", ""]
        lines.append(
            markdown_table(
                ["method", "lr", "eval loss", "retention delta", "tokens/s"],
                [
                    [
                        method,
                        run["learning_rate"],
                        run["metrics"].get("eval_loss") if "metrics" in run else f"failed: {run['error']}",
                        run.get("metrics", {}).get("retention_delta"),
                        run.get("metrics", {}).get("tokens_per_second"),
                    ]
                    for method, result in document["runs"].items()
                    for run in result["runs"]
                ],
            )
        )
    if failed:
        lines += ["", "## Methods that failed on this machine", ""]
        lines += [f"- **{row['method']}**: `{row['error']}`" for row in failed]
    if real:
        lines += [
            "",
            "## Reading these numbers",
            "",
            "- The model has its real width, vocabulary and layer shapes but only "
            f"{settings['layers']} decoder layers, so the embeddings and output layer weigh far more "
            "in every total than in the whole model. Per layer everything is real size: an "
            "adapter's parameters and checkpoint grow with the layer count, the frozen weights too, "
            "so the whole model's trainable shares are larger than here (the planner's "
            "`kubetune plan --config FILE` counts them exactly), and QLoRA saves less here because "
            "only the decoder layers are 4-bit.",
            "- *training memory* counts the tensors one step holds (weights, gradients, AdamW state, "
            "saved activations). *Peak RSS* is the engine's process peak on CPU, which includes "
            "loading the model.",
            "- *checkpoint* = the artifact's `*.safetensors` files; tokenizer and logs excluded.",
            "- tokens/s counts real (non-padding) tokens of the training loop; a handful of steps on "
            "a shared machine: only large ratios mean anything.",
            "- Losses are left out: the weights are random, so they rank nothing.",
            "",
        ]
        return "\n".join(lines)
    lines += [
        "",
        "## Reading these numbers",
        "",
        "- Losses are mean nats per completion token (the cipher answer and EOS); retention loss is on "
        "text the base was pretrained on. Retention delta = after - before: positive means forgetting.",
        "- *quality recovered* = (eval loss before - method's eval loss) / (before - full's eval loss). "
        "The base has never seen the cipher, so the loss before is near chance and most of the first "
        "improvement is shared by every method: this ratio flatters the weaker methods; the eval-loss "
        "ratio is the stricter comparison.",
        "- A starred learning rate is the edge of the method's grid: a rate beyond it might do better.",
        "- *training memory* counts the tensors one step holds (weights, gradients, AdamW state, saved "
        "activations). *Peak RSS* is what the engine reports on CPU: the whole process, dominated by the "
        "runtime at this model size, so it barely moves between methods.",
        "- *checkpoint* = the artifact's `*.safetensors` files; tokenizer and logs excluded.",
        "- tokens/s counts real (non-padding) tokens in the training loop, median over the grid's runs. "
        "The machine is shared, so treat differences under ~20% as noise.",
        "- This is a model of a few million parameters: the trainable share of LoRA is far larger than "
        "on a billion-parameter model (it scales with 1/hidden size), and activations, not weights, "
        "dominate memory. The ratios show the mechanics, not the magnitudes of a real model.",
        "",
    ]
    return "\n".join(lines)


def run(
    settings: Settings, work_dir: Path, results_dir: Path, name: str = "method_comparison"
) -> dict[str, Any]:
    """Run the comparison and write ``<name>.{json,md}`` into ``results_dir``."""
    work_dir.mkdir(parents=True, exist_ok=True)
    load_at_start = [round(x, 1) for x in os.getloadavg()]
    if settings.config is not None:
        model_dir = prepare_real_model(work_dir, settings)
    else:
        model_dir = prepare_model(
            work_dir, size=settings.size, pretrain_steps=settings.pretrain_steps, seed=settings.seed
        )
    train, retention = prepare_data(work_dir, settings)
    results: dict[str, Any] = {}
    rows = []
    for method in settings.methods:
        results[method] = run_method(method, settings, model_dir, train, retention, work_dir)
        if results[method]["best"] is None:
            rows.append({"method": method, "error": results[method]["error"]})
            continue
        memory = measure_training_memory(
            model_dir,
            method_block(method),
            train,
            batch_size=settings.batch_size,
            max_seq_length=settings.max_seq_length,
            seed=settings.seed,
        )
        rows.append(summarise(method, results[method], memory))
    add_ratios(rows)
    document = {
        "benchmark": "method_comparison",
        # The 1/5/15-minute load averages: on a shared machine, what the timings competed with.
        "environment": {
            **environment(settings.threads),
            "load_average_start": load_at_start,
            "load_average": [round(x, 1) for x in os.getloadavg()],
        },
        "settings": {**asdict(settings), "methods": list(settings.methods)},
        "methods": rows,
        "runs": results,
    }
    write_results(name, document, render_markdown(document), results_dir)
    return document


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--methods", default=",".join(defaults.methods), help="comma-separated subset")
    parser.add_argument("--size", choices=get_args(ModelSize), default=defaults.size)
    parser.add_argument(
        "--config",
        default=None,
        help="a real architecture instead of --size: a config.json path or one of "
        f"{', '.join(sorted(p.stem for p in CONFIGS_DIR.glob('*.json')))} (random init, real width)",
    )
    parser.add_argument(
        "--layers", type=int, default=defaults.layers, help="decoder layers kept of --config's"
    )
    parser.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-seq-length", type=int, default=defaults.max_seq_length)
    parser.add_argument("--train-records", type=int, default=defaults.train_records)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="one learning rate for every method instead of the per-method grids",
    )
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads per run")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR / "method_comparison")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="method_comparison", help="results file name, without suffix")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        default=None,
        help="only rewrite the markdown beside an existing results JSON (no training)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.render is not None:
        document = json.loads(args.render.read_text(encoding="utf-8"))
        args.render.with_suffix(".md").write_text(render_markdown(document), encoding="utf-8")
        return 0
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    grids = dict(LEARNING_RATES)
    if args.config is not None:
        # Random weights: eval loss ranks nothing, so a grid would only cost time. The grid's second
        # rate, each method's usual range.
        grids = {m: (rates[1],) for m, rates in LEARNING_RATES.items()}
    if args.learning_rate is not None:
        grids = {m: (args.learning_rate,) for m in METHODS}
    if args.layers < 1:
        raise SystemExit(f"--layers must be at least 1, got {args.layers}")
    settings = Settings(
        size=args.size,
        config=args.config,
        layers=args.layers,
        pretrain_steps=args.pretrain_steps,
        steps=args.steps,
        batch_size=args.batch_size,
        max_seq_length=args.max_seq_length,
        train_records=args.train_records,
        methods=methods,
        learning_rates=grids,
        threads=args.threads,
        seed=args.seed,
    )
    document = run(settings, args.work_dir, args.results_dir, args.name)
    summary = [
        {k: v for k, v in row.items() if k not in ("vs_full", "training_memory")}
        for row in document["methods"]
    ]
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
