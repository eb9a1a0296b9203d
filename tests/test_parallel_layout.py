"""ParallelLayout without processes, and the groups build_process_groups makes from it on 8 ranks.

The reference is independent of the code under test: the world's ranks laid out as a numpy
array of shape (pp, dp, tp) (Megatron's order, tensor-parallel fastest), whose rows, columns
and slices are the groups.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from megagpt2.parallel import ParallelLayout, ParallelLayoutError, ProcessGroups
from tests.dist_utils import run_distributed

SIZES = (1, 2, 3, 4, 8)
GRIDS = [
    (tp, pp, dp, v)
    for tp, pp, dp in itertools.product(SIZES, SIZES, SIZES)
    if tp * pp * dp <= 64
    for v in ((1, 2) if pp > 1 else (1,))
]
GLOO_WORLD = 8
GLOO_LAYOUTS = [(tp, pp) for tp in (1, 2, 4, 8) for pp in (1, 2, 4, 8) if GLOO_WORLD % (tp * pp) == 0]


def reference_groups(tp: int, pp: int, dp: int) -> dict[str, list[tuple[int, ...]]]:
    """Every group of each kind, read off the (pp, dp, tp) rank grid."""
    grid = np.arange(tp * pp * dp).reshape(pp, dp, tp)
    groups = {
        "tp": [tuple(grid[p, d, :]) for p in range(pp) for d in range(dp)],
        "dp": [tuple(grid[p, :, t]) for p in range(pp) for t in range(tp)],
        "pp": [tuple(grid[:, d, t]) for d in range(dp) for t in range(tp)],
        "mp": [tuple(grid[:, d, :].ravel()) for d in range(dp)],
        "embedding": [(grid[0, d, t], grid[-1, d, t]) for d in range(dp) for t in range(tp)] if pp > 1 else [],
    }
    return {k: [tuple(int(r) for r in g) for g in v] for k, v in groups.items()}


@pytest.mark.parametrize("tp,pp,dp,v", GRIDS, ids=[f"tp{a}-pp{b}-dp{c}-v{d}" for a, b, c, d in GRIDS])
def test_layout_coordinates_and_groups_without_processes(tp, pp, dp, v):
    world = tp * pp * dp
    want = reference_groups(tp, pp, dp)
    for rank in range(world):
        layout = ParallelLayout.for_world(world, tp, pp, v, rank)
        p, d, t = np.unravel_index(rank, (pp, dp, tp))
        assert (layout.tp_rank, layout.dp_rank, layout.pp_rank) == (t, d, p)
        assert (layout.tp, layout.pp, layout.dp, layout.virtual_stages, layout.world_size) == (tp, pp, dp, v, world)
        assert layout.rank_of(t, d, p) == rank
        assert layout.is_first_stage == (p == 0) and layout.is_last_stage == (p == pp - 1)
        for kind in ("tp", "dp", "pp", "mp", "embedding"):
            assert layout.groups(kind) == want[kind], kind
            mine = [g for g in want[kind] if rank in g]
            assert layout.group_of(kind) == (mine[0] if mine else ())
            assert len(mine) <= 1  # each rank is in at most one group of each kind
        pipeline = want["pp"][d * tp + t]
        assert layout.pp_ranks == pipeline
        assert (layout.first_stage_rank, layout.last_stage_rank) == (pipeline[0], pipeline[-1])
        assert layout.next_stage_rank == pipeline[(p + 1) % pp] and layout.prev_stage_rank == pipeline[(p - 1) % pp]
        assert layout.model_parallel_rank == layout.group_of("mp").index(rank)
    for kind in ("tp", "dp", "pp", "mp"):  # each kind partitions the world
        assert sorted(r for g in want[kind] for r in g) == list(range(world))


def test_layout_refuses_what_is_not_a_grid():
    with pytest.raises(ParallelLayoutError, match="world size 6 is not divisible by parallel.tp x parallel.pp = 2 x 2"):
        ParallelLayout.for_world(6, tp=2, pp=2)
    with pytest.raises(ParallelLayoutError, match="rank 8 is outside world size 8"):
        ParallelLayout.for_world(8, tp=2, rank=8)
    with pytest.raises(ParallelLayoutError, match="tp must be a positive integer"):
        ParallelLayout(tp=0)


def test_single_process_groups_need_no_torch_distributed():
    one = ProcessGroups.single()
    assert one.layout == ParallelLayout() and one.layout.world_size == 1
    assert (one.tp, one.dp, one.pp, one.mp, one.embedding) == (None,) * 5
    assert one.get_model_parallel_world_size() == one.get_data_parallel_world_size() == 1
    assert one.get_data_parallel_group_ranks() == [0]


def _groups_worker(rank: int, world: int, layouts: list) -> list[dict]:
    """For each (tp, pp): the members of every group build_process_groups gave this rank, and
    the sum of ranks an all-reduce over each group computes (the group really connects them)."""
    import torch
    import torch.distributed as dist

    from megagpt2.parallel import build_process_groups

    out = []
    for tp, pp in layouts:
        groups = build_process_groups(ParallelLayout.for_world(world, tp, pp, rank=rank), timeout_seconds=60)
        got = {}
        for kind in ("tp", "dp", "pp", "mp", "embedding", "pipe_forward", "pipe_backward"):
            group = getattr(groups, kind)
            if group is None:
                got[kind] = None
                continue
            total = torch.tensor([float(rank)])
            dist.all_reduce(total, group=group)
            got[kind] = (tuple(dist.get_process_group_ranks(group)), int(total.item()))
        out.append(got)
    return out


def test_build_process_groups_on_8_gloo_ranks_matches_the_layout():
    per_rank = run_distributed(_groups_worker, GLOO_WORLD, args=(GLOO_LAYOUTS,), timeout=300)
    for i, (tp, pp) in enumerate(GLOO_LAYOUTS):
        for rank in range(GLOO_WORLD):
            layout, got = ParallelLayout.for_world(GLOO_WORLD, tp, pp, rank=rank), per_rank[rank][i]
            want = {kind: layout.group_of(kind) for kind in ("tp", "dp", "pp", "mp", "embedding")}
            if pp > 1:
                want["pipe_forward"] = want["pipe_backward"] = layout.pp_ranks
            for kind in ("tp", "dp", "pp", "mp", "embedding", "pipe_forward", "pipe_backward"):
                expected = want.get(kind) or None
                if expected is None:
                    assert got[kind] is None, (tp, pp, rank, kind)
                    continue
                assert got[kind] == (tuple(sorted(expected)), sum(expected)), (tp, pp, rank, kind)
