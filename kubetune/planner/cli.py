"""``kubetune plan``: every method side by side for one model and job, before any GPU burns.

    kubetune plan job.yaml                      # a FineTuneJob manifest; config.json from its model URI
    kubetune plan --config config.json --gpu H100 --gpus 1 --batch-size 4 --seq-length 2048
    kubetune plan job.yaml -o json              # status.plan's fields, one object per method

Works offline for local configs (file paths, file://); hf:// reads config.json only, through the
Hugging Face cache. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from kubetune.api import methods
from kubetune.planner import compute
from kubetune.planner import job as planning
from kubetune.planner.architecture import ConfigError, model_shape
from kubetune.planner.memory import TrainingSetup
from kubetune.planner.plan import GIB, JobFacts, JobPlan, count_dataset_tokens, plan_job


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", type=Path, help="a FineTuneJob manifest (YAML or JSON)")
    parser.add_argument(
        "--config", type=Path, help="the model's config.json (instead of the manifest's model)"
    )
    parser.add_argument("--method", choices=methods.METHOD_NAMES, help="the method to recommend for")
    parser.add_argument("--gpu", help=f"GPU type ({', '.join(compute.GPUS)}) for memory, time and cost")
    parser.add_argument("--gpus", type=int, help="data-parallel GPUs (nodes x GPUs per node)")
    parser.add_argument("--gpu-memory", help="memory per GPU (a quantity such as 24Gi); default: the GPU's")
    parser.add_argument("--batch-size", type=int, help="sequences per GPU per micro-batch (default 4)")
    parser.add_argument("--seq-length", type=int, help="tokens per sequence (default 2048)")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--dataset", type=Path, help="a local JSONL/JSON dataset whose tokens are counted")
    parser.add_argument("--tokens", type=int, help="training tokens per epoch (instead of --dataset)")
    parser.add_argument("--epochs", type=float, help="epochs (default 3)")
    compute.add_assumption_arguments(parser)
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")


def _load_manifest(path: Path) -> Any:
    import yaml

    from kubetune.api.v1alpha1 import FineTuneJob

    for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        if isinstance(document, dict) and document.get("kind") == "FineTuneJob":
            return FineTuneJob.model_validate(document)
    raise ValueError(f"{path}: no FineTuneJob in the file")


def _facts(args: argparse.Namespace) -> JobFacts:
    assumptions = compute.assumptions_from(args)
    settings = planning.PlannerSettings(assumptions=assumptions, default_gpu=args.gpu or "")
    if args.file is None and args.config is None:
        raise ValueError("give a FineTuneJob manifest or --config config.json")
    config: dict[str, Any] | None = None
    if args.config is not None:
        config = json.loads(args.config.read_text(encoding="utf-8"))
    if args.file is not None:
        job = _load_manifest(args.file)
        if config is None:
            config = planning.read_model_config(job.spec.model.uri, job.spec.model.revision, settings)
        facts = planning.facts_for(job, config, settings)
    else:
        assert config is not None
        gpu = assumptions.gpu(args.gpu) if args.gpu else None
        facts = JobFacts(
            shape=model_shape(config),
            method=args.method or "lora",
            settings={},
            setup=TrainingSetup(),
            gpu=gpu,
            available_bytes=gpu.memory_bytes if gpu else None,
            assumptions=assumptions,
        )
    setup = facts.setup
    setup = replace(
        setup,
        gpus=args.gpus or setup.gpus,
        batch_size=args.batch_size or setup.batch_size,
        seq_length=args.seq_length or setup.seq_length,
        gradient_checkpointing=setup.gradient_checkpointing if args.gradient_checkpointing is None else True,
        precision=args.precision or setup.precision,
        on_gpu=setup.on_gpu or args.gpu is not None or args.gpu_memory is not None,
    )
    facts = replace(
        facts, setup=setup, method=args.method or facts.method, epochs=args.epochs or facts.epochs
    )
    if args.gpu_memory:
        facts = replace(facts, available_bytes=planning.quantity_bytes(args.gpu_memory))
    if args.tokens:
        facts = replace(facts, dataset_tokens=args.tokens, tokens_source="given")
    elif args.dataset:
        tokens, source = count_dataset_tokens(args.dataset, setup.seq_length)
        facts = replace(facts, dataset_tokens=tokens, tokens_source=source)
    return facts


def method_plans(facts: JobFacts) -> list[dict[str, Any]]:
    """status.plan for each method, as if the job had chosen it."""
    out = []
    for name in methods.METHOD_NAMES:
        plan = plan_job(replace(facts, method=name))
        out.append({"method": name, **plan.status()})
    return out


def _table(plan: JobPlan, rows: list[dict[str, Any]]) -> str:
    facts = plan.facts
    gpu = facts.gpu.name if facts.gpu else "unknown GPU"
    available = f"{facts.available_bytes / GIB:.1f}Gi" if facts.available_bytes else "unknown"
    head = (
        f"model: {facts.shape.model_type}, {facts.shape.total_parameters:,} parameters; "
        f"{facts.setup.gpus} x {gpu} ({available} each); batch {facts.setup.batch_size} x "
        f"{facts.setup.seq_length} tokens, {facts.setup.precision}"
        + (", gradient checkpointing" if facts.setup.gradient_checkpointing else "")
    )
    columns = ("METHOD", "TRAINABLE", "TRAINABLE%", "MEMORY/GPU", "FITS", "HOURS", "COST")
    lines = [head, ""]
    table = [columns]
    for row in rows:
        fits = "yes" if row["fits"] and facts.available_bytes else ("no" if facts.available_bytes else "?")
        marker = "*" if row["method"] == facts.method else " "
        table.append(
            (
                marker + row["method"],
                f"{row['trainableParameters']:,}",
                row["trainablePercent"],
                row["estimatedPeakMemory"],
                fits,
                f"{row['estimatedHours']:.2f}" if "estimatedHours" in row else "-",
                row.get("estimatedCost", "-"),
            )
        )
    widths = [max(len(str(r[i])) for r in table) for i in range(len(columns))]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in table]
    if not any("estimatedHours" in r for r in rows):
        lines.append("(time and cost need --gpu and --dataset, --tokens or training.maxSteps)")
    lines += ["", f"* {facts.method}: {plan.recommendation}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        facts = _facts(args)
    except (ConfigError, ValueError, OSError) as error:
        print(f"kubetune plan: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # e.g. planning.ModelConfigUnavailable
        print(f"kubetune plan: {error}", file=sys.stderr)
        return 2
    rows = method_plans(facts)
    if args.output == "json":
        document = {
            "model": {"type": facts.shape.model_type, "totalParameters": facts.shape.total_parameters},
            "gpu": facts.gpu.name if facts.gpu else None,
            "gpus": facts.setup.gpus,
            "chosen": facts.method,
            "methods": rows,
        }
        print(json.dumps(document, indent=2))
    else:
        print(_table(plan_job(facts), rows))
    return 0
