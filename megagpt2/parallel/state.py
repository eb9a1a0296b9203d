"""Where each rank sits in the TP x DP x PP grid (`ParallelLayout`) and its process groups.

Rank grid (Megatron's order, tensor-parallel fastest so a TP group stays inside a node):

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

e.g. tp=2, pp=2, dp=2 on 8 ranks: TP groups {0,1} {2,3} {4,5} {6,7}; DP groups {0,2} {1,3}
{4,6} {5,7}; PP groups {0,4} {1,5} {2,6} {3,7}. The "model-parallel" group DeepSpeed asks for is
TP x PP (all ranks holding different parts of one model replica: {0,1,4,5} and {2,3,6,7}); the
embedding group pairs the first and last stage of each pipeline (they share the tied embedding).

`ParallelLayout` is plain data, built with no processes: the run plan checks it before anything
starts and tests enumerate layouts of any size. `build_process_groups(layout, timeout)` creates
every group from that one grid, collectively, once torch.distributed runs; `ProcessGroups.single()`
is the layout of one process, with no groups and no torch.distributed at all.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

GROUP_KINDS = ("tp", "dp", "pp", "mp", "embedding")


class ParallelLayoutError(ValueError):
    """Sizes that do not make a rank grid (world size, tp, pp, rank)."""


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of the grid and this rank's place in it."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedule)
    rank: int = 0

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "virtual_stages"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ParallelLayoutError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.rank < self.world_size:
            raise ParallelLayoutError(
                f"rank {self.rank} is outside world size {self.world_size} (tp {self.tp} x pp {self.pp} x dp {self.dp})"
            )

    @classmethod
    def for_world(
        cls, world_size: int, tp: int = 1, pp: int = 1, virtual_stages: int = 1, rank: int = 0
    ) -> ParallelLayout:
        """The layout of `world_size` ranks: data parallelism is what tp x pp leaves."""
        if tp < 1 or pp < 1 or world_size % (tp * pp):
            raise ParallelLayoutError(
                f"world size {world_size} is not divisible by parallel.tp x parallel.pp = "
                f"{tp} x {pp}; start a multiple of {tp * pp} ranks or change parallel.tp/pp"
            )
        return cls(tp, pp, world_size // (tp * pp), virtual_stages, rank)

    def with_rank(self, rank: int) -> ParallelLayout:
        return replace(self, rank=rank)

    # -- coordinates -------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.tp * self.dp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def model_parallel_rank(self) -> int:
        """Rank inside the TP x PP group (DeepSpeed's `mpu.get_model_parallel_rank`)."""
        return self.pp_rank * self.tp + self.tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def rank_of(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        """Global rank at grid coordinates (tp_rank, dp_rank, pp_rank)."""
        return pp_rank * (self.dp * self.tp) + dp_rank * self.tp + tp_rank

    # -- groups as rank tuples ---------------------------------------------------------------
    def groups(self, kind: str) -> list[tuple[int, ...]]:
        """Every group of `kind` (tp, dp, pp, mp, embedding) in the grid, in creation order."""
        tp, dp, pp, at = self.tp, self.dp, self.pp, self.rank_of
        if kind == "tp":
            return [tuple(at(t, d, p) for t in range(tp)) for p in range(pp) for d in range(dp)]
        if kind == "dp":
            return [tuple(at(t, d, p) for d in range(dp)) for p in range(pp) for t in range(tp)]
        if kind == "pp":
            return [tuple(at(t, d, p) for p in range(pp)) for d in range(dp) for t in range(tp)]
        if kind == "mp":
            return [tuple(at(t, d, p) for p in range(pp) for t in range(tp)) for d in range(dp)]
        if kind == "embedding":  # first and last stage of each pipeline; none without pipelining
            return [(g[0], g[-1]) for g in self.groups("pp")] if pp > 1 else []
        raise ValueError(f"unknown group kind {kind!r}; one of {', '.join(GROUP_KINDS)}")

    def group_of(self, kind: str) -> tuple[int, ...]:
        """The ranks of this rank's group of `kind` (empty for no embedding group)."""
        return next((g for g in self.groups(kind) if self.rank in g), ())

    @property
    def pp_ranks(self) -> tuple[int, ...]:
        """This rank's pipeline, stage 0 first."""
        return tuple(self.rank_of(self.tp_rank, self.dp_rank, p) for p in range(self.pp))

    @property
    def prev_stage_rank(self) -> int:
        """Previous stage of this pipeline (a ring: stage 0's previous is the last stage)."""
        return self.pp_ranks[(self.pp_rank - 1) % self.pp]

    @property
    def next_stage_rank(self) -> int:
        return self.pp_ranks[(self.pp_rank + 1) % self.pp]

    @property
    def first_stage_rank(self) -> int:
        return self.pp_ranks[0]

    @property
    def last_stage_rank(self) -> int:
        return self.pp_ranks[-1]

    def __str__(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp}, pp {self.pp_rank}/{self.pp}, "
            f"dp {self.dp_rank}/{self.dp}"
        )


@dataclass(frozen=True)
class ProcessGroups:
    """This rank's process groups of a layout; also DeepSpeed's `mpu` (the methods it calls).

    A group is None only where there is none: in a single process (`single()`), and for the
    embedding group and pipeline channels without pipelining. Code that needs a group's size
    goes through megagpt2.parallel.comm, where None means one rank (never the whole world).
    """

    layout: ParallelLayout
    tp: Optional[ProcessGroup] = None
    dp: Optional[ProcessGroup] = None
    pp: Optional[ProcessGroup] = None
    mp: Optional[ProcessGroup] = None  # TP x PP: one model replica
    embedding: Optional[ProcessGroup] = None  # first + last stage of this pipeline (tied weight)
    pipe_forward: Optional[ProcessGroup] = None  # this pipeline's activation channel
    pipe_backward: Optional[ProcessGroup] = None  # this pipeline's gradient channel

    @classmethod
    def single(cls) -> ProcessGroups:
        """One process, whole model: no groups, no torch.distributed needed."""
        return cls(ParallelLayout())

    # -- DeepSpeed mpu interface (what deepspeed.initialize(mpu=...) calls) -------------------
    def get_data_parallel_group(self) -> Any:
        return self.dp

    def get_data_parallel_rank(self) -> int:
        return self.layout.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.layout.group_of("dp"))

    def get_model_parallel_group(self) -> Any:
        return self.mp

    def get_model_parallel_rank(self) -> int:
        return self.layout.model_parallel_rank

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tp * self.layout.pp

    def get_tensor_model_parallel_group(self) -> Any:
        return self.tp

    def get_tensor_model_parallel_rank(self) -> int:
        return self.layout.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.layout.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.layout.rank_of(0, self.layout.dp_rank, self.layout.pp_rank)

    def get_pipeline_model_parallel_group(self) -> Any:
        return self.pp

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.layout.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.layout.pp

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size


def build_process_groups(layout: ParallelLayout, timeout_seconds: Optional[float] = None) -> ProcessGroups:
    """Every group of `layout`, created from its one rank grid (collective over the world).

    torch.distributed must be running with layout.world_size ranks, this one being layout.rank.
    Every rank creates every group in the same order (torch.distributed's rule) and keeps its
    own; each pipeline gets two more (activations and gradients, see pipeline/p2p.py).
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("build_process_groups needs torch.distributed; in one process use ProcessGroups.single()")
    if (dist.get_world_size(), dist.get_rank()) != (layout.world_size, layout.rank):
        raise ParallelLayoutError(
            f"the layout is for {layout} but torch.distributed runs rank {dist.get_rank()} of {dist.get_world_size()}"
        )
    timeout = timedelta(seconds=timeout_seconds) if timeout_seconds else None
    mine: dict[str, Any] = {}
    for kind in GROUP_KINDS:
        for ranks in layout.groups(kind):
            group = dist.new_group(list(ranks), timeout=timeout)
            if layout.rank in ranks:
                mine[kind] = group
    if layout.pp > 1:
        for ranks in layout.groups("pp"):
            forward = dist.new_group(list(ranks), timeout=timeout)
            backward = dist.new_group(list(ranks), timeout=timeout)
            if layout.rank in ranks:
                mine["pipe_forward"], mine["pipe_backward"] = forward, backward
    groups = ProcessGroups(layout, **mine)
    if layout.pp > 1:  # NCCL wants the first call on a group to involve all of its ranks; p2p calls do not
        import torch

        from .collectives import all_reduce_small

        for group in (groups.pipe_forward, groups.pipe_backward):
            all_reduce_small(torch.zeros(1), group=group)
    return groups
