"""Tensor-parallel layers. At tp=1 each one is exactly its plain torch counterpart.

Every parameter carries its sharding as attributes, so initialisation, checkpoint resharding and
Hugging Face export all use the same description:

    p.tp_dim     dimension split over TP ranks (None: replicated on every TP rank)
    p.tp_stride  number of interleaved blocks along tp_dim (3 for the fused q/k/v weight)
    p.init       "normal:<std>", "zeros" or "ones"

Weights are initialised from the full (gathered) tensor drawn with a generator seeded by the
parameter's global name, then sharded: the gathered weights are the same for any tp and pp.
"""

from __future__ import annotations

import zlib
from typing import Optional, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .comm import (
    Group,
    copy_to_tp_region,
    gather_from_sequence_region,
    gather_from_tp_region,
    group_rank,
    group_size,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
)


def shard(full: torch.Tensor, dim: int, rank: int, size: int, stride: int = 1) -> torch.Tensor:
    """This rank's piece of `full` along `dim`; with stride s, the s blocks are split separately."""
    if size == 1:
        return full
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(size, dim=dim)[rank] for b in blocks], dim=dim).contiguous()


def unshard(pieces: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of `shard`: rebuild the full tensor from every rank's piece, in rank order."""
    if len(pieces) == 1:
        return pieces[0]
    split = [p.chunk(stride, dim=dim) for p in pieces]
    return torch.cat([split[r][s] for s in range(stride) for r in range(len(pieces))], dim=dim)


T = TypeVar("T", bound=torch.Tensor)


def mark(p: T, tp_dim: Optional[int], init: str, stride: int = 1, sequence_parallel: Optional[bool] = None) -> T:
    """Attach the sharding description (module docstring) to `p`; returns `p`."""
    for key, value in (("tp_dim", tp_dim), ("tp_stride", stride), ("init", init)):
        setattr(p, key, value)
    if sequence_parallel is not None:
        setattr(p, "sequence_parallel", sequence_parallel)  # noqa: B010 (an attribute torch does not declare)
    return p


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def init_parameter(p: torch.Tensor, name: str, seed: int, tp_rank: int, tp_size: int) -> None:
    """Fill `p` with its shard of the full tensor drawn for `name` (see module docstring)."""
    kind = getattr(p, "init", "normal:0.02")
    if kind == "zeros":
        p.zero_()
        return
    if kind == "ones":
        p.fill_(1.0)
        return
    std = float(kind.split(":", 1)[1])
    dim = getattr(p, "tp_dim", None)
    shape = list(p.shape)
    if dim is not None:
        shape[dim] *= tp_size
    gen = torch.Generator().manual_seed(_name_seed(seed, name))
    full = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
    if dim is not None:
        full = shard(full, dim, tp_rank, tp_size, getattr(p, "tp_stride", 1))
    p.copy_(full.to(p.dtype))


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows: each rank computes out_features / tp outputs.

    Input: full hidden (B, T, C) or, with sequence parallelism, a sequence shard (B, T/tp, C)
    that is all-gathered first. Output: (B, T, out/tp), or gathered to (B, T, out).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: Group = None,
        bias: bool = True,
        std: float = 0.02,
        stride: int = 1,
        gather_output: bool = False,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        tp = group_size(group)
        if out_features % (tp * stride):
            raise ValueError(f"out_features={out_features} not divisible by tp x stride = {tp} x {stride}")
        self.group, self.gather_output, self.sequence_parallel = group, gather_output, sequence_parallel
        self.weight = mark(nn.Parameter(torch.empty(out_features // tp, in_features)), 0, f"normal:{std}", stride)
        self.bias = mark(nn.Parameter(torch.empty(out_features // tp)), 0, "zeros", stride) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_region(x, self.group)  # (B, T, C)
        else:
            x = copy_to_tp_region(x, self.group)
        y = F.linear(x, self.weight, self.bias)  # (B, T, out/tp)
        return gather_from_tp_region(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns: x arrives split along its last dim.

    Partial products are summed over TP (all-reduce), or reduce-scattered along the sequence
    with sequence parallelism. The bias is replicated and added once, after the reduction.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: Group = None,
        bias: bool = True,
        std: float = 0.02,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        tp = group_size(group)
        if in_features % tp:
            raise ValueError(f"in_features={in_features} not divisible by tp={tp}")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = mark(nn.Parameter(torch.empty(out_features, in_features // tp)), 1, f"normal:{std}")
        self.bias = (
            mark(nn.Parameter(torch.empty(out_features)), None, "zeros", sequence_parallel=sequence_parallel)
            if bias
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # (B, T, out) partial sum over TP ranks
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_region(y, self.group)  # (B, T/tp, out)
            bias = None if self.bias is None else copy_to_tp_region(self.bias, self.group)
        else:
            y = reduce_from_tp_region(y, self.group)
            bias = self.bias
        return y if bias is None else y + bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary split into contiguous row ranges over TP.

    Each rank looks up the rows it owns (others give zero) and the partial embeddings are summed
    over TP: (B, T) -> (B, T, C), or the sequence shard (B, T/tp, C) with sequence parallelism
    (reduce-scatter instead of all-reduce).
    """

    def __init__(
        self, num_embeddings: int, dim: int, group: Group = None, std: float = 0.02, sequence_parallel: bool = False
    ):
        super().__init__()
        tp = group_size(group)
        if num_embeddings % tp:
            raise ValueError(f"padded vocabulary {num_embeddings} not divisible by tp={tp}")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.num_embeddings = num_embeddings
        self.per_rank = num_embeddings // tp
        self.vocab_start = group_rank(group) * self.per_rank
        self.weight = mark(nn.Parameter(torch.empty(self.per_rank, dim)), 0, f"normal:{std}")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            return F.embedding(idx, self.weight)
        local = idx - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, C) partial over TP
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_region(out, self.group)  # (B, T/tp, C)
        return reduce_from_tp_region(out, self.group)


class PositionEmbedding(nn.Embedding):
    """Learned positions (B or 1, T) -> (B or 1, T, C), replicated over TP.

    With sequence parallelism each TP rank keeps the rows of its own slice of the sequence,
    (.., T/tp, C), and the weight's gradient is summed over TP (copy_to_tp_region: bwd all-reduce).
    """

    def __init__(
        self, num_positions: int, dim: int, group: Group = None, std: float = 0.02, sequence_parallel: bool = False
    ):
        super().__init__(num_positions, dim)
        self.group, self.sequence_parallel = group, sequence_parallel
        mark(self.weight, None, f"normal:{std}", sequence_parallel=sequence_parallel)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            return F.embedding(position_ids, self.weight)
        pos = F.embedding(position_ids, copy_to_tp_region(self.weight, self.group))  # (.., T, C)
        n = pos.shape[1] // group_size(self.group)
        r = group_rank(self.group)
        return pos[:, r * n : (r + 1) * n]


class ParallelLMHead(nn.Module):
    """Output head with a weight it does not own (tied to the token embedding, or the last
    pipeline stage's copy of it): (B, T, C), or (B, T/tp, C) with sequence parallelism ->
    this rank's vocabulary shard of the logits (B, T, V/tp). `gather` makes them (B, T, V)."""

    def __init__(self, group: Group = None, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_region(x, self.group)  # (B, T, C)
        else:
            x = copy_to_tp_region(x, self.group)
        return F.linear(x, weight)

    def gather(self, logits_shard: torch.Tensor) -> torch.Tensor:
        return gather_from_tp_region(logits_shard, self.group)
