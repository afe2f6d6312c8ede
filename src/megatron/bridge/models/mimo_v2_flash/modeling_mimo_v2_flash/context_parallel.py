"""Context parallelism for the local (pure-torch) MiMo attention: what each rank holds, and K/V from all ranks.

Megatron's load-balanced split (``get_batch_on_this_cp_rank``) cuts a sequence into ``2 * CP`` chunks; rank ``r``
holds chunks ``r`` and ``2 * CP - 1 - r``, so causal work is even. Each rank attends its queries to the keys and
values of every rank (gathered here), masked by the tokens' global positions: causal spans, sliding windows and
the sink are then exactly one process's. Softmax over keys does not depend on their order, so the gathered keys
are never reordered. This path is for CPU tests and TE-less hosts: simple and exact, not communication-optimal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def local_positions(local_len: int, rank: int, size: int, device=None) -> Tensor:
    """Global positions of the ``local_len`` tokens rank ``rank`` of ``size`` holds (chunks r and 2*size-1-r)."""
    if local_len % 2:
        raise ValueError(f"context parallelism needs an even number of tokens per rank, got {local_len}")
    chunk = local_len // 2
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk, device=device)
    return torch.cat([first, second])


def gathered_positions(local_len: int, size: int, device=None) -> Tensor:
    """Global positions of :func:`gather_sequence`'s output (rank-major, each rank's chunks as it holds them)."""
    return torch.cat([local_positions(local_len, rank, size, device) for rank in range(size)])


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0; the backward sums every rank's gradient and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group, ctx.local_len = group, tensor.size(0)
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad[rank * ctx.local_len : (rank + 1) * ctx.local_len], None


def gather_sequence(tensor: Tensor, group) -> Tensor:
    """``tensor [s_local, ...]`` of every rank of ``group``, concatenated rank by rank (autograd-aware)."""
    return _GatherSequence.apply(tensor, group)
