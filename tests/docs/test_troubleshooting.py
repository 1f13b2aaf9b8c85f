"""docs/troubleshooting.md covers every condition reason the code can set.

Aspects:
- the reasons are read from the code, not listed by hand: the worker's typed errors (the exit-code
  table), and in the operator and the serving runtime every CamelCase constant in a reason
  position: the reason argument of a condition builder, a ``"reason"`` dict entry, an assignment to
  a ``*reason`` name (both arms of a conditional, every name a ``next(f"..." for ...)`` template
  makes), the planner's ``Assessment`` reason, the first element a ``(reason, message)``
  function returns, and the reason an ``AdapterLoadError`` is raised with;
- each of them has its own entry (a ``### `Reason` `` heading) on the page, and the page documents
  no reason the code cannot set.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CAMEL = re.compile(r"^[A-Z][a-z]+(?:[A-Z][a-z0-9]*)*$")
SCANNED = ("kubetune/operator", "kubetune/worker/serving.py")


def _constants(node: ast.AST | None) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _constants(node.body) + _constants(node.orelse)
    if (  # next(f"Prefix{s}" for s in ("A", "B")): every name the template can make
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "next"
        and node.args
        and isinstance(node.args[0], ast.GeneratorExp)
        and isinstance(node.args[0].elt, ast.JoinedStr)
        and isinstance(node.args[0].generators[0].iter, ast.Tuple)
    ):
        template, loop = node.args[0].elt, node.args[0].generators[0]
        found = []
        for value in _constants_of(loop.iter.elts):  # type: ignore[attr-defined]
            parts = [part.value if isinstance(part, ast.Constant) else value for part in template.values]
            found.append("".join(str(part) for part in parts))
        return found
    return []


def _constants_of(nodes: list[ast.expr]) -> list[str]:
    return [c for n in nodes for c in _constants(n)]


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _reason_values(tree: ast.AST) -> list[str]:
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _call_name(node)
            if name in ("_condition", "condition", "_failed", "Assessment"):  # (kind, status, reason, ...)
                found += _constants(node.args[2]) if len(node.args) > 2 else []
            if name == "AdapterLoadError" and node.args:
                found += _constants(node.args[0])
            found += [c for kw in node.keywords if kw.arg == "reason" for c in _constants(kw.value)]
        elif isinstance(node, ast.Dict):
            found += [
                c
                for key, value in zip(node.keys, node.values, strict=True)
                if isinstance(key, ast.Constant) and key.value == "reason"
                for c in _constants(value)
            ]
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id.endswith("reason"):
                    found += _constants(node.value)
                elif isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    for element, value in zip(target.elts, node.value.elts, strict=False):
                        if isinstance(element, ast.Name) and element.id.endswith("reason"):
                            found += _constants(value)
        elif isinstance(node, ast.FunctionDef) and ast.unparse(node.returns or ast.Constant(None)) in (
            "tuple[str, str]",
        ):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Return) and isinstance(inner.value, ast.Tuple) and inner.value.elts:
                    found += _constants(inner.value.elts[0])
    return found


def reasons_in_code() -> set[str]:
    from kubetune.worker.errors import RETRYABLE

    reasons = set(RETRYABLE)
    for entry in SCANNED:
        path = ROOT / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            reasons.update(_reason_values(ast.parse(file.read_text(encoding="utf-8"))))
    return {r for r in reasons if CAMEL.match(r)}


def reasons_on_page() -> set[str]:
    text = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    return set(re.findall(r"^### `([A-Za-z]+)`", text, flags=re.MULTILINE))


def test_the_scan_finds_reasons_from_every_source() -> None:
    reasons = reasons_in_code()
    # One from each kind of position, so a scan that silently stopped matching fails here.
    for expected in ("DatasetInvalid", "PlanInvalid", "Queued", "OutOfMemory", "WorkerFailed"):
        assert expected in reasons
    for expected in ("AdapterFailed", "Unsupported", "HashMismatch", "LoadError", "NotReady"):
        assert expected in reasons


def test_every_reason_the_code_can_set_is_documented() -> None:
    missing = sorted(reasons_in_code() - reasons_on_page())
    assert not missing, f"docs/troubleshooting.md lacks an entry for: {', '.join(missing)}"


def test_the_page_documents_no_reason_the_code_cannot_set() -> None:
    stale = sorted(reasons_on_page() - reasons_in_code())
    assert not stale, f"docs/troubleshooting.md documents reasons no code sets: {', '.join(stale)}"
