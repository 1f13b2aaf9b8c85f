"""Multi-process and multi-node training: the pod's torchrun launcher, and FSDP for full fine-tuning.

``python -m kubetune.worker.distributed [torchrun options] -m kubetune train --plan FILE`` is torchrun
(``torch.distributed.run``, the same options and the same elastic agent) with one difference: its exit
status is the failed worker's own code, not torchrun's generic 1. The Job's ``podFailurePolicy`` judges
exit codes (a ``DatasetInvalid`` fails the Job at once, a ``Preempted`` or ``PeerLost`` is retried
without counting), so they must survive the agent. An agent stopped by a signal (pod deletion) exits
with 128 + the signal, as a shell would report it.

FSDP (torch's FSDP2, ``fully_shard``) shards full fine-tuning's parameters, gradients and optimizer
state across ranks; its checkpoints are torch.distributed.checkpoint (DCP) directories with one shard
file per rank. Adapter methods (LoRA, QLoRA, IA3, bottleneck) train under DDP instead: their trainable
state is small, and sharding the frozen base buys nothing a quantized or bf16 base does not.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune.api import methods

#: Methods whose ranks shard the model with FSDP; the others replicate it with DDP.
SHARDED_METHODS = frozenset(name for name in methods.METHOD_NAMES if methods.get(name).sharded_across_ranks)
#: The DCP directory inside a sharded checkpoint.
SHARDS_DIR = "shards"


def exit_code_of_failure(exitcode: int) -> int:
    """A worker's exit code as a shell reports it: negative codes (killed by signal N) become 128 + N."""
    if exitcode < 0:
        return 128 - exitcode
    return exitcode or 1


def _train_arguments(argv: Sequence[str]) -> list[str] | None:
    """The ``kubetune train`` arguments at the end of a torchrun command line, if that is what it runs."""
    args = list(argv)
    for index in range(len(args) - 2):
        if args[index : index + 3] == ["-m", "kubetune", "train"]:
            return args[index + 3 :]
    return None


def launch(argv: Sequence[str]) -> int:
    """Run torchrun with ``argv``; return the first failed worker's exit code (0 when all succeed).

    When it runs ``kubetune train``, the plan and its local sources are checked first, before torch is
    imported (:func:`kubetune.worker.train_cli.check`).
    """
    train_args = _train_arguments(argv)
    if train_args is not None:
        import argparse

        from kubetune.worker import train_cli

        parser = argparse.ArgumentParser(prog="kubetune train")
        train_cli.add_arguments(parser)
        code = train_cli.check(parser.parse_args(train_args))
        if code:
            return code

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(list(argv))
    try:
        torchrun.run(args)
    except ChildFailedError as error:
        _, failure = error.get_first_failure()
        return exit_code_of_failure(failure.exitcode)
    except SignalException as error:
        return 128 + int(error.sigval)
    return 0


# ----------------------------------------------------------------------------------------------- FSDP


def shard_model(model: Any) -> Any:
    """Shard ``model`` in place with FSDP2: each transformer block is its own unit (its parameters are
    gathered just for its forward and backward), then the root for what is left (embeddings, head).

    The blocks are the classes transformers itself refuses to split across devices
    (``_no_split_modules``); a model that names none is sharded as one unit.
    """
    from torch.distributed.fsdp import fully_shard

    block_names = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in block_names:
            fully_shard(module)
    fully_shard(model)
    return model


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def save_shards(model: Any, optimizer: Any, directory: Path) -> None:
    """Every rank writes its shards of the model and optimizer state (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory / SHARDS_DIR))


def load_shards(model: Any, optimizer: Any, directory: Path) -> None:
    """Every rank reads its shards back into the sharded model and optimizer (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    # DCP loads in place, into the tensors of these (sharded) state dicts.
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory / SHARDS_DIR))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def full_state_dict(model: Any) -> dict[str, Any]:
    """The whole model's state on rank 0, on CPU (empty on the other ranks); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state: dict[str, Any] = get_model_state_dict(model, options=options)
    return state


def main() -> None:
    sys.exit(launch(sys.argv[1:]))


if __name__ == "__main__":
    main()
