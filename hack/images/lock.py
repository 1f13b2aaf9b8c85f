"""The images' lock files: exact wheels, with hashes, for the operator and the two worker variants.

    python hack/images/lock.py            rewrite hack/images/requirements-*.txt
    python hack/images/lock.py --check    exit 1 when they disagree with pyproject.toml or
                                          hack/requirements.txt (run by build.sh and the tests)
    python hack/images/lock.py --platform-args   pip's options for the images' platform

The top-level requirements come from pyproject.toml (``dependencies`` for the operator, plus the
``train`` and ``serve`` extras for the worker), every version from hack/requirements.txt, and pip's
resolver closes the set, for CPython 3.11 on manylinux x86_64 whatever the host is. The result is
written as ``name==version --hash=sha256:...`` lines, so the image build installs exactly these
files with ``--no-deps --require-hashes`` and never resolves anything itself.

The CPU worker is the CUDA set minus ``CPU_EXCLUDED``: PyPI's Linux torch wheel needs some CUDA
libraries to import at all, even without a GPU, so those stay; triton and the CUDA libraries that
only GPU code loads go. How that was measured: docs/images.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PINS = REPO / "hack" / "requirements.txt"
PYPROJECT = REPO / "pyproject.toml"

# Packages of the CUDA worker that the CPU worker does without. PyPI's torch links its CUDA
# build against cudart, cupti, cublas, cudnn, cufft, cufile, cusparse, cusparseLt, nccl, nvrtc
# and nvshmem: without any one of them `import torch` fails, GPU or not. These others are loaded
# only by GPU code (or never): with them absent, torch, transformers, peft and bitsandbytes
# import, and a LoRA step and 4-bit quantisation run on CPU (docs/images.md, tests/images).
CPU_EXCLUDED = frozenset(
    {
        "triton",  # torch.compile's GPU code generator (1 GB)
        "nvidia-cusolver",  # linear algebra on GPU; torch loads libtorch_cuda_linalg lazily
        "nvidia-nvjitlink",  # JIT linking of GPU code
        "nvidia-cuda-cccl",  # C++ headers
        "nvidia-nvtx",  # profiler annotations, optional
        "cuda-bindings",  # Python bindings to the driver, used by triton
        "cuda-pathfinder",  # finds CUDA libraries for cuda-bindings
    }
)

# Resolved by pip although hack/requirements.txt (a `pip freeze`) leaves them out; pinned here.
UNPINNED_ALLOWED = frozenset({"setuptools"})

# The platform the images run on: the base image's CPython 3.11 on glibc 2.36 (bookworm).
PLATFORM_ARGS = [
    "--only-binary=:all:",
    "--python-version=3.11",
    "--implementation=cp",
    "--abi=cp311",
    *(f"--platform=manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)),
    "--platform=manylinux2014_x86_64",
    "--platform=manylinux2010_x86_64",
    "--platform=manylinux1_x86_64",
]

SETS = ("operator", "worker-cuda", "worker-cpu", "build")
# The image build's own tools: setuptools builds the kubetune wheel (pyproject's build-system;
# setuptools >= 70.1 needs no `wheel` package).
BUILD_TOOLS = ("setuptools",)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins() -> dict[str, str]:
    pins = {}
    for line in PINS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonical(name)] = version.strip()
    return pins


def top_level() -> dict[str, list[str]]:
    """The requirement strings each image installs, from pyproject.toml."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project["optional-dependencies"]
    worker = [r for extra in ("train", "serve") for r in extras[extra] if not r.startswith("kubetune")]
    return {
        "operator": list(project["dependencies"]),
        "worker": [*project["dependencies"], *worker],
        "build": list(BUILD_TOOLS),
    }


def resolve(requirements: list[str], pins: dict[str, str], python: str) -> dict[str, tuple[str, str]]:
    """name -> (version, sha256) of the closure of ``requirements``, pinned by ``pins``."""
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp, "constraints.txt")
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()))
        report = Path(tmp, "report.json")
        command = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        command += ["--no-cache-dir", "--target", str(Path(tmp, "target")), "--report", str(report)]
        command += [*PLATFORM_ARGS, "-c", str(constraints), *requirements]
        subprocess.run(command, check=True)
        installs = json.loads(report.read_text())["install"]
    resolved = {}
    for item in installs:
        name = canonical(item["metadata"]["name"])
        sha256 = item["download_info"]["archive_info"]["hashes"]["sha256"]
        resolved[name] = (item["metadata"]["version"], sha256)
    return resolved


def render(name: str, resolved: dict[str, tuple[str, str]]) -> str:
    header = [
        f"# {name}: generated by hack/images/lock.py from pyproject.toml and hack/requirements.txt.",
        "# Do not edit; rerun `python hack/images/lock.py` after changing either.",
    ]
    lines = [f"{pkg}=={version} --hash=sha256:{sha}" for pkg, (version, sha) in sorted(resolved.items())]
    return "\n".join([*header, *lines]) + "\n"


def parse_lock(path: Path) -> dict[str, str]:
    """name -> version of a lock file."""
    locked = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, rest = line.partition("==")
            locked[name] = rest.split()[0]
    return locked


def lock_path(name: str) -> Path:
    return HERE / f"requirements-{name}.txt"


def problems() -> list[str]:
    """Why the lock files disagree with the pins and pyproject.toml (empty when they agree)."""
    pins = read_pins()
    found = []
    wanted = top_level()
    for name in SETS:
        path = lock_path(name)
        if not path.exists():
            found.append(f"{path.relative_to(REPO)} is missing")
            continue
        locked = parse_lock(path)
        for pkg, version in locked.items():
            if pkg in pins and pins[pkg] != version:
                found.append(f"{path.name}: {pkg}=={version}, but hack/requirements.txt pins {pins[pkg]}")
            elif pkg not in pins and pkg not in UNPINNED_ALLOWED:
                found.append(f"{path.name}: {pkg} is not pinned in hack/requirements.txt")
        for requirement in wanted[name.split("-")[0]]:
            pkg = canonical(re.split(r"[<>=!~; \[]", requirement, maxsplit=1)[0])
            if pkg not in locked:
                found.append(f"{path.name}: {pkg} from pyproject.toml is missing")
    if not found:
        cuda, cpu = parse_lock(lock_path("worker-cuda")), parse_lock(lock_path("worker-cpu"))
        if cpu != {pkg: v for pkg, v in cuda.items() if pkg not in CPU_EXCLUDED}:
            found.append("requirements-worker-cpu.txt is not requirements-worker-cuda.txt minus CPU_EXCLUDED")
    return found


def write_locks(python: str) -> None:
    pins = read_pins()
    wanted = top_level()
    cuda = resolve(wanted["worker"], pins, python)
    locks = {
        "operator": resolve(wanted["operator"], pins, python),
        "worker-cuda": cuda,
        "worker-cpu": {pkg: value for pkg, value in cuda.items() if pkg not in CPU_EXCLUDED},
        # The worker's setuptools (torch needs it too), so the two never differ; no dependencies.
        "build": {tool: cuda[tool] for tool in BUILD_TOOLS},
    }
    for name, resolved in locks.items():
        lock_path(name).write_text(render(name, resolved))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--check", action="store_true", help="only check the lock files, exit 1 on drift")
    parser.add_argument("--python", default=sys.executable, help="the interpreter whose pip resolves")
    parser.add_argument("--platform-args", action="store_true", help="print pip's platform options")
    args = parser.parse_args()
    if args.platform_args:
        print("\n".join(PLATFORM_ARGS))
        return 0
    if not args.check:
        write_locks(args.python)
    found = problems()
    for problem in found:
        print(f"lock: {problem}", file=sys.stderr)
    if found:
        print("lock: run `python hack/images/lock.py` and commit the result", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
