"""Where a stored slice lies in its global tensor, and what part of it another layout needs.

Every slice in a checkpoint is "elements [start, start + numel) of the flattened TP shard t of T"
of one global tensor: TP splits dimension `dim` into `stride` blocks and each block into T equal
pieces (parallel.layers.shard); ZeRO then splits the flattened shard into contiguous ranges. Such
a slice is a union of contiguous runs of the *global* flattened tensor:

    global shape viewed as (pre, D, post), D = stride x B, B = T x c
    local shard of rank t: (pre, stride, c, post); local row r = p x stride + k holds c x post
    consecutive elements starting at global flat index (p x D + k x B + t x c) x post

so a flat local range is a partial row, whole rows and a partial row. A reader under another
layout describes what it needs the same way; intersecting the two run lists says which stored
elements go where. Row-split (dim 0) and replicated tensors are one run per stride block; only
column-split weights (dim 1) are one run per row, handled with vectorised numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class Runs:
    """Sorted, disjoint runs of a global flat index space: run i covers global
    [start[i], start[i] + length[i]) and sits at offset[i] of the slice it describes."""

    start: np.ndarray
    length: np.ndarray
    offset: np.ndarray

    @property
    def numel(self) -> int:
        return int(self.length.sum())


def shard_runs(
    shape: Sequence[int], dim: Optional[int], stride: int, tp_rank: int, tp_size: int, start: int, numel: int
) -> Runs:
    """Global runs of elements [start, start + numel) of the flattened TP shard tp_rank / tp_size."""
    if numel <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return Runs(empty, empty, empty)
    if dim is None or tp_size == 1:
        one = np.array([start], dtype=np.int64)
        return Runs(one, np.array([numel], dtype=np.int64), np.zeros(1, dtype=np.int64))
    D, post = shape[dim], math.prod(shape[dim + 1 :])
    B = D // stride
    c = B // tp_size
    width = c * post  # elements of one local row
    rows = np.arange(start // width, (start + numel - 1) // width + 1, dtype=np.int64)
    lo = np.maximum(start, rows * width)
    hi = np.minimum(start + numel, (rows + 1) * width)
    p, k = np.divmod(rows, stride)
    gstart = (p * D + k * B + tp_rank * c) * post + (lo - rows * width)
    return Runs(gstart, hi - lo, lo - start)


def check_split(shape: Sequence[int], dim: Optional[int], stride: int, tp_size: int) -> Optional[str]:
    """Why `shape` cannot be split this way, or None."""
    if dim is None or tp_size == 1:
        return None
    if not 0 <= dim < len(shape):
        return f"split dimension {dim} is outside shape {tuple(shape)}"
    if shape[dim] % (stride * tp_size):
        return f"dimension {dim} of {tuple(shape)} is not divisible by stride x tp = {stride} x {tp_size}"
    return None


def intersect(need: Runs, have: Runs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offset in need, offset in have, length) of every piece both run lists cover."""
    if not len(need.start) or not len(have.start):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    need_end, have_end = need.start + need.length, have.start + have.length
    if len(need.start) == 1 and len(have.start) == 1:  # the common case: one contiguous range each
        lo, hi = max(need.start[0], have.start[0]), min(need_end[0], have_end[0])
        if lo >= hi:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        return (
            np.array([need.offset[0] + lo - need.start[0]]),
            np.array([have.offset[0] + lo - have.start[0]]),
            np.array([hi - lo]),
        )
    points = np.unique(np.concatenate([need.start, need_end, have.start, have_end]))
    x0, x1 = points[:-1], points[1:]
    i = np.searchsorted(need.start, x0, side="right") - 1
    j = np.searchsorted(have.start, x0, side="right") - 1
    ok = (i >= 0) & (j >= 0)
    i, j = np.where(ok, i, 0), np.where(ok, j, 0)
    ok &= (x0 < need_end[i]) & (x0 < have_end[j])
    i, j, x0, x1 = i[ok], j[ok], x0[ok], x1[ok]
    return need.offset[i] + x0 - need.start[i], have.offset[j] + x0 - have.start[j], x1 - x0


def copy_runs(
    dest: torch.Tensor, src: torch.Tensor, dst_off: np.ndarray, src_off: np.ndarray, length: np.ndarray
) -> None:
    """dest[dst_off[i] : + length[i]] = src[src_off[i] : + length[i]] for every i (1-D tensors)."""
    if len(length) <= 32:
        for d, s, n in zip(dst_off.tolist(), src_off.tolist(), length.tolist()):
            dest[d : d + n].copy_(src[s : s + n])
        return
    total = int(length.sum())
    within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(length) - length, length)
    dst_idx = torch.from_numpy(np.repeat(dst_off, length) + within)
    src_idx = torch.from_numpy(np.repeat(src_off, length) + within)
    dest[dst_idx.to(dest.device)] = src[src_idx.to(src.device)].to(device=dest.device, dtype=dest.dtype)
