"""Training throughput of ``kubetune train`` against the strongest baselines we know, in the same run.

Both sides train LoRA (r 16, alpha 32, dropout 0.05, every attention and MLP projection) on the same
tiny Llama, the same records, batch size, maximum length and number of optimizer steps, with the same
thread budget, one process each. The data has realistic length variance: each record joins a
log-normally distributed number of cipher examples (median about 40 tokens, a long tail cut at
``max_seq_length``), so padding matters the way it does on real instruction data.

Only real (non-padding) tokens count. kubetune reports them in its manifest (``tokens_per_second``, over
its training loop); the baselines (:mod:`benchmarks.plain_trainer`) count the real tokens of every
batch over their trainer's loop. Three baselines:

* ``transformers+peft``: ``Trainer`` with random batches padded to their longest record;
* ``trainer-group-by-length``: the same with ``train_sampling_strategy="group_by_length"``;
* ``trl-sft-packed``: TRL's ``SFTTrainer`` with padding-free best-fit packing, fp32, no checkpointing.

kubetune runs in three data-feeding variants:

* ``grouped`` (the default plan): batches of similar length, padded to their longest record;
* ``packed`` (``training.packing: true``): records concatenated into full blocks, no padding;
* ``padded`` (``group_by_length: false``): random batches padded to their longest, the baseline's
  strategy, which isolates the cost of the training loop itself.

Runs are interleaved and repeated; the table gives medians and the ratio of medians.

Run (about 10 minutes on 2 shared CPU cores with the first baseline alone; the two stronger baselines
add two runs per repeat)::

    .venv/bin/python -m benchmarks.throughput       # writes benchmarks/results/throughput.{json,md}
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

from benchmarks.common import (
    DEFAULT_WORK_DIR,
    RESULTS_DIR,
    ModelSize,
    environment,
    markdown_table,
    median,
    plan_for,
    prepare_model,
    ratio,
    run_kubetune,
    run_python_module,
    write_results,
)

logger = logging.getLogger("benchmarks.throughput")

#: kubetune variant -> the plan's training overrides.
VARIANTS: dict[str, dict[str, Any]] = {
    "grouped": {"packing": False, "group_by_length": True},
    "packed": {"packing": True},
    "padded": {"packing": False, "group_by_length": False},
}
BASELINE = "transformers+peft"
#: baseline side -> ``benchmarks.plain_trainer`` strategy. Ratios are given against the first and
#: against the best of them.
BASELINES: dict[str, str] = {
    BASELINE: "random",
    "trainer-group-by-length": "group_by_length",
    "trl-sft-packed": "trl-packed",
}


@dataclass(frozen=True)
class Settings:
    """Shared by both sides. Steps are optimizer steps; lengths are tokens."""

    size: ModelSize = "small"
    steps: int = 60
    batch_size: int = 8
    max_seq_length: int = 256
    records: int = 2000
    learning_rate: float = 1e-3
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    variants: tuple[str, ...] = tuple(VARIANTS)
    baselines: tuple[str, ...] = tuple(BASELINES)
    repeats: int = 3
    threads: int = 1
    seed: int = 0


def variable_length_records(count: int, seed: int) -> list[dict[str, str]]:
    """``text`` records joining 1..24 cipher examples each, the count drawn log-normally (median ~3)."""
    from kubetune.worker.testing import task_records

    rng = random.Random(seed)
    pieces = [r["text"] for r in task_records(count * 4, seed=seed, fmt="text")]
    records = []
    for _ in range(count):
        joined = min(24, max(1, round(rng.lognormvariate(1.0, 0.8))))
        # Joined with "," rather than ".": the tiny tokenizer's "." id is outside the model's vocabulary.
        records.append({"text": " , ".join(rng.choice(pieces) for _ in range(joined))})
    return records


def run_kubetune_variant(
    variant: str, settings: Settings, model_dir: Path, train_file: Path, work_dir: Path, repeat: int
) -> dict[str, Any]:
    output = work_dir / "runs" / f"kubetune-{variant}-{repeat}"
    plan = plan_for(
        model_dir=model_dir,
        train_file=train_file,
        output=output,
        method={
            "type": "lora",
            "lora": {
                "rank": settings.lora_rank,
                "alpha": settings.lora_alpha,
                "dropout": settings.lora_dropout,
            },
        },
        dataset={"format": "text", "eval_fraction": 0.0},
        training={
            "max_steps": settings.steps,
            "learning_rate": settings.learning_rate,
            "lr_scheduler": "cosine",
            "warmup_ratio": 0.0,
            "batch_size": settings.batch_size,
            "max_seq_length": settings.max_seq_length,
            "logging_every_steps": max(1, settings.steps // 10),
            "seed": settings.seed,
            **VARIANTS[variant],
        },
    )
    run = run_kubetune(plan, threads=settings.threads)
    metrics = run.metrics
    shutil.rmtree(output, ignore_errors=True)
    return {
        "side": f"kubetune-{variant}",
        "repeat": repeat,
        "tokens_per_second": metrics["tokens_per_second"],
        "real_tokens": metrics["train_tokens"],
        "train_seconds": metrics["train_seconds"],
        "process_seconds": run.process_seconds,
        "train_loss": metrics["train_loss"],
    }


def run_baseline(
    side: str, settings: Settings, model_dir: Path, train_file: Path, work_dir: Path, repeat: int
) -> dict[str, Any]:
    run_dir = work_dir / "runs" / f"{side}-{repeat}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = {
        "model_dir": str(model_dir),
        "train_file": str(train_file),
        "output_dir": str(run_dir / "trainer"),
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "max_seq_length": settings.max_seq_length,
        "learning_rate": settings.learning_rate,
        "lora_rank": settings.lora_rank,
        "lora_alpha": settings.lora_alpha,
        "lora_dropout": settings.lora_dropout,
        "seed": settings.seed,
        "strategy": BASELINES[side],
    }
    config_file, result_file = run_dir / "config.json", run_dir / "result.json"
    config_file.write_text(json.dumps(config), encoding="utf-8")
    seconds = run_python_module(
        "benchmarks.plain_trainer", [str(config_file), str(result_file)], threads=settings.threads
    )
    result = json.loads(result_file.read_text(encoding="utf-8"))
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "side": side,
        "repeat": repeat,
        "tokens_per_second": result["tokens_per_second"],
        "real_tokens": result["real_tokens"],
        "train_seconds": result["train_seconds"],
        "process_seconds": seconds,
        "train_loss": result["train_loss"],
    }


def summarise(runs: list[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    """Median per side, each side's ratio to the first baseline (medians, and per repeat), and to the
    best baseline's median (the one a user who knows the field would pick)."""
    sides = [*settings.baselines, *(f"kubetune-{v}" for v in settings.variants)]
    by_side = {side: [r for r in runs if r["side"] == side] for side in sides}
    first = settings.baselines[0]
    baseline_median = median([r["tokens_per_second"] for r in by_side[first]])
    baseline_by_repeat = {r["repeat"]: r["tokens_per_second"] for r in by_side[first]}
    medians = {side: median([r["tokens_per_second"] for r in by_side[side]]) for side in settings.baselines}
    best = max(medians, key=lambda side: medians[side])
    rows = []
    for side in sides:
        side_runs = by_side[side]
        speeds = [r["tokens_per_second"] for r in side_runs]
        end_to_end = [r["real_tokens"] / r["process_seconds"] for r in side_runs]
        rows.append(
            {
                "side": side,
                "runs": len(side_runs),
                "tokens_per_second_median": median(speeds),
                "tokens_per_second_min": min(speeds),
                "tokens_per_second_max": max(speeds),
                "real_tokens_median": median([r["real_tokens"] for r in side_runs]),
                "train_seconds_median": median([r["train_seconds"] for r in side_runs]),
                "process_seconds_median": median([r["process_seconds"] for r in side_runs]),
                "end_to_end_tokens_per_second_median": median(end_to_end),
                "ratio_to_baseline": ratio(median(speeds), baseline_median),
                "best_baseline": best,
                "ratio_to_best_baseline": ratio(median(speeds), medians[best]),
                "ratio_to_baseline_per_repeat": [
                    ratio(r["tokens_per_second"], baseline_by_repeat.get(r["repeat"])) for r in side_runs
                ],
            }
        )
    return rows


def render_markdown(document: dict[str, Any]) -> str:
    env = document["environment"]
    s = document["settings"]
    lines = [
        "# Throughput: `kubetune train` vs transformers + peft and TRL baselines",
        "",
        f"Measured {env['measured_at']} at commit `{env['git_commit']}` on {env['processor']}, "
        f"{env['cpus_available']} CPU cores available (shared with other work), {env['threads_per_run']} "
        f"thread(s) per run, GPU: {env['cuda'] or 'none'}; torch {env['torch']}, transformers "
        f"{env['transformers']}, peft {env['peft']}.",
        "",
        f"LoRA r{s['lora_rank']} on the `{s['size']}` Llama from `kubetune.worker.testing`, {s['steps']} "
        f"steps of batch {s['batch_size']}, max length {s['max_seq_length']}, {s['records']} text records "
        f"of variable length (mean {document['data']['mean_tokens']:.1f} tokens, median "
        f"{document['data']['median_tokens']}, max {document['data']['max_tokens']} before truncation), "
        f"fp32, {s['repeats']} interleaved repeats. Tokens/s counts real (non-padding) tokens over each "
        "side's training loop; ratios are against the first baseline's median in this run, and against "
        "the best baseline's. Generated by "
        "`python -m benchmarks.throughput`.",
        "",
    ]
    lines.append(
        markdown_table(
            [
                "side",
                "runs",
                "real tokens/s (median)",
                "min",
                "max",
                "real tokens per run",
                "loop s",
                "process s",
                "ratio to baseline",
                "per-repeat ratios",
                "ratio to best baseline",
            ],
            [
                [
                    row["side"],
                    row["runs"],
                    row["tokens_per_second_median"],
                    row["tokens_per_second_min"],
                    row["tokens_per_second_max"],
                    row["real_tokens_median"],
                    row["train_seconds_median"],
                    row["process_seconds_median"],
                    row["ratio_to_baseline"],
                    ", ".join(f"{x:.2f}" for x in row["ratio_to_baseline_per_repeat"] if x is not None),
                    row.get("ratio_to_best_baseline"),
                ]
                for row in document["summary"]
            ],
        )
    )
    lines += [
        "",
        "- *baseline* (`benchmarks/plain_trainer.py`): `Trainer` + `DataCollatorForLanguageModeling` "
        "(random batches padded to their longest record), PEFT LoRA on the same modules.",
        '- *trainer-group-by-length*: the same `Trainer` with `train_sampling_strategy="group_by_length"`. '
        "*trl-sft-packed*: TRL `SFTTrainer`, best-fit-decreasing packing, padding-free, fp32, no gradient "
        "checkpointing (its CPU defaults, bf16 and checkpointing, are far slower); text records, so the loss "
        "is on every token on every side. Every baseline is handed the same tokenized records.",
        "- *grouped* is kubetune's default (length-grouped batches, dynamic padding); *packed* sets "
        "`training.packing`; *padded* turns grouping off to match the baseline's batching.",
        "- Real tokens per run differ between sides: a fixed number of steps over differently formed "
        "batches (packing fills every row to the maximum length).",
        "- *process s* includes interpreter start, imports and model loading, the same for both sides.",
        "",
    ]
    return "\n".join(lines)


def run(settings: Settings, work_dir: Path, results_dir: Path) -> dict[str, Any]:
    """Run the comparison and write ``throughput.{json,md}`` into ``results_dir``."""
    from kubetune.worker.testing import build_tokenizer, write_records

    work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(work_dir, size=settings.size, pretrain_steps=0, seed=settings.seed)
    records = variable_length_records(settings.records, settings.seed)
    train_file = write_records(work_dir / "data" / "variable-length.jsonl", records)
    tokenizer = build_tokenizer()
    lengths = sorted(len(ids) + 1 for ids in tokenizer([r["text"] for r in records])["input_ids"])

    runs: list[dict[str, Any]] = []
    for repeat in range(settings.repeats):
        # Rotating the order spreads slow drifts of a shared machine over every side.
        order: list[str] = [*settings.baselines, *settings.variants]
        order = order[repeat % len(order) :] + order[: repeat % len(order)]
        for side in order:
            if side in BASELINES:
                result = run_baseline(side, settings, model_dir, train_file, work_dir, repeat)
            else:
                result = run_kubetune_variant(side, settings, model_dir, train_file, work_dir, repeat)
            logger.info(
                "repeat %d %s: %.0f real tokens/s", repeat, result["side"], result["tokens_per_second"]
            )
            runs.append(result)

    document = {
        "benchmark": "throughput",
        "environment": environment(settings.threads),
        "settings": {
            **asdict(settings),
            "variants": list(settings.variants),
            "baselines": list(settings.baselines),
        },
        "data": {
            "records": len(lengths),
            "mean_tokens": sum(lengths) / len(lengths),
            "median_tokens": lengths[len(lengths) // 2],
            "max_tokens": lengths[-1],
            "over_max_seq_length": sum(1 for n in lengths if n > settings.max_seq_length),
        },
        "summary": summarise(runs, settings),
        "runs": runs,
    }
    write_results("throughput", document, render_markdown(document), results_dir)
    return document


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", choices=get_args(ModelSize), default=defaults.size)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-seq-length", type=int, default=defaults.max_seq_length)
    parser.add_argument("--records", type=int, default=defaults.records)
    parser.add_argument("--variants", default=",".join(defaults.variants), help="comma-separated subset")
    parser.add_argument("--baselines", default=",".join(defaults.baselines), help="comma-separated subset")
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads per run")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR / "throughput")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    baselines = tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown or not baselines:
        raise SystemExit(f"--baselines: unknown or none {unknown}; known: {', '.join(BASELINES)}")
    settings = Settings(
        size=args.size,
        steps=args.steps,
        batch_size=args.batch_size,
        max_seq_length=args.max_seq_length,
        records=args.records,
        variants=variants,
        baselines=baselines,
        repeats=args.repeats,
        threads=args.threads,
        seed=args.seed,
    )
    document = run(settings, args.work_dir, args.results_dir)
    print(json.dumps(document["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
