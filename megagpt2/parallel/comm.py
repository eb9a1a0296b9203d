"""Every communication autograd function of tensor and sequence parallelism, in one place.

Activations are (B, T, C): the "last dimension" is C (hidden or vocabulary shard) and the
"sequence dimension" is T (dim 1). Each function is the identity when the group has one rank,
so the tp=1 model is exactly a single-device model.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {n} ranks")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over {n} ranks")
    parts = [p.contiguous() for p in x.chunk(n, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    """fwd: identity; bwd: all-reduce over the group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """fwd: all-reduce over the group; bwd: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToRegion(torch.autograd.Function):
    """fwd: keep this rank's chunk of the last dim; bwd: all-gather along the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, -1, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    """fwd: all-gather along the last dim; bwd: keep this rank's chunk of the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, -1, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    """fwd: keep this rank's chunk of the sequence dim; bwd: all-gather along the sequence dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, 1, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    """fwd: all-gather along the sequence dim; bwd: reduce-scatter (or split) along it."""

    @staticmethod
    def forward(ctx, x, group, reduce_grad):
        ctx.group, ctx.reduce_grad = group, reduce_grad
        return _gather(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        if ctx.reduce_grad:
            return _reduce_scatter(g, 1, ctx.group), None, None
        return _split(g, 1, ctx.group), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    """fwd: reduce-scatter along the sequence dim; bwd: all-gather along the sequence dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, 1, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """fwd: identity; bwd: all-reduce. Input of a column-parallel layer, replicated params."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """fwd: all-reduce; bwd: identity. Output of a row-parallel layer."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """fwd: split the last dim; bwd: all-gather the last dim."""
    return x if group_size(group) == 1 else _ScatterToRegion.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """fwd: all-gather the last dim; bwd: split the last dim."""
    return x if group_size(group) == 1 else _GatherFromRegion.apply(x, group)


def scatter_to_sequence_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """fwd: split the sequence dim; bwd: all-gather the sequence dim."""
    return x if group_size(group) == 1 else _ScatterToSequence.apply(x, group)


def gather_from_sequence_region(x: torch.Tensor, group: Group, reduce_grad: bool = True) -> torch.Tensor:
    """fwd: all-gather the sequence dim; bwd: reduce-scatter (reduce_grad) or split it."""
    return x if group_size(group) == 1 else _GatherFromSequence.apply(x, group, reduce_grad)


def reduce_scatter_to_sequence_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """fwd: reduce-scatter the sequence dim; bwd: all-gather the sequence dim."""
    return x if group_size(group) == 1 else _ReduceScatterToSequence.apply(x, group)
