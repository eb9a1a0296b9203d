"""ParallelState: the TP x PP x DP process groups of one run, and DeepSpeed's `mpu` interface.

Rank layout (Megatron's order, tensor-parallel fastest so a TP group stays inside a node):

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

e.g. tp=2, pp=2, dp=2 on 8 ranks: TP groups {0,1} {2,3} {4,5} {6,7}; DP groups {0,2} {1,3}
{4,6} {5,7}; PP groups {0,4} {1,5} {2,6} {3,7}. The "model-parallel" group DeepSpeed asks for is
TP x PP (all ranks holding different parts of one model replica: {0,1,4,5} and {2,3,6,7}).

Built once, after torch.distributed is initialised, and passed explicitly to what needs it.
With no process group (a single process), every group is None and every size is 1.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Optional

import torch.distributed as dist


class ParallelState:
    """Process groups and coordinates of this rank in the (pp, dp, tp) grid."""

    def __init__(self, tp: int = 1, pp: int = 1, timeout_seconds: Optional[float] = None):
        initialized = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if initialized else 1
        self.rank = dist.get_rank() if initialized else 0
        if tp < 1 or pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={tp}, pp={pp}")
        if self.world_size % (tp * pp):
            raise ValueError(f"world size {self.world_size} is not divisible by tp x pp = {tp} x {pp}; "
                             f"start a multiple of {tp * pp} ranks or change parallel.tp/pp")
        self.tp_size, self.pp_size = tp, pp
        self.dp_size = self.world_size // (tp * pp)
        self.tp_rank = self.rank % tp
        self.dp_rank = (self.rank // tp) % self.dp_size
        self.pp_rank = self.rank // (tp * self.dp_size)
        self.tp_group = self.dp_group = self.pp_group = self.mp_group = self.embedding_group = None
        self._dp_ranks = [self.rank]
        self._pp_ranks = [self.rank]
        if initialized:
            self._build_groups(timeout_seconds)

    # -- layout -----------------------------------------------------------------------------
    def global_rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return pp_rank * (self.dp_size * self.tp_size) + dp_rank * self.tp_size + tp_rank

    def _build_groups(self, timeout_seconds: Optional[float]) -> None:
        # Every rank must create every group, in the same order (torch.distributed rule).
        kw = {"timeout": timedelta(seconds=timeout_seconds)} if timeout_seconds else {}
        tp, dp, pp = self.tp_size, self.dp_size, self.pp_size
        for p in range(pp):
            for d in range(dp):
                ranks = [self.global_rank(t, d, p) for t in range(tp)]
                g = dist.new_group(ranks, **kw)
                if self.rank in ranks:
                    self.tp_group = g
        for p in range(pp):
            for t in range(tp):
                ranks = [self.global_rank(t, d, p) for d in range(dp)]
                g = dist.new_group(ranks, **kw)
                if self.rank in ranks:
                    self.dp_group, self._dp_ranks = g, ranks
        for d in range(dp):
            for t in range(tp):
                ranks = [self.global_rank(t, d, p) for p in range(pp)]
                g = dist.new_group(ranks, **kw)
                if self.rank in ranks:
                    self.pp_group, self._pp_ranks = g, ranks
                # First and last stage share the tied embedding.
                emb = sorted({ranks[0], ranks[-1]})
                ge = dist.new_group(emb, **kw) if pp > 1 else None
                if self.rank in emb:
                    self.embedding_group = ge
        for d in range(dp):
            ranks = [self.global_rank(t, d, p) for p in range(pp) for t in range(tp)]
            g = dist.new_group(ranks, **kw)
            if self.rank in ranks:
                self.mp_group = g

    # -- pipeline helpers -------------------------------------------------------------------
    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_stage_rank(self) -> int:
        return self._pp_ranks[(self.pp_rank - 1) % self.pp_size]

    @property
    def next_stage_rank(self) -> int:
        return self._pp_ranks[(self.pp_rank + 1) % self.pp_size]

    @property
    def first_stage_rank(self) -> int:
        return self._pp_ranks[0]

    @property
    def last_stage_rank(self) -> int:
        return self._pp_ranks[-1]

    def __repr__(self) -> str:
        return (f"ParallelState(rank={self.rank}/{self.world_size}, tp={self.tp_rank}/{self.tp_size}, "
                f"pp={self.pp_rank}/{self.pp_size}, dp={self.dp_rank}/{self.dp_size})")

    # -- DeepSpeed mpu interface (the methods deepspeed.initialize(mpu=...) calls) -----------
    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._dp_ranks)

    def get_model_parallel_group(self):
        return self.mp_group

    def get_model_parallel_rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size * self.pp_size

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.global_rank(0, self.dp_rank, self.pp_rank)

    def get_pipeline_model_parallel_group(self):
        return self.pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp_size

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
