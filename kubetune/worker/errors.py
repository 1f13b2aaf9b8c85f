"""Typed worker failures: each reason has its own exit code and one-line termination message.

Torch-free, so the operator can map a pod's exit code (or the ``Reason:`` prefix of its termination
message) to a condition reason and decide whether a retry can help. Codes stay below 128 because
128+N means "killed by signal N" to Kubernetes; the one exception is ``Preempted`` (143), which
reports exactly that: the process stopped on SIGTERM, after saving a checkpoint.

=====  ======================  =========  ==========================================================
code   reason                  retryable  meaning
=====  ======================  =========  ==========================================================
1      InternalError           yes        a bug or an unclassified exception
10     PlanInvalid             no         the plan does not parse or breaks a rule
11     DatasetNotFound         no         a dataset URI points at nothing
12     DatasetInvalid          no         bad record, missing field, empty file, wrong encoding
13     ModelNotFound           no         the base model URI/revision points at nothing
14     ModelInvalid            no         the model exists but cannot be loaded (config, weights)
15     TargetModuleNotFound    no         a target module names nothing in the model
16     OutOfMemory             no         the accelerator or the host ran out of memory
17     OutputError             no         the output location cannot be written, or is taken
18     DependencyMissing       no         an optional package the method needs is not installed
19     SourceUnavailable       yes        network or storage trouble while fetching inputs
20     TrainingDiverged        no         the loss became NaN or infinite
21     AccessDenied            no         credentials missing or rejected for a model/dataset
22     PeerLost                yes        another rank of a multi-node group went away mid-run
143    Preempted               yes        SIGTERM: a checkpoint was written; run again to resume
=====  ======================  =========  ==========================================================
"""

from __future__ import annotations

import contextlib
from pathlib import Path


class KubetuneError(Exception):
    """Base of every failure the worker reports to the user. ``str()`` is the human message."""

    reason = "InternalError"
    exit_code = 1
    retryable = True

    def termination_message(self) -> str:
        """The single line written to the termination message path."""
        message = " ".join(str(self).split())  # one line whatever the cause contained
        return f"{self.reason}: {message}"[:4000]  # kubelet keeps at most 4096 bytes


class PlanInvalid(KubetuneError):
    reason, exit_code, retryable = "PlanInvalid", 10, False


class DatasetNotFound(KubetuneError):
    reason, exit_code, retryable = "DatasetNotFound", 11, False


class DatasetInvalid(KubetuneError):
    reason, exit_code, retryable = "DatasetInvalid", 12, False


class ModelNotFound(KubetuneError):
    reason, exit_code, retryable = "ModelNotFound", 13, False


class ModelInvalid(KubetuneError):
    reason, exit_code, retryable = "ModelInvalid", 14, False


class TargetModuleNotFound(KubetuneError):
    reason, exit_code, retryable = "TargetModuleNotFound", 15, False


class OutOfMemory(KubetuneError):
    reason, exit_code, retryable = "OutOfMemory", 16, False


class OutputError(KubetuneError):
    reason, exit_code, retryable = "OutputError", 17, False


class DependencyMissing(KubetuneError):
    reason, exit_code, retryable = "DependencyMissing", 18, False


class SourceUnavailable(KubetuneError):
    reason, exit_code, retryable = "SourceUnavailable", 19, True


class TrainingDiverged(KubetuneError):
    reason, exit_code, retryable = "TrainingDiverged", 20, False


class AccessDenied(KubetuneError):
    reason, exit_code, retryable = "AccessDenied", 21, False


class PeerLost(KubetuneError):
    """Another rank of the group stopped (its pod failed, was deleted or preempted): this rank is not
    at fault, and the group restarts from its last checkpoint."""

    reason, exit_code, retryable = "PeerLost", 22, True


class Preempted(KubetuneError):
    """SIGTERM turned into a checkpoint. 143 is what a SIGTERM'd process reports anyway (128 + 15)."""

    reason, exit_code, retryable = "Preempted", 143, True


ERROR_TYPES: tuple[type[KubetuneError], ...] = (
    KubetuneError,
    PlanInvalid,
    DatasetNotFound,
    DatasetInvalid,
    ModelNotFound,
    ModelInvalid,
    TargetModuleNotFound,
    OutOfMemory,
    OutputError,
    DependencyMissing,
    SourceUnavailable,
    TrainingDiverged,
    AccessDenied,
    PeerLost,
    Preempted,
)

#: exit code -> reason, for the operator.
REASON_BY_EXIT_CODE: dict[int, str] = {t.exit_code: t.reason for t in ERROR_TYPES}

#: reason -> whether running the same plan again can succeed.
RETRYABLE: dict[str, bool] = {t.reason: t.retryable for t in ERROR_TYPES}


def write_termination_message(path: str | Path, message: str) -> None:
    """Best effort: a read-only or missing termination path must not hide the original failure."""
    with contextlib.suppress(OSError):
        Path(path).write_text(message + "\n", encoding="utf-8")
