"""The few collectives evaluation needs, on torch.distributed when a process group is up
(Lightning DDP, torchrun) and trivial otherwise."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def shard(n: int, rank: int, world: int) -> range:
    """This rank's items of range(n): rank, rank + world, ... Every item exactly once, no padding."""
    return range(rank, n, world)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_by_index(items: torch.Tensor, indices: list[int], n: int) -> torch.Tensor:
    """Reassemble items[k] (held by this rank for global index indices[k]) into one (n, ...) tensor
    on every rank, for n small (e.g. a sample grid)."""
    out = torch.zeros((n, *items.shape[1:]), dtype=torch.float32, device=items.device)
    mask = torch.zeros(n, dtype=torch.float32, device=items.device)
    for k, i in enumerate(indices):
        if i < n:
            out[i] = items[k].float()
            mask[i] = 1.0
    out, mask = all_reduce_sum(out), all_reduce_sum(mask)
    if not bool((mask == 1).all()):
        raise RuntimeError("gather_by_index: some indices were held by no rank or by several")
    return out.to(items.dtype)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the rendezvous of processes started on this machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
