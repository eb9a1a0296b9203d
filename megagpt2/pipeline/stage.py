"""The part of GPT-2 one pipeline rank holds, runnable one model chunk at a time.

A PipelineStage is a GPT2 built with this rank's blocks (global names, so `h.5.attn...` means
the same in every layout and checkpoint), the embedding on the first rank and the final
LayerNorm + output head on the last. Its forward runs one chunk, so the DeepSpeed engine can
wrap it like any model: engine(x, targets, loss_mask, chunk=c) returns the chunk's output
activation, or the mean loss when the chunk ends the network.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..model import GPT2
from ..parallel import ParallelState
from .partition import StageLayout


class PipelineStage(GPT2):
    """This rank's model chunks; forward(x, targets, loss_mask, chunk) runs one of them."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, layout: StageLayout, sequence_parallel: bool = False,
                 seed: int = 1234):
        chunks = layout.chunks(ps.pp_rank)
        super().__init__(cfg, ps, sequence_parallel, layers=[i for c in chunks for i in c],
                         pre_process=ps.is_first_stage, post_process=ps.is_last_stage, seed=seed)
        # GPT2 marks each parameter for DeepSpeed's grad-norm rule (`model_parallel`: own shards,
        # TP-replicated ones on tp_rank 0): stages hold disjoint parameters, so each counts once.
        self.layout, self.chunk_blocks = layout, chunks

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_blocks)

    def starts_network(self, chunk: int) -> bool:
        """True for virtual stage 0: its input is token ids, not an activation."""
        return self.pre_process and chunk == 0

    def ends_network(self, chunk: int) -> bool:
        """True for the last virtual stage: its output is the loss."""
        return self.post_process and chunk == self.num_chunks - 1

    def chunk_parameters(self, chunk: int) -> list[nn.Parameter]:
        """Parameters used by `chunk` (embedding with chunk 0 of the first rank, LayerNorm last)."""
        params = [p for i in self.chunk_blocks[chunk] for p in self.h[str(i)].parameters()]
        if self.starts_network(chunk):
            params += list(self.wte.parameters()) + list(self.wpe.parameters())
        if self.ends_network(chunk):
            params += list(self.ln_f.parameters())
        return params

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None, chunk: int = 0) -> torch.Tensor:
        """Token ids (B, T) or an activation (B, T, C) -> activation (B, T, C), or the mean loss
        (0-dim) when this chunk ends the network and targets are given."""
        if self.starts_network(chunk):
            x = self.embed(x)  # (B, T, C), or (B, T/tp, C) with sequence parallelism
        x, _ = self.run_blocks(x, block_ids=self.chunk_blocks[chunk])
        if not self.ends_network(chunk):
            return x
        if targets is None:
            raise ValueError("the last pipeline stage needs targets to compute the loss")
        return self.loss(self.logits_local(x), targets, loss_mask)


def activation_shape(cfg: ModelConfig, micro_batch: int, seq_length: int, tp: int,
                     sequence_parallel: bool) -> tuple[int, int, int]:
    """Shape of every activation / gradient message between stages."""
    t = seq_length // tp if (sequence_parallel and tp > 1) else seq_length
    return micro_batch, t, cfg.n_embd
