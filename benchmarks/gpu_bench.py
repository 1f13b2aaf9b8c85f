"""GPU benchmark: LoRA, QLoRA and full fine-tuning of a ~0.5 B real architecture, kubetune against the
strongest baselines, with and without Liger Kernel. ``benchmarks/gpu.sh`` runs it (and says what it
needs); this module is the measuring part.

Model: a real ``config.json`` (default Qwen2.5-0.5B from ``tests/planner/configs/``, all its layers,
its width and vocabulary), randomly initialised: speed and memory do not depend on the weights, and
nothing is downloaded. Data: text records of log-normal length (median about 300 tokens, cut at
``--max-seq-length``) over the test tokenizer's words, the same records for every side.

Sides, per method:

* ``kubetune``: the engine (``kubetune.worker.engine.train``) with its default plan for the method,
  bf16, packing on (padding-free blocks), no gradient checkpointing;
* ``trainer``: ``transformers.Trainer`` + PEFT, batches grouped by length
  (``train_sampling_strategy="group_by_length"``), bf16;
* ``trl``: TRL's ``SFTTrainer`` with padding-free best-fit packing, bf16 (when trl is installed);
* each again with Liger Kernel's fused kernels when ``liger_kernel`` is installed (the baselines
  through ``use_liger_kernel=True``; kubetune by patching the architecture's modules before the
  engine loads the model, which is what that flag does).

Per run, in its own process: real (non-padding) tokens per second over the training loop, model-FLOPs
utilisation (the planner's training-FLOPs formula, ``kubetune.planner.compute.training_flops``, over
the GPU's dense bf16 peak from the planner's GPU table), ``torch.cuda.max_memory_allocated`` against
the planner's estimate (``kubetune.planner.memory.estimate_memory``; its fixed CUDA-context overhead
is shown apart, since max_memory_allocated does not see the context), and the ratio of kubetune's
tokens/s to each baseline's.

    python -m benchmarks.gpu_bench run            # what benchmarks/gpu.sh runs
    python -m benchmarks.gpu_bench run --help

Every run is bounded: ``--budget-s`` (default 420) stops starting new runs once spent, and the
results say which were skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, RESULTS_DIR, environment, markdown_table, mib, ratio

CONFIGS_DIR = REPO_ROOT / "tests" / "planner" / "configs"
METHODS = ("lora", "qlora", "full")
SIDES = ("kubetune", "trainer", "trl")
#: Methods whose base is loaded in 4 bits: they need bitsandbytes.
QUANTISED = ("qlora",)


@dataclass(frozen=True)
class Settings:
    """What every run shares. Steps are optimizer steps; lengths are tokens; seconds are wall time."""

    config: str = "qwen2.5-0.5b"
    layers: int | None = None  # None: all of the config's layers
    methods: tuple[str, ...] = METHODS
    sides: tuple[str, ...] = SIDES
    liger: bool = True  # also run each side with Liger Kernel, when installed
    steps: int = 30
    batch_size: int = 8
    max_seq_length: int = 1024
    records: int = 2000
    learning_rate: float = 1e-4
    seed: int = 0
    device: str = "cuda"
    budget_s: float = 420.0
    in_process: bool = False  # run each measurement in this process (tests: no interpreter start-up)


@dataclass
class RunResult:
    method: str
    side: str
    liger: bool
    tokens_per_second: float | None = None
    real_tokens: int | None = None
    train_seconds: float | None = None
    peak_memory_bytes: int | None = None
    trainable_parameters: int | None = None
    mfu: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.side}{'+liger' if self.liger else ''}"


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------------------------------ model, data


def read_config(settings: Settings) -> dict[str, Any]:
    path = Path(settings.config)
    if not path.is_file():
        path = CONFIGS_DIR / f"{settings.config}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.json")))
        raise SystemExit(f"--config {settings.config!r}: no such file, and not one of: {known}")
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if settings.layers is not None:
        config["num_hidden_layers"] = settings.layers
        for key in ("max_window_layers", "first_k_dense_replace"):
            if key in config:
                config[key] = min(config[key], settings.layers)
        if isinstance(config.get("layer_types"), list):
            config["layer_types"] = config["layer_types"][: settings.layers]
    return config


def prepare_model(work_dir: Path, settings: Settings) -> Path:
    """The randomly initialised model (fp32 safetensors) and the test tokenizer, built once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kubetune.worker.testing import build_tokenizer

    directory = work_dir / f"model-{Path(settings.config).stem}-{settings.layers or 'all'}l"
    if (directory / ".complete").is_file():
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    tokenizer = build_tokenizer()
    config = read_config(settings)
    config.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / ".complete").write_text("")
    return directory


def write_records(path: Path, settings: Settings) -> Path:
    """Text records of log-normal length in words (one token each with the test tokenizer)."""
    from kubetune.worker.testing import WORDS, write_records

    rng = random.Random(settings.seed)
    records = []
    for _ in range(settings.records):
        length = min(settings.max_seq_length - 2, max(8, int(rng.lognormvariate(math.log(300), 0.6))))
        records.append({"text": " ".join(rng.choice(WORDS) for _ in range(length))})
    return write_records(path, records)


# -------------------------------------------------------------------------------------- one measurement


def _flops_and_estimate(
    config: dict[str, Any], method: str, trainable: int, tokens: int, settings: Settings
) -> tuple[float, dict[str, int]]:
    from kubetune.api import methods
    from kubetune.planner.architecture import model_shape
    from kubetune.planner.compute import training_flops
    from kubetune.planner.memory import TrainingSetup, estimate_memory
    from kubetune.worker.plan import MethodSpec

    shape = model_shape(config)
    spec = MethodSpec.model_validate({"type": method})
    info = methods.get(method)
    flops = training_flops(shape, info, trainable, tokens, settings.max_seq_length, False)
    blocks = {block: getattr(spec, block) for block in info.blocks}
    setup = TrainingSetup(
        batch_size=settings.batch_size,
        seq_length=settings.max_seq_length,
        precision="bf16",
        on_gpu=settings.device == "cuda",
    )
    estimate = estimate_memory(shape, method, blocks, setup)
    return flops, {k: int(v) for k, v in estimate.parts().items() if k != "total"}


def _peak_tflops() -> tuple[str | None, float | None]:
    """The GPU's name and dense bf16 peak from the planner's table (None off a known GPU)."""
    import torch

    from kubetune.planner.compute import GPUS

    if not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name(0)
    for key, gpu in GPUS.items():
        if key.split("-")[0].lower() in name.lower():
            return name, gpu.peak_tflops
    return name, None


def _apply_liger(model_type: str) -> None:
    """Patch the architecture's modules with Liger's fused kernels before a model is built."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel  # type: ignore[import-not-found]

    _apply_liger_kernel(model_type)


def _run_kubetune(job: dict[str, Any], work: Path) -> dict[str, Any]:
    from kubetune.worker.artifact import read_manifest
    from kubetune.worker.engine import train
    from kubetune.worker.plan import TrainingPlan

    output = work / "kubetune-out"
    shutil.rmtree(output, ignore_errors=True)
    plan = TrainingPlan.model_validate(
        {
            "name": "gpu-bench",
            "model": {"uri": job["model_dir"]},
            "dataset": {"uri": job["train_file"], "format": "text", "eval_fraction": 0.0},
            "method": {"type": job["method"]},
            "training": {
                "max_steps": job["steps"],
                "batch_size": job["batch_size"],
                "max_seq_length": job["max_seq_length"],
                "learning_rate": job["learning_rate"],
                "precision": "bf16" if job["device"] == "cuda" else "fp32",
                "packing": True,
                "gradient_checkpointing": False,
                "checkpoint_every_steps": 0,
                "seed": job["seed"],
            },
            "output": {"uri": str(output), "work_dir": str(work / "kubetune-work")},
            "progress": {"port": 0, "termination_message_path": str(work / "termination")},
        }
    )
    train(plan)
    manifest = read_manifest(output)
    if manifest is None:
        raise RuntimeError(f"kubetune train published no manifest in {output}")
    metrics = manifest["metrics"]
    return {
        "real_tokens": int(metrics["train_tokens"]),
        "train_seconds": float(metrics["train_seconds"]),
        "trainable_parameters": int(metrics["trainable_parameters"]),
    }


def _run_baseline(job: dict[str, Any], work: Path) -> dict[str, Any]:
    """HF ``Trainer`` + PEFT (grouped by length) or TRL ``SFTTrainer`` (padding-free packing)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        TrainingArguments,
    )

    from benchmarks.plain_trainer import LLAMA_LORA_TARGETS, instrumented_trainer, read_texts, tokenize

    cuda = job["device"] == "cuda"
    method = job["method"]
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    dataset = tokenize(tokenizer, read_texts(Path(job["train_file"])), job["max_seq_length"])
    load: dict[str, Any] = {"dtype": torch.float32 if method == "full" or not cuda else torch.bfloat16}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32,
        )
    if cuda:
        load["device_map"] = {"": 0}  # placed on load: a 4-bit model cannot be moved afterwards
    model: Any = AutoModelForCausalLM.from_pretrained(job["model_dir"], **load)
    model.config.use_cache = False
    if method != "full":
        from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        # The engine's LoRA defaults: rank 16, alpha 32, every attention and MLP projection.
        model = get_peft_model(
            model,
            LoraConfig(
                task_type=TaskType.CAUSAL_LM, r=16, lora_alpha=32, lora_dropout=0.05,
                target_modules=LLAMA_LORA_TARGETS, bias="none",
            ),
        )  # fmt: skip
    CountingTrainer, Clock, counted, clock = instrumented_trainer(trl=job["side"] == "trl", cuda_sync=cuda)

    common: dict[str, Any] = dict(
        output_dir=str(work / "trainer"),
        max_steps=job["steps"],
        per_device_train_batch_size=job["batch_size"],
        learning_rate=job["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        logging_steps=max(1, job["steps"] // 5),
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=job["seed"],
        use_cpu=not cuda,
        bf16=cuda,
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        gradient_checkpointing=False,
        use_liger_kernel=job["liger"],
    )
    if job["side"] == "trl":
        from datasets import Dataset
        from trl import SFTConfig

        trainer = CountingTrainer(
            model=model,
            args=SFTConfig(
                **common,
                max_length=job["max_seq_length"],
                packing=True,
                packing_strategy="bfd",
                padding_free=True,
            ),
            train_dataset=Dataset.from_list([{"input_ids": e["input_ids"]} for e in dataset]),
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
    else:
        common["train_sampling_strategy"] = "group_by_length"
        trainer = CountingTrainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=dataset,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            callbacks=[Clock()],
        )
    trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "real_tokens": counted["real_tokens"],
        "train_seconds": clock["end"] - clock["begin"],
        "trainable_parameters": int(trainable),
    }


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One (method, side, liger) run; returns what :class:`RunResult` holds."""
    import torch

    work = Path(job["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    if job["liger"] and job["side"] == "kubetune":
        _apply_liger(job["model_type"])  # the baselines apply it themselves (use_liger_kernel)
    cuda = job["device"] == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    side = _run_kubetune if job["side"] == "kubetune" else _run_baseline
    result = side(job, work)
    if cuda:
        result["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    seconds = result["train_seconds"]
    result["tokens_per_second"] = result["real_tokens"] / seconds if seconds > 0 else None
    return result


# ------------------------------------------------------------------------------------------- the runs


def plan_runs(settings: Settings) -> tuple[list[tuple[str, str, bool]], list[str]]:
    """The (method, side, liger) runs this machine can do, and why the others are left out."""
    skipped = []
    methods = list(settings.methods)
    if "qlora" in methods and not available("bitsandbytes"):
        methods.remove("qlora")
        skipped.append("qlora: bitsandbytes is not installed")
    sides = list(settings.sides)
    if "trl" in sides and not (available("trl") and available("datasets")):
        sides.remove("trl")
        skipped.append("trl: trl (and datasets) not installed")
    ligers = [False]
    if settings.liger:
        if available("liger_kernel") and settings.device == "cuda":
            ligers.append(True)
        else:
            skipped.append("Liger Kernel: liger_kernel not installed (or no GPU): runs without it only")
    # Every method without Liger first, so a spent budget cuts Liger runs, not a method's
    # kubetune-vs-baseline pair.
    runs = [(m, s, liger) for liger in ligers for m in methods for s in sides]
    return runs, skipped


def run_one(job: dict[str, Any], in_process: bool, timeout_s: float) -> dict[str, Any]:
    if in_process:
        return measure(job)
    work = Path(job["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    job_file, result_file = work / "job.json", work / "result.json"
    job_file.write_text(json.dumps(job), encoding="utf-8")
    result_file.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_bench", "one", str(job_file), str(result_file)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0 or not result_file.is_file():
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
    result: dict[str, Any] = json.loads(result_file.read_text(encoding="utf-8"))
    return result


def run(settings: Settings, work_dir: Path, results_dir: Path, name: str = "gpu") -> dict[str, Any]:
    started = time.monotonic()
    load_at_start = [round(x, 1) for x in os.getloadavg()]
    work_dir.mkdir(parents=True, exist_ok=True)
    config = read_config(settings)
    model_dir = prepare_model(work_dir, settings)
    train_file = write_records(work_dir / "train.jsonl", settings)
    runs, skipped = plan_runs(settings)
    gpu_name, peak = _peak_tflops()
    results: list[RunResult] = []
    for method, side, liger in runs:
        spent = time.monotonic() - started
        if spent > settings.budget_s:
            label = f"{method} {side}{'+liger' if liger else ''}"
            skipped.append(f"{label}: the budget of {settings.budget_s:g} s was spent")
            continue
        row = RunResult(method, side, liger)
        job = {
            **asdict(settings),
            "method": method,
            "side": side,
            "liger": liger,
            "model_dir": str(model_dir),
            "model_type": config.get("model_type", ""),
            "train_file": str(train_file),
            "work_dir": str(work_dir / "runs" / f"{method}-{row.name}"),
        }
        print(f"gpu_bench: {method} {row.name} ...", file=sys.stderr, flush=True)
        try:
            measured = run_one(job, settings.in_process, max(60.0, settings.budget_s - spent + 120))
        except Exception as error:  # one side failing (a kernel, a missing extra) must not hide the rest
            row.error = f"{type(error).__name__}: {str(error)[-600:]}"
            print(f"gpu_bench: {method} {row.name} failed: {row.error}", file=sys.stderr, flush=True)
            results.append(row)
            continue
        for key in ("tokens_per_second", "real_tokens", "train_seconds", "peak_memory_bytes"):
            setattr(row, key, measured.get(key))
        row.trainable_parameters = measured.get("trainable_parameters")
        flops, estimate = _flops_and_estimate(
            config, method, row.trainable_parameters or 0, row.real_tokens or 0, settings
        )
        if peak and row.train_seconds:
            row.mfu = flops / row.train_seconds / (peak * 1e12)
        row.extra["planner_estimate"] = estimate
        print(
            f"gpu_bench: {method} {row.name}: {row.tokens_per_second or 0:.0f} tokens/s, "
            f"MFU {row.mfu if row.mfu is not None else float('nan'):.3f}, "
            f"peak {mib(row.peak_memory_bytes) if row.peak_memory_bytes else '-'} MiB",
            file=sys.stderr,
            flush=True,
        )
        results.append(row)
    document = {
        "benchmark": "gpu",
        "environment": {
            **environment(threads=int(os.environ.get("OMP_NUM_THREADS", "0") or 0)),
            "gpu": gpu_name,
            "peak_bf16_tflops": peak,
            "load_average_start": load_at_start,
            "load_average": [round(x, 1) for x in os.getloadavg()],
            "versions": _versions(),
        },
        "settings": {**asdict(settings), "config_file": settings.config},
        "model": {
            "config": settings.config,
            "layers": config.get("num_hidden_layers"),
            "hidden_size": config.get("hidden_size"),
            "vocab_size": config.get("vocab_size"),
        },
        "runs": [{**asdict(r), "name": r.name} for r in results],
        "ratios": ratios(results),
        "skipped": skipped,
        "seconds": round(time.monotonic() - started, 1),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    (results_dir / f"{name}.md").write_text(render_markdown(document), encoding="utf-8")
    return document


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for package in ("torch", "transformers", "peft", "trl", "bitsandbytes", "liger-kernel", "accelerate"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def ratios(results: list[RunResult]) -> list[dict[str, Any]]:
    """kubetune's tokens/s over each baseline's, per method, with and without Liger."""
    out = []
    speed = {(r.method, r.side, r.liger): r.tokens_per_second for r in results if r.error is None}
    for (method, side, liger), value in sorted(speed.items()):
        if side == "kubetune":
            continue
        for kubetune_liger in (False, True):
            ours = speed.get((method, "kubetune", kubetune_liger))
            if ours is None:
                continue
            out.append(
                {
                    "method": method,
                    "kubetune": f"kubetune{'+liger' if kubetune_liger else ''}",
                    "baseline": f"{side}{'+liger' if liger else ''}",
                    "ratio": ratio(ours, value),
                }
            )
    return out


def render_markdown(document: dict[str, Any]) -> str:
    env, model = document["environment"], document["model"]
    settings = document["settings"]
    lines = [
        "# GPU benchmark: LoRA, QLoRA and full fine-tuning against Trainer+PEFT and TRL",
        "",
        f"Measured {env['measured_at']} at commit `{env['git_commit']}` on {env['gpu'] or 'no GPU'} "
        f"(dense bf16 peak {env['peak_bf16_tflops'] or '?'} TFLOP/s from the planner's table); "
        f"versions {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}. "
        f"Model: `{model['config']}` config, {model['layers']} layers, hidden {model['hidden_size']}, "
        f"vocabulary {model['vocab_size']}, random init. {settings['steps']} steps, batch "
        f"{settings['batch_size']}, max length {settings['max_seq_length']}, "
        f"{'bf16' if settings['device'] == 'cuda' else 'fp32 on CPU'}, no gradient "
        f"checkpointing. Generated by `benchmarks/gpu.sh` in {document['seconds']} s.",
        "",
        markdown_table(
            [
                "method",
                "side",
                "tokens/s",
                "MFU",
                "peak allocated MiB",
                "planner estimate MiB (+ context)",
                "peak / estimate",
                "trainable params",
                "error",
            ],
            [
                [
                    run["method"],
                    run["name"],
                    run["tokens_per_second"],
                    run["mfu"],
                    mib(run["peak_memory_bytes"]) if run["peak_memory_bytes"] else None,
                    _estimate_cell(run["extra"].get("planner_estimate")),
                    _peak_over_estimate(run),
                    run["trainable_parameters"],
                    run["error"] or "",
                ]
                for run in document["runs"]
            ],
        ),
        "",
        "## kubetune's tokens/s over each baseline's",
        "",
        markdown_table(
            ["method", "kubetune", "baseline", "ratio"],
            [[r["method"], r["kubetune"], r["baseline"], r["ratio"]] for r in document["ratios"]],
        ),
    ]
    if document["skipped"]:
        lines += ["", "## Not run", "", *(f"- {reason}" for reason in document["skipped"])]
    lines += [
        "",
        "- tokens/s: real (non-padding) tokens over the training loop; MFU: the planner's training "
        "FLOPs for those tokens (6N for full, 4N + 6 x trainable for adapters, plus attention) over "
        "the loop's seconds and the GPU's dense bf16 peak.",
        "- attention: transformers' default (SDPA) on every side; TRL's padding-free packing is "
        "meant for flash-attention kernels, which an offline machine usually lacks.",
        "- peak allocated: `torch.cuda.max_memory_allocated` over the run; the planner's estimate "
        "is weights + gradients + optimizer + activations + the logits' gradient, and its fixed "
        "CUDA-context overhead (which max_memory_allocated does not see) in brackets.",
        "",
    ]
    return "\n".join(lines)


def _peak_over_estimate(run: dict[str, Any]) -> float | None:
    """Measured peak over the estimate without its CUDA-context overhead (what both count)."""
    estimate = run["extra"].get("planner_estimate") or {}
    counted = sum(estimate.values()) - estimate.get("overhead", 0)
    return ratio(run["peak_memory_bytes"], counted) if counted else None


def _estimate_cell(estimate: dict[str, int] | None) -> str:
    if not estimate:
        return "-"
    overhead = estimate.get("overhead", 0)
    return f"{mib(sum(estimate.values()) - overhead):,.4g} (+{mib(overhead):,.4g})"


# ---------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("one", help="one measurement (internal: a subprocess of run)")
    one.add_argument("job", type=Path)
    one.add_argument("result", type=Path)
    bench = sub.add_parser("run", help="the whole benchmark")
    bench.add_argument(
        "--config", default=defaults.config, help="a config.json path or a name in tests/planner/configs"
    )
    bench.add_argument("--layers", type=int, default=None, help="decoder layers kept (default: all)")
    bench.add_argument("--methods", default=",".join(defaults.methods))
    bench.add_argument("--sides", default=",".join(defaults.sides))
    bench.add_argument("--no-liger", action="store_true", help="skip the Liger Kernel runs")
    bench.add_argument("--steps", type=int, default=defaults.steps)
    bench.add_argument("--batch-size", type=int, default=defaults.batch_size)
    bench.add_argument("--max-seq-length", type=int, default=defaults.max_seq_length)
    bench.add_argument("--records", type=int, default=defaults.records)
    bench.add_argument("--device", choices=("cuda", "cpu"), default=defaults.device)
    bench.add_argument(
        "--budget-s", type=float, default=defaults.budget_s, help="seconds after which no run starts"
    )
    bench.add_argument("--in-process", action="store_true", help="no subprocess per run (tests)")
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "kubetune-gpu-bench"
    bench.add_argument("--work-dir", type=Path, default=scratch)
    bench.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    bench.add_argument("--name", default="gpu", help="results file name, without suffix")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "one":
        result = measure(json.loads(args.job.read_text(encoding="utf-8")))
        args.result.write_text(json.dumps(result), encoding="utf-8")
        return 0
    methods = tuple(m for m in args.methods.split(",") if m)
    sides = tuple(s for s in args.sides.split(",") if s)
    for value, known, flag in ((methods, METHODS, "--methods"), (sides, SIDES, "--sides")):
        unknown = [v for v in value if v not in known]
        if unknown:
            raise SystemExit(f"{flag}: unknown {unknown}; known: {', '.join(known)}")
    settings = Settings(
        config=args.config,
        layers=args.layers,
        methods=methods,
        sides=sides,
        liger=not args.no_liger,
        steps=args.steps,
        batch_size=args.batch_size,
        max_seq_length=args.max_seq_length,
        records=args.records,
        device=args.device,
        budget_s=args.budget_s,
        in_process=args.in_process,
    )
    document = run(settings, args.work_dir, args.results_dir, args.name)
    print((args.results_dir / f"{args.name}.md").read_text(encoding="utf-8"))
    failed = [r for r in document["runs"] if r["error"]]
    return 1 if failed and len(failed) == len(document["runs"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
