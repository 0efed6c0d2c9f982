"""The collectives of context parallelism, differentiable where gradients cross ranks.

One rule keeps the backward deadlock-free: every rank calls the same collectives in the same order (decided from
host bookkeeping all ranks share), and under grad mode the result of :func:`all_gather` always requires grad, so its
backward (a reduce-scatter) runs on every rank or on none.

Tensors are exchanged flat, which is what every backend accepts (gloo wants 1-D buffers for the *_single forms).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather", "all_reduce_sum"]

_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, world_size: int) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty(world_size * x.numel())
        _gather_flat(out, x.reshape(-1), group=group)
        return out.reshape(world_size, *x.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous()
        mine = grad.new_empty(grad.shape[1:])
        # the gradient of this rank's input is the sum, over ranks, of what each rank's result sends back to it
        _reduce_scatter_flat(mine.reshape(-1), grad.reshape(-1), group=ctx.group)
        return mine, None, None


def all_gather(x: torch.Tensor, group: Any, world_size: int) -> torch.Tensor:
    """Every rank's ``x`` (same shape and dtype on all ranks), stacked: [P, *x.shape]; differentiable.

    The gradient that reaches a rank's ``x`` is the sum of the gradients all ranks put on its slot. Under grad mode the
    result requires grad even when ``x`` does not, so that all ranks take part in the backward exchange.
    """
    if world_size == 1:
        return x.unsqueeze(0)
    if torch.is_grad_enabled() and x.is_floating_point() and not x.requires_grad:
        x = x.detach().requires_grad_()
    return _AllGather.apply(x, group, world_size)


def all_reduce_sum(x: torch.Tensor, group: Any, world_size: int) -> torch.Tensor:
    """The sum of ``x`` over ranks (a new tensor; no gradient flows through it)."""
    out = x.detach().clone()
    if world_size > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
