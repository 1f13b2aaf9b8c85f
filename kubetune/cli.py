"""The ``kubetune`` command line.

Each subcommand lives in its own module, imported only when that subcommand runs, so
``kubetune crds`` or ``kubetune operator`` never pay for (or require) torch. A subcommand
module provides ``add_arguments(parser)`` and ``run(args) -> int`` and must not import
heavy dependencies at module level.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help). Kept as strings so listing the commands imports nothing.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "operator": (
        "kubetune.operator.main",
        "run the operator (FineTuneJob and AdapterDeployment controllers)",
    ),
    "crds": ("kubetune.api.crdgen", "write the CustomResourceDefinitions generated from the API models"),
    "validate": (
        "kubetune.api.validate",
        "check kubetune manifests offline, as admission would (for GitOps)",
    ),
    "plan": ("kubetune.planner.cli", "parameters, memory, time and cost of every method for a model and job"),
    "cluster": (
        "kubetune.localcluster.cli",
        "start/stop the embedded local Kubernetes cluster (tests, demo)",
    ),
    "train": ("kubetune.worker.train_cli", "run a TrainingPlan (the worker pod's entry point)"),
    "serve": ("kubetune.worker.serve_cli", "serve a base model and adapters over an OpenAI-compatible API"),
    "compare": (
        "kubetune.compare",
        "compare FineTuneJobs that share a label: cost, speed, quality, forgetting",
    ),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description=__doc__.splitlines()[0] if __doc__ else "")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported, to keep `kubetune --help` light.
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    result: int = args._module.run(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
