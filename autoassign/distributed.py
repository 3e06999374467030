"""Helpers over a ``torch.distributed`` process group that someone else initialised.

The engine never creates the process group: ``python -m autoassign.train`` runs one process,
and a launcher (Ray Train, torchrun) initialises the group before building the Trainer.
Without an initialised group every helper behaves as rank 0 of 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """An initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0: the only process that writes files."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``values`` (any shape, floating) over all ranks."""
    if not is_distributed():
        return values
    reduced = values.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / dist.get_world_size()


def broadcast_object(value: object, src: int = 0) -> object:
    """``value`` as rank ``src`` has it, on every rank."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def max_per_rank(value: torch.Tensor) -> torch.Tensor:
    """``[world_size]``: every rank's 0-dim integer ``value``, on every rank (one all-reduce).

    Each rank writes its value at its own index of a zero vector and the vectors are reduced
    with MAX, so ``result.any()`` is "some rank reported" and the nonzero entries say which.
    All ranks must call it for the same step, whatever their value.
    """
    values = torch.zeros(get_world_size(), dtype=torch.int64, device=value.device)
    values[get_rank()] = value.to(torch.int64)
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values
