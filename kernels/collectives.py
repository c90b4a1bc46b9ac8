"""Differentiable collectives for cross-device contrastive losses.

``accelerate.Accelerator.gather`` and ``torch.distributed.all_gather`` return tensors that
are cut off from autograd: a loss over gathered keys then trains only on the local ones
(each rank's gradient silently ignores the other ranks' use of its embeddings).
:func:`gather_with_grad` is an ``autograd.Function`` whose backward sends every rank the
sum over ranks of the gradient of its own slice.

No process-group setup happens here: without an initialised default group (or with a
world of one) every function is the identity.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["gather_with_grad", "gather_sizes", "distributed_world", "all_reduce_sum", "all_reduce_max"]


def distributed_world(group=None) -> Tuple[int, int]:
    """``(rank, world_size)`` of ``group``; ``(0, 1)`` when torch.distributed is not initialised.

    Args:
        group: a process group, or None for the default group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather_sizes(n: int, device: torch.device, group=None) -> List[int]:
    """Every rank's local size ``n`` in rank order (one small all_gather).

    Args:
        n: this rank's number of rows.
        device: device of the collective (the backend's device: CUDA for NCCL, CPU for gloo).
        group: process group, default the world.
    """
    _, world = distributed_world(group)
    if world == 1:
        return [int(n)]
    mine = torch.tensor([int(n)], dtype=torch.int64, device=device)
    out = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return [int(t.item()) for t in out]


def _gather_padded(x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """all_gather of possibly uneven dim-0 slices: pad to the largest, gather, trim, concat."""
    longest = max(sizes)
    if x.shape[0] < longest:
        pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad])
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(out, x, group=group)
    return torch.cat([t[:n] for t, n in zip(out, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """Forward: concat of every rank's slice in rank order. Backward: all_reduce(SUM) of the
    incoming gradient, then this rank's slice: d(sum_r L_r)/dx_local on every rank."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        # Every rank's loss used every slice, so the local slice's gradient is the sum of
        # all ranks' gradients for it. (A reduce_scatter would move less data, but gloo
        # has none and the padded form needs equal chunks.)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None, None


def gather_with_grad(x: torch.Tensor, group=None, sizes: Optional[List[int]] = None) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 in rank order, keeping autograd.

    Local sizes may differ between ranks (the last batch of an epoch): sizes are
    all_gathered, slices padded to the largest, gathered and trimmed. The backward gives
    each rank, for its own slice, the gradient summed over ranks. Integer tensors (ids)
    are gathered the same way, without gradient. Identity without an initialised process
    group.

    Args:
        x: [n, ...] local tensor (n may be 0 and may differ between ranks).
        group: process group, default the world.
        sizes: every rank's n when already known (saves one all_gather).

    Returns:
        [sum(sizes), ...] tensor.
    """
    rank, world = distributed_world(group)
    if world == 1:
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device, group)
    if sizes[rank] != x.shape[0]:
        raise ValueError(f"sizes[{rank}] = {sizes[rank]} but the local tensor has {x.shape[0]} rows")
    if not (x.requires_grad and torch.is_grad_enabled()):
        with torch.no_grad():
            return _gather_padded(x, sizes, group)
    return _GatherWithGrad.apply(x, list(sizes), rank, group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward is again a sum over ranks (the adjoint of the
    replicated sum), so each rank's input gets the total gradient of every rank's use."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable all_reduce(SUM); identity without an initialised process group.

    Args:
        x: tensor of the same shape on every rank.
        group: process group, default the world.
    """
    _, world = distributed_world(group)
    if world == 1:
        return x
    if not (x.requires_grad and torch.is_grad_enabled()):
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out
    return _AllReduceSum.apply(x, group)


def all_reduce_max(x: torch.Tensor, group=None) -> torch.Tensor:
    """Elementwise max over ranks, without gradient (a shift for stable log-sum-exps);
    identity without an initialised process group.

    Args:
        x: tensor of the same shape on every rank.
        group: process group, default the world.
    """
    _, world = distributed_world(group)
    out = x.detach().clone()
    if world > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out
