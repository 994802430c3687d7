"""The few collectives the training loop needs, each a no-op in a single process (tests, one worker)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over all workers, in place."""
    if is_distributed():
        dist.all_reduce(values)
    return values


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers on every worker. DDP copies them only at the start of a forward, so after a step
    each rank holds BatchNorm statistics of its own batches; a figure summed over ranks must be of one
    model, the one rank 0 checkpoints."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The tensors of all workers concatenated in rank order (no gradient flows back through it)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_objects(obj) -> list:
    """One picklable object per worker, in rank order, on every worker."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
