"""``kubetune train``: the worker pod's entry point.

The plan comes from ``--plan FILE`` or, failing that, the ``KUBETUNE_PLAN`` environment variable (JSON
text or a path). Exit status: 0 on success, otherwise the failure's code from
:mod:`kubetune.worker.errors` (143 after a SIGTERM was turned into a checkpoint), with one line
``Reason: message`` written to the termination message path. On success rank 0 writes a one-line JSON
summary there instead (:func:`kubetune.worker.artifact.success_summary`: uri, sha256 of
``kubetune.json``, sizeBytes, format, metrics, final progress), which the operator copies into
``status.result``.

Nothing heavy is imported at module level: ``kubetune.cli`` imports this module to build its parser.
Before torch is imported at all, :func:`preflight` reads and checks every dataset file and that the
model directory exists, where they are on local storage (``pvc://``, ``file://``): a bad dataset
fails in the time it takes to read it, not after the seconds torch, transformers and peft take to
import.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback

from kubetune.worker import skip_bitsandbytes
from kubetune.worker.errors import KubetuneError, PlanInvalid, write_termination_message
from kubetune.worker.plan import PLAN_ENV_VAR, TrainingPlan, load_plan

TERMINATION_ENV_VAR = "KUBETUNE_TERMINATION_MESSAGE_PATH"
logger = logging.getLogger("kubetune.train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plan",
        metavar="FILE",
        default=None,
        help=f"TrainingPlan JSON file (default: ${PLAN_ENV_VAR}, which holds JSON text or a path)",
    )
    parser.add_argument(
        "--termination-message-path",
        metavar="PATH",
        default=None,
        help=f"where the one-line failure reason goes (default: ${TERMINATION_ENV_VAR}, else the plan's "
        "progress.termination_message_path, else /dev/termination-log)",
    )
    parser.add_argument("--log-level", default="INFO", help="Python logging level (default INFO)")


def _read_plan(args: argparse.Namespace) -> TrainingPlan:
    source = args.plan or os.environ.get(PLAN_ENV_VAR)
    if not source:
        raise PlanInvalid(f"no plan: pass --plan FILE or set {PLAN_ENV_VAR}")
    try:
        return load_plan(source)
    except OSError as exc:
        raise PlanInvalid(f"cannot read the plan {source}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        # pydantic lists every problem on its own lines; the termination message keeps the first ones.
        raise PlanInvalid(f"invalid plan: {'; '.join(str(exc).splitlines()[:4])}") from exc


def preflight(plan: TrainingPlan) -> None:
    """Check the plan's local sources without torch: every record of each dataset file, and that the
    model directory exists with its config. Remote sources (``hf://``, ``s3://``) are checked by the
    engine once downloaded. Raises the engine's errors (DatasetInvalid, DatasetNotFound,
    ModelNotFound)."""
    from kubetune.worker import data, sources

    dataset = plan.dataset
    fmt: str = dataset.format
    for uri, uri_format in ((dataset.uri, fmt), (dataset.eval_uri, None), (dataset.retention_uri, "auto")):
        if uri is None or sources.local_path(uri, plan.storage) is None:
            continue
        path = sources.resolve_file(uri, plan.storage)
        _, found = data.load_records(path, uri_format or fmt)
        if uri == dataset.uri:
            fmt = found  # the eval file must have the training file's format
    if sources.local_path(plan.model.uri, plan.storage) is not None:
        sources.resolve_model(plan.model.uri, plan.model.revision, plan.model.token_env, plan.storage)


def _quantizes(plan: TrainingPlan) -> bool:
    """Whether this run may need bitsandbytes: QLoRA, or a base whose config names a quantization
    (also when the config cannot be read here: a remote model is checked once downloaded)."""
    from kubetune.worker import sources

    if plan.method.type == "qlora":
        return True
    local = sources.local_path(plan.model.uri, plan.storage)
    if local is None:
        return True
    try:
        config = json.loads((local / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return not isinstance(config, dict) or "quantization_config" in config


def _configure_logging(args: argparse.Namespace) -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s",
        stream=sys.stderr,
    )


def check(args: argparse.Namespace) -> int:
    """Read the plan and run :func:`preflight`, as :func:`run` does first, without importing torch:
    0, or the failure's exit code after writing its termination message. The multi-node launcher
    calls it before torchrun starts, so a bad dataset fails a group as fast as one pod."""
    _configure_logging(args)
    termination_path = args.termination_message_path or os.environ.get(TERMINATION_ENV_VAR)
    try:
        plan = _read_plan(args)
        preflight(plan)
    except KubetuneError as exc:
        message = exc.termination_message()
        logger.error("%s", message)
        write_termination_message(termination_path or "/dev/termination-log", message)
        return exc.exit_code
    return 0


def run(args: argparse.Namespace) -> int:
    _configure_logging(args)
    termination_path = args.termination_message_path or os.environ.get(TERMINATION_ENV_VAR)
    try:
        plan = _read_plan(args)
        termination_path = termination_path or plan.progress.termination_message_path
        preflight(plan)
        if not _quantizes(plan):
            skip_bitsandbytes()
        from kubetune.worker.engine import configure_threads, train  # torch is imported only here

        # The process, not the library, owns the thread pool: in-process callers keep their settings.
        configure_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        manifest = train(plan)
    except KubetuneError as exc:
        message = exc.termination_message()
        logger.error("%s", message)
        write_termination_message(termination_path or "/dev/termination-log", message)
        return exc.exit_code
    except Exception as exc:
        logger.error("unexpected failure:\n%s", traceback.format_exc())
        error = KubetuneError(f"{type(exc).__name__}: {exc}")
        write_termination_message(termination_path or "/dev/termination-log", error.termination_message())
        return error.exit_code
    if manifest:
        from kubetune.worker.artifact import success_summary

        logger.info("done: %s", manifest.get("metrics", {}))
        if os.environ.get("RANK", "0") == "0":
            write_termination_message(
                termination_path or "/dev/termination-log", success_summary(manifest, plan.output.uri)
            )
    return 0
