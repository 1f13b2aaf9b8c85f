"""docs/api.md against the CRDs.

Aspects:
- the page is exactly what the generator makes from crds/ (so a CRD change without `make crds`
  fails here);
- every spec field of both kinds, and every CEL rule's message, appears on the page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kubetune.api import apidoc

ROOT = Path(__file__).resolve().parents[2]


def test_the_page_matches_the_crds() -> None:
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert page == apidoc.render(ROOT / "crds"), "docs/api.md is out of date: run `make crds`"


def _paths(node: dict[str, Any], path: str) -> list[str]:
    target = node.get("items") if node.get("type") == "array" else node
    suffix = "[]" if node.get("type") == "array" else ""
    found = [path]
    for name, child in ((target or {}).get("properties") or {}).items():
        found += _paths(child, f"{path}{suffix}.{name}")
    return found


def test_every_field_and_rule_is_documented() -> None:
    page = apidoc.render(ROOT / "crds")
    for file in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(file.read_text())
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        paths = _paths(schema["properties"]["spec"], "spec")
        assert len(paths) > 10
        for path in paths:
            assert f"| `{path}` |" in page, path
        rules = _rules(schema)
        assert rules
        for message in rules:
            assert " ".join(message.split()).replace("|", "\\|") in page, message


def _rules(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [r.get("message", "") for r in node.get("x-kubernetes-validations") or []]
        return own + [m for value in node.values() for m in _rules(value)]
    if isinstance(node, list):
        return [m for value in node for m in _rules(value)]
    return []
