"""A rank that dies mid-run (SIGKILL, as the OOM killer does) in a two-node group, each node its own
launcher with static rendezvous, as the pods of a ``nodes: 2`` FineTuneJob run (gloo, CPU).

Aspects:
- the node whose rank was killed exits 137 (128 + SIGKILL), what its pod reports;
- the other node's rank notices its peer is gone in the next collective and exits ``PeerLost`` (22,
  which the Job's podFailurePolicy does not count), with that reason in its termination message,
  instead of hanging in gloo until its timeout;
- the checkpoints written before the kill are there to resume from (a group resuming from its
  newest checkpoint is tests/cluster/test_distributed_training.py's and test_distributed_fsdp.py's).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.worker.conftest import plan_dict, write_plan

pytestmark = pytest.mark.torch

STEPS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_a_killed_rank_stops_the_group_with_peer_lost(
    tmp_path: Path, tiny_model: Path, task_files: dict[str, Path]
) -> None:
    output = tmp_path / "out" / "group"
    training = {"max_steps": STEPS, "checkpoint_every_steps": 2, "logging_every_steps": 1, "batch_size": 4}
    plan_file = write_plan(
        tmp_path / "plan.json", plan_dict(tiny_model, task_files["completion"], output, training=training)
    )
    progress = output.parent / ".group.kubetune" / "progress.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(node: int, port: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable, "-m", "kubetune.worker.distributed", "--nnodes=2", f"--node-rank={node}",
                "--nproc-per-node=1", "--rdzv-backend=static", "--master-addr=127.0.0.1",
                f"--master-port={port}", "-m", "kubetune", "train", "--plan", str(plan_file),
                "--termination-message-path", str(tmp_path / f"node-{node}.termination"),
            ],
            env=env, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def step() -> int:
        try:
            return int(json.loads(progress.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    port = _free_port()
    nodes = [start(0, port), start(1, port)]
    try:
        deadline = time.monotonic() + 300
        while step() < 4 and all(n.poll() is None for n in nodes) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert step() >= 4, [n.poll() for n in nodes]
        ranks = _children(nodes[1].pid)
        assert len(ranks) == 1, ranks  # the node's one training process under its torchrun agent
        os.kill(ranks[0], signal.SIGKILL)
        (_, killed_err), (_, peer_err) = nodes[1].communicate(timeout=120), nodes[0].communicate(timeout=120)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert nodes[1].returncode == 137, killed_err[-3000:]
    assert nodes[0].returncode == 22, peer_err[-3000:]
    assert (
        (tmp_path / "node-0.termination")
        .read_text()
        .startswith("PeerLost: another rank of the group stopped")
    )
    saved = [
        int(p.name.removeprefix("step-"))
        for p in (output.parent / ".group.kubetune" / "checkpoints").iterdir()
    ]
    assert saved and 2 <= max(saved) < STEPS, (saved, peer_err[-3000:])
