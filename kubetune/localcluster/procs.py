"""Process bookkeeping that survives a crash of the process that started the cluster.

Every long-lived process a cluster starts is recorded as ``<state>/pids/<label>`` holding its
pid and kernel start time (so a recycled pid is never killed). Pod network namespaces are
recorded the same way under ``<state>/netns/``. :func:`reap_stale` uses those records to
clean up after a cluster whose owner died without stopping it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

from kubetune.localcluster import network

_OWNERLESS_GRACE_S = 60.0


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields after it do not.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def alive(pid: int, started: int | None) -> bool:
    current = start_time(pid)
    return current is not None and (started is None or current == started)


def record(directory: Path, label: str, pid: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / label
    path.write_text(json.dumps({"pid": pid, "start": start_time(pid)}))
    return path


def read_record(path: Path) -> tuple[int, int | None] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return int(data["pid"]), data.get("start")


def kill_group(pid: int, sig: int) -> None:
    """Signal the process group led by ``pid`` (every process we start leads its own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def kill_recorded(directory: Path, grace: float = 5.0) -> None:
    """SIGTERM every still-living recorded process group, then SIGKILL after ``grace`` seconds."""
    records = [r for p in sorted(directory.glob("*")) if (r := read_record(p))]
    living = [(pid, start) for pid, start in records if alive(pid, start)]
    for pid, _ in living:
        kill_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while living and time.monotonic() < deadline:
        living = [(pid, start) for pid, start in living if alive(pid, start)]
        time.sleep(0.05)
    for pid, _ in living:
        kill_group(pid, signal.SIGKILL)


def cleanup_state(state_dir: Path, *, remove: bool = True) -> None:
    """Kill what ``state_dir`` records, delete its network namespaces and bridge."""
    kill_recorded(state_dir / "pids", grace=2.0)
    for containers in state_dir.glob("nodes/*/containers"):
        kill_recorded(containers, grace=0)
    if any(state_dir.glob("nodes/*/pods")):
        # Real containers outlive the `podman run` processes killed above.
        from kubetune.localcluster.nodeagent.runtime import sweep_cluster

        sweep_cluster(state_dir.name)
    netns_dir = state_dir / "netns"
    if netns_dir.is_dir():
        for entry in netns_dir.iterdir():
            network.delete_pod_netns(entry.name, entry.read_text().strip())
    bridge = state_dir / "bridge"
    if bridge.is_file():
        network.delete_link(bridge.read_text().strip())
    if remove:
        # Renamed first so the directory vanishes at once: nobody sees a half-deleted cluster
        # (an owner record already gone while its logs are still being removed).
        doomed = state_dir.with_name(f".{state_dir.name}.removing-{os.getpid()}")
        try:
            state_dir.rename(doomed)
        except OSError:
            doomed = state_dir
        shutil.rmtree(doomed, ignore_errors=True)


def reap_stale(run_dir: Path) -> list[Path]:
    """Clean up every cluster under ``run_dir`` whose owner process is gone."""
    reaped: list[Path] = []
    if not run_dir.is_dir():
        return reaped
    for state_dir in run_dir.iterdir():
        owner = read_record(state_dir / "owner")
        try:
            age = time.time() - state_dir.stat().st_mtime
        except FileNotFoundError:
            continue  # another process reaped it meanwhile (two clusters starting at once)
        if owner is None and age < _OWNERLESS_GRACE_S:
            continue  # a cluster that is starting right now and has not written its owner yet
        if state_dir.is_dir() and (owner is None or not alive(*owner)):
            cleanup_state(state_dir)
            reaped.append(state_dir)
    return reaped
