"""Where the control-plane binaries are: built by ``hack/localcluster/build.sh`` into a cache.

``KUBETUNE_CLUSTER_BIN`` may name a directory holding all of them instead (e.g. binaries
from an envtest download), which skips the build script entirely.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

NAMES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd", "helm")


class BinariesMissing(RuntimeError):
    """The cluster binaries are not built; ``make cluster-build`` builds them."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def build_script() -> Path:
    return repo_root() / "hack" / "localcluster" / "build.sh"


def find(build: bool = False) -> dict[str, Path]:
    """Map each binary name to its path; with ``build=True`` build what is missing first."""
    override = os.environ.get("KUBETUNE_CLUSTER_BIN")
    if override:
        paths = {name: Path(override) / name for name in NAMES}
    else:
        script = build_script()
        if not script.is_file():
            raise BinariesMissing(f"{script} not found; set KUBETUNE_CLUSTER_BIN to a directory of binaries")
        args = ["bash", str(script)] + ([] if build else ["--print-paths"])
        # The build reports progress on stderr; let it through so a cold build is not silent.
        proc = subprocess.run(args, stdout=subprocess.PIPE, text=True, check=False)
        paths = {}
        for line in proc.stdout.splitlines():
            name, sep, path = line.partition("=")
            if sep:
                paths[name] = Path(path)
        if proc.returncode != 0 and not build:
            missing = [n for n, p in paths.items() if not p.exists()]
            raise BinariesMissing(
                f"cluster binaries not built ({', '.join(missing)}): run `make cluster-build`"
            )
        if proc.returncode != 0:
            raise BinariesMissing(f"{script} failed with exit code {proc.returncode}")
    missing = [name for name in NAMES if not paths.get(name, Path("/nonexistent")).is_file()]
    if missing:
        raise BinariesMissing(f"missing cluster binaries: {', '.join(missing)}; run `make cluster-build`")
    return paths
