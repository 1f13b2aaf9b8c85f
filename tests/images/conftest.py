"""Fixtures for the image tests: the refs `make images` wrote, and a runner that starts a container
the way a pod with kubetune's security context runs (docs/images.md).

Without ``_out/images.env`` the image tests skip, unless ``KUBETUNE_REQUIRE_IMAGES=1`` (set by
``make test``, which builds the images first): then they fail.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGES_ENV = REPO / "_out" / "images.env"

#: Starts a container of an image with a command, returns the finished process.
RunIn = Callable[..., subprocess.CompletedProcess[str]]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "images: needs the images `make images` builds")


def _unavailable(reason: str) -> None:
    if os.environ.get("KUBETUNE_REQUIRE_IMAGES") == "1":
        pytest.fail(f"{reason} (KUBETUNE_REQUIRE_IMAGES=1: run `make images`)")
    pytest.skip(f"{reason}; run `make images`")


@pytest.fixture(scope="session")
def engine_env() -> dict[str, str]:
    """The environment for the container engine (CONTAINERS_CONF, ENGINE), from containers.sh."""
    result = subprocess.run(
        ["bash", str(REPO / "hack" / "images" / "containers.sh")], capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0:
        _unavailable(f"no container engine: {result.stderr.strip()}")
    env = dict(os.environ)
    for line in result.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


@pytest.fixture(scope="session")
def images(engine_env: dict[str, str]) -> dict[str, str]:
    """``{"operator": ref, "worker": ref}`` from _out/images.env, each checked to exist."""
    if not IMAGES_ENV.exists():
        _unavailable(f"{IMAGES_ENV.relative_to(REPO)} is missing")
    refs = dict(line.split("=", 1) for line in IMAGES_ENV.read_text().split())
    found = {name: refs.get(f"KUBETUNE_{name.upper()}_IMAGE", "") for name in ("operator", "worker")}
    for name, ref in found.items():
        inspect = subprocess.run(
            [engine_env["ENGINE"], "image", "inspect", "--format", "{{.Id}}", ref or "-"],
            capture_output=True,
            env=engine_env,
            timeout=60,
        )
        if not ref or inspect.returncode != 0:
            _unavailable(f"the {name} image {ref!r} named in {IMAGES_ENV.name} does not exist")
    return found


@pytest.fixture(scope="session")
def run_in(engine_env: dict[str, str]) -> RunIn:
    """``run_in(ref, *command, timeout=60)``: the command in a fresh container of ``ref`` as the
    image's own user, with a read-only root, a writable /tmp (an emptyDir in a pod), all
    capabilities dropped, no privilege escalation and no network."""
    engine = engine_env["ENGINE"]
    options = ["--rm", "--network=none", "--read-only", "--cap-drop=ALL"]
    options += ["--security-opt=no-new-privileges", "--tmpfs=/tmp:rw,exec,nosuid,nodev,mode=1777"]
    if engine == "podman":
        # podman's --read-only adds tmpfs mounts at /tmp, /var/tmp and /run unless told not to.
        options += ["--runtime=runc", "--read-only-tmpfs=false"]

    def run(ref: str, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [engine, "run", *options, ref, *command],
            capture_output=True,
            text=True,
            env=engine_env,
            timeout=timeout,
        )

    return run
