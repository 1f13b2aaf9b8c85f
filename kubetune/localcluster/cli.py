"""``kubetune cluster up|down|status|build`` (also ``python -m kubetune.localcluster ...``).

``up`` starts a detached supervisor process that owns the cluster and returns once the API
and the nodes are ready, printing the kubeconfig path; ``down`` asks the supervisor to stop
everything. Clusters are named (default ``dev``) so several can run side by side.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_NAME = "dev"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="start a local cluster in the background")
    up.add_argument("--name", default=DEFAULT_NAME, help="cluster name (default: %(default)s)")
    up.add_argument("--gpus", type=int, default=0, help="fake nvidia.com/gpu count on the node (default: 0)")
    up.add_argument(
        "--runtime",
        choices=["podman", "process"],
        default="podman",
        help="podman: real containers from local images (default); process: commands as host processes",
    )
    up.add_argument("--timeout", type=float, default=180, help="seconds to wait for readiness (default: 180)")
    down = sub.add_parser("down", help="stop a local cluster")
    down.add_argument("--name", default=DEFAULT_NAME)
    status = sub.add_parser("status", help="print the kubeconfig path if the cluster runs")
    status.add_argument("--name", default=DEFAULT_NAME)
    sub.add_parser("build", help="build the control-plane binaries (cached)")
    serve = sub.add_parser("serve", help=argparse.SUPPRESS)
    serve.add_argument("--name", default=DEFAULT_NAME)
    serve.add_argument("--gpus", type=int, default=0)
    serve.add_argument("--runtime", default="podman")


def _state_dir(name: str) -> Path:
    from kubetune.localcluster.controlplane import default_run_dir

    return default_run_dir() / name


def _owner(name: str) -> int | None:
    from kubetune.localcluster import procs

    record = procs.read_record(_state_dir(name) / "owner")
    if record and procs.alive(*record):
        return record[0]
    return None


def run(args: argparse.Namespace) -> int:
    action = {"up": _up, "down": _down, "status": _status, "build": _build, "serve": _serve}[args.action]
    return action(args)


def _build(args: argparse.Namespace) -> int:
    from kubetune.localcluster import binaries

    for name, path in binaries.find(build=True).items():
        print(f"{name}={path}")
    return 0


def _status(args: argparse.Namespace) -> int:
    if _owner(args.name) is None:
        print(f"cluster {args.name!r} is not running", file=sys.stderr)
        return 1
    print(_state_dir(args.name) / "kubeconfig")
    return 0


def _up(args: argparse.Namespace) -> int:
    state = _state_dir(args.name)
    if _owner(args.name) is not None:
        print(f"cluster {args.name!r} already running; export KUBECONFIG={state / 'kubeconfig'}")
        return 0
    log_path = state.parent / f"{args.name}.supervisor.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "kubetune.localcluster",
        "serve",
        "--name",
        args.name,
        "--gpus",
        str(args.gpus),
        "--runtime",
        args.runtime,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if (state / "ready").exists():
            print(f"cluster {args.name!r} is up ({(state / 'startup-seconds').read_text().strip()}s)")
            print(f"export KUBECONFIG={state / 'kubeconfig'}")
            return 0
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    print(f"cluster {args.name!r} did not come up; see {log_path}:", file=sys.stderr)
    print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
    if proc.poll() is None:
        proc.terminate()
    return 1


def _down(args: argparse.Namespace) -> int:
    from kubetune.localcluster import procs

    state = _state_dir(args.name)
    owner = procs.read_record(state / "owner")
    if owner is not None and procs.alive(*owner):
        os.kill(owner[0], signal.SIGTERM)
        # The supervisor stops nodes, then the control plane, then removes the state.
        deadline = time.monotonic() + 90
        while procs.alive(*owner) and time.monotonic() < deadline:
            time.sleep(0.2)
        if procs.alive(*owner):
            os.kill(owner[0], signal.SIGKILL)
    if state.exists():
        procs.cleanup_state(state)
    (state.parent / f"{args.name}.supervisor.log").unlink(missing_ok=True)
    print(f"cluster {args.name!r} is down")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """The supervisor: owns the cluster until SIGTERM."""
    import threading

    from kubetune.localcluster.controlplane import ClusterOptions, LocalCluster, NodeOptions

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cluster = LocalCluster(
        ClusterOptions(name=args.name, nodes=[NodeOptions(gpus=args.gpus, runtime=args.runtime)])
    )
    with cluster:
        (cluster.state_dir / "ready").touch()
        print(f"cluster {args.name} ready: {cluster.kubeconfig}", flush=True)
        stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune.localcluster", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
