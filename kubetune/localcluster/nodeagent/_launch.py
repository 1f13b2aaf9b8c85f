"""Container launcher: enter the pod's namespaces, mount its volumes, exec the command.

Run by the node agent as ``python -I -S _launch.py SPEC.json`` (stdlib only, so it starts
in milliseconds and never imports the agent). It joins the pod's network namespace, makes
a private mount namespace and a UTS namespace (hostname = pod name), bind-mounts each
volume at its declared path, then replaces itself with the container's command, so the
container's pid is the one the agent started. Mounts vanish with the namespace when the
container exits: nothing is left mounted on the host.

Doing this in a fresh interpreter rather than in ``preexec_fn`` keeps fork-after-threads
hazards out of the multi-threaded agent.
"""

import ctypes
import json
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

libc = ctypes.CDLL(None, use_errno=True)


def _check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, flags):
    _check(
        libc.mount(source.encode() if source else None, target.encode(), None, flags, None),
        f"mount {source} on {target}",
    )


def _ensure_mountpoint(source, target):
    # A bind mount needs an existing target of the same kind; an empty file or directory
    # created on the host is the price of not having a container root filesystem.
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "a"):
            pass


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    log_fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        if spec.get("netns"):
            fd = os.open(spec["netns"], os.O_RDONLY)
            _check(libc.setns(fd, CLONE_NEWNET), "setns")
            os.close(fd)
        _check(libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare")
        hostname = spec["hostname"].encode()
        _check(libc.sethostname(hostname, len(hostname)), "sethostname")
        _mount(None, "/", MS_REC | MS_PRIVATE)
        for m in spec["mounts"]:
            _ensure_mountpoint(m["source"], m["target"])
            _mount(m["source"], m["target"], MS_BIND | MS_REC)
            if m.get("readOnly"):
                _mount(m["source"], m["target"], MS_BIND | MS_REMOUNT | MS_RDONLY)
        if spec.get("workingDir"):
            os.makedirs(spec["workingDir"], exist_ok=True)
            os.chdir(spec["workingDir"])
    except OSError as exc:
        print(f"kubetune node agent: cannot set up container: {exc}", file=sys.stderr, flush=True)
        os._exit(128)
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except OSError as exc:
        # Matches the exit code shells use for "command not found".
        print(f"kubetune node agent: cannot run {argv[0]!r}: {exc}", file=sys.stderr, flush=True)
        os._exit(127)


if __name__ == "__main__":
    main()
