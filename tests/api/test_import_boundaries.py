"""One direction of dependency, checked mechanically.

Aspects:
- the API (with the method registry), the planner, the operator and the worker's plan contract
  import with torch (and friends) unavailable;
- the worker never imports the operator.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "kubetune"
WORKER_CONTRACT = ("kubetune.worker.plan", "kubetune.worker.errors", "kubetune.worker.serving_plan")
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def _modules(subpackage: str) -> list[str]:
    root = PACKAGE / subpackage
    return sorted(
        "kubetune." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        for p in root.rglob("*.py")
    )


def test_torch_free_modules_import_without_torch() -> None:
    modules = ["kubetune", "kubetune.cli", *_modules("api"), *_modules("operator"), *_modules("planner")]
    modules += [*WORKER_CONTRACT, "kubetune.worker.train_cli", "kubetune.worker.serve_cli"]
    # A meta path finder that refuses the heavy packages, as if they were not installed.
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {HEAVY!r}:
            raise ModuleNotFoundError(f"blocked import of {{name}}")
sys.meta_path.insert(0, Block())
import importlib
for module in {modules!r}:
    importlib.import_module(module)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_worker_never_imports_the_operator() -> None:
    for path in (PACKAGE / "worker").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.startswith("kubetune.operator") for n in names), f"{path} imports the operator"


def test_operator_imports_only_the_worker_contract() -> None:
    """From the worker, the operator may import its contract (the plan schema and the exit codes)."""
    for path in (PACKAGE / "operator").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module == "kubetune.worker":
                modules = [f"kubetune.worker.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                if module.startswith("kubetune.worker"):
                    assert module in WORKER_CONTRACT, f"{path} imports {module}"
