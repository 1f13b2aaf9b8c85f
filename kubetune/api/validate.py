"""``kubetune validate``: check manifests offline against the same rules the apiserver enforces.

Meant for GitOps pipelines and pre-commit hooks: it catches a bad FineTuneJob or AdapterDeployment
before it reaches a cluster. Documents of other kinds are skipped. Transition rules (immutability)
need the stored object and are left to the apiserver.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune.api import v1alpha1

MODELS = {resource.kind_info["kind"]: resource for resource in v1alpha1.RESOURCES}  # type: ignore[attr-defined]


def _documents(path: Path) -> Iterator[tuple[str, int, Any]]:
    files = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
    for file in files:
        text = sys.stdin.read() if str(file) == "-" else file.read_text()
        for index, document in enumerate(yaml.safe_load_all(text)):
            yield str(file), index, document


def validate_document(document: Any) -> list[str]:
    """Problems with one parsed document (empty when valid or not a kubetune kind)."""
    if not isinstance(document, dict) or document.get("apiVersion") != v1alpha1.API_VERSION:
        return []
    model = MODELS.get(str(document.get("kind")))
    if model is None:
        return [f"unknown kind {document.get('kind')!r} in {v1alpha1.API_VERSION}"]
    try:
        model.model_validate(document)
    except ValidationError as error:
        return [
            f"{'.'.join(str(part) for part in problem['loc']) or '<root>'}: {problem['msg']}"
            for problem in error.errors()
        ]
    return []


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, help="YAML files or directories ('-' for stdin)")


def run(args: argparse.Namespace) -> int:
    checked = failed = 0
    for path in args.paths:
        for file, index, document in _documents(path):
            problems = validate_document(document)
            if isinstance(document, dict) and document.get("apiVersion") == v1alpha1.API_VERSION:
                checked += 1
            name = (
                (document or {}).get("metadata", {}).get("name", "?") if isinstance(document, dict) else "?"
            )
            for problem in problems:
                print(f"{file}[{index}] {name}: {problem}")
            failed += bool(problems)
    print(f"{checked} kubetune object(s) checked, {failed} invalid", file=sys.stderr)
    return 1 if failed else 0
