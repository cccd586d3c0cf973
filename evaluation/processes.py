"""The processes of a data-parallel evaluation (``torchrun`` or ``accelerate launch`` with several processes).

Rule: every process loads the model and scores its share of the requests; lmms-eval gathers the outputs
on process 0, which alone computes the scores and writes files; the scores are then shared with every
process, so each one returns the same result. One process (no launcher) is the plain case: rank 0 of 1.

The process group is accelerate's: on a machine without an accelerator it is a CPU group (gloo), so the
same command runs on a laptop (``torchrun --nproc_per_node 2``) and on a multi-GPU box.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

import torch
import torch.distributed as dist


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _accelerator_present() -> bool:
    from pruning.io import current_accelerator

    return current_accelerator() is not None


def accelerator():
    """accelerate's ``Accelerator`` for this process (a CPU process group when no accelerator is present,
    which accelerate otherwise leaves uninitialised). Under several processes the group is set up with the
    process's standard output pointed at its standard error: gloo's C++ code prints its connections there
    (torch 2.8), and the commands keep standard output for their JSON reports."""
    from accelerate import Accelerator

    quiet = _stdout_to_stderr() if launched_processes() > 1 else contextlib.nullcontext()
    with quiet:
        return Accelerator(cpu=not _accelerator_present())


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 writes to descriptor 2 in this block (what C++ code prints included)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def process_device() -> torch.device | None:
    """The device this process should load the model on when several were launched (each its own
    accelerator, or the CPU); None for a single process (the model goes where it loads)."""
    if launched_processes() == 1:
        return None
    return accelerator().device


def rank() -> int:
    """This process's index: in the process group, else as the launcher set it (``RANK``; 0 without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main() -> bool:
    """Whether this process writes the outputs (rank 0)."""
    return rank() == 0


def share_from_main(value: Any) -> Any:
    """``value`` as process 0 holds it, on every process (a no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


__all__ = ["accelerator", "is_main", "launched_processes", "process_device", "rank", "share_from_main"]
