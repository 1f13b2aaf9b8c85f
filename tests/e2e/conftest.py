"""The end-to-end suite runs on real containers: the local cluster's node starts every container
with podman from the image the pod names, or, with ``KUBECONFIG`` set, any cluster (kind) that
has the images loaded.

Fixtures:
* ``cluster`` (session): overrides the process-runtime cluster of the other suites.
* ``images`` (session): the refs ``make images`` built, from ``_out/images.env``.
* ``operator_args``: the shared ``operator`` fixture's workers run from the worker image.
* ``base_image`` (session): the images' Debian base (python3, root user), for runtime tests.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.localcluster.pytest_plugin import session_cluster
from kubetune.localcluster.testing import BuiltImages, ClusterHandle

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterHandle]:
    yield from session_cluster(runtime="podman")


def _missing(reason: str) -> None:
    if os.environ.get("KUBETUNE_REQUIRE_IMAGES"):
        pytest.fail(f"{reason} (run `make images`)", pytrace=False)
    pytest.skip(f"{reason}; run `make images`")


@pytest.fixture(scope="session")
def images() -> BuiltImages:
    env_file = ROOT / "_out" / "images.env"
    try:
        return BuiltImages.read(env_file)
    except FileNotFoundError:
        _missing(f"{env_file} not found")
    except KeyError as exc:
        _missing(f"{env_file} names no {exc.args[0]}")
    raise AssertionError("unreachable")


@pytest.fixture
def operator_args(images: BuiltImages) -> list[str]:
    """The local-process operator (tests/fixtures.py) starts workers from the worker image."""
    return ["--worker-image", images.worker]


@pytest.fixture(scope="session")
def base_image(cluster: ClusterHandle) -> str:
    if not cluster.is_local:
        pytest.skip("runtime tests need the local cluster's podman node")
    env = dict(os.environ)
    setup = subprocess.run(
        ["bash", str(ROOT / "hack/images/containers.sh")], capture_output=True, text=True, check=False
    )
    if setup.returncode != 0:
        _missing(f"no container engine: {setup.stderr.strip()}")
    for line in setup.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    built = subprocess.run(
        ["bash", str(ROOT / "hack/images/base.sh")], capture_output=True, text=True, env=env, check=False
    )
    if built.returncode != 0:
        _missing(f"base image: {built.stderr.strip()[-2000:]}")
    return built.stdout.strip().splitlines()[-1]
