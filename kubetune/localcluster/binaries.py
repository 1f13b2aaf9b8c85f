"""Where the control-plane binaries are: built by ``hack/localcluster/build.sh`` into a cache.

``KUBETUNE_CLUSTER_BIN`` may name a directory holding all of them instead (e.g. binaries
from an envtest download), which skips the build script entirely. Kueue, which only some
tests run, is built apart by ``hack/localcluster/build-kueue.sh`` (:func:`find_kueue`).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NAMES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd", "helm")
# A second build of the same version swaps its finished directory in by removing the old one
# first; for that moment the script reports it unbuilt. Asking again rides it out.
_PRINT_ATTEMPTS = 5
_PRINT_RETRY_S = 0.5


class BinariesMissing(RuntimeError):
    """The cluster binaries are not built; ``make cluster-build`` builds them."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def build_script() -> Path:
    return repo_root() / "hack" / "localcluster" / "build.sh"


def kueue_build_script() -> Path:
    return repo_root() / "hack" / "localcluster" / "build-kueue.sh"


def cache_dir() -> Path:
    """The build scripts' cache (``KUBETUNE_CACHE``, else ``$XDG_CACHE_HOME/kubetune``)."""
    explicit = os.environ.get("KUBETUNE_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubetune"


@contextmanager
def build_lock() -> Iterator[None]:
    """One builder at a time (``make cluster-build`` takes the same lock with flock(1)).

    Two builds of the same directory both run to the end, and the later one deletes the
    earlier one's result before renaming its own into place: a reader in between sees a
    version that was complete a moment ago reported as unbuilt.
    """
    path = cache_dir() / "bin" / ".build.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _parse(stdout: str) -> dict[str, Path]:
    paths = {}
    for line in stdout.splitlines():
        name, sep, path = line.partition("=")
        if sep:
            paths[name] = Path(path)
    return paths


def find(build: bool = False) -> dict[str, Path]:
    """Map each binary name to its path; with ``build=True`` build what is missing first."""
    override = os.environ.get("KUBETUNE_CLUSTER_BIN")
    if override:
        paths = {name: Path(override) / name for name in NAMES}
    else:
        script = build_script()
        if not script.is_file():
            raise BinariesMissing(f"{script} not found; set KUBETUNE_CLUSTER_BIN to a directory of binaries")
        paths = _build(script) if build else _print_paths(script)
    missing = [name for name in NAMES if not paths.get(name, Path("/nonexistent")).is_file()]
    if missing:
        raise BinariesMissing(f"missing cluster binaries: {', '.join(missing)}; run `make cluster-build`")
    return paths


def _build(script: Path) -> dict[str, Path]:
    with build_lock():
        # The build reports progress on stderr; let it through so a cold build is not silent.
        proc = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise BinariesMissing(f"{script} failed with exit code {proc.returncode}")
    return _parse(proc.stdout)


def _print_paths(script: Path) -> dict[str, Path]:
    for attempt in range(_PRINT_ATTEMPTS):
        proc = subprocess.run(
            ["bash", str(script), "--print-paths"], capture_output=True, text=True, check=False
        )
        paths = _parse(proc.stdout)
        if proc.returncode == 0:
            return paths
        absent = [name for name in NAMES if not paths.get(name, Path("/nonexistent")).exists()]
        if paths and absent:
            raise BinariesMissing(
                f"cluster binaries not built ({', '.join(absent)}): run `make cluster-build`"
            )
        if attempt + 1 < _PRINT_ATTEMPTS:
            time.sleep(_PRINT_RETRY_S * 2**attempt)
    # Still refused although nothing is absent: say what the script saw, not "not built ()".
    stderr = proc.stderr.strip()
    if not paths:
        raise BinariesMissing(
            f"{script} --print-paths exited with {proc.returncode} and printed no paths"
            + (f": {stderr}" if stderr else "")
        )
    unmarked = sorted({str(p.parent) for p in paths.values() if not (p.parent / ".complete").exists()})
    raise BinariesMissing(
        f"{script} --print-paths exited with {proc.returncode}: every binary exists, but "
        f"{', '.join(unmarked) or 'its directories'} lack the .complete marker a finished build "
        "leaves (a build of the same version is running, or one was interrupted): run `make cluster-build`"
        + (f" ({stderr})" if stderr else "")
    )


def find_kueue(build: bool = False) -> Path:
    """Kueue's controller binary; its ``config/`` (CRDs, webhooks, default Configuration) lies
    beside it. With ``build=True`` it is built first when missing (a cold build takes many
    minutes). ``KUBETUNE_KUEUE_DIR`` may name such a directory instead."""
    override = os.environ.get("KUBETUNE_KUEUE_DIR")
    if override:
        binary = Path(override) / "kueue"
    else:
        script = kueue_build_script()
        args = ["bash", str(script)] + ([] if build else ["--print-paths"])
        proc = subprocess.run(
            args, stdout=subprocess.PIPE, stderr=None if build else subprocess.PIPE, text=True, check=False
        )
        paths = _parse(proc.stdout)
        if proc.returncode != 0 or "kueue" not in paths:
            how = "failed" if build else "says it is not built"
            raise BinariesMissing(
                f"{script} {how} (exit code {proc.returncode}): run `make kueue-build` "
                f"or `bash {script}`{': ' + proc.stderr.strip() if proc.stderr else ''}"
            )
        binary = paths["kueue"]
    if not binary.is_file() or not (binary.parent / "config").is_dir():
        raise BinariesMissing(f"Kueue not found at {binary} (with config/ beside it): run `make kueue-build`")
    return binary
