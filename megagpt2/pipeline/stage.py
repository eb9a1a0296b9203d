"""The part of GPT-2 one pipeline rank holds, runnable one model chunk at a time.

A PipelineStage holds the same modules as GPT2, under the same global names, for its share of
the network: the embeddings (`wte`, `wpe`) on the first rank, its blocks (`h.5.attn...` means
block 5 in every layout and checkpoint), and the final LayerNorm + output head on the last.
Its forward runs one chunk, so the DeepSpeed engine can wrap it like any model:
engine(x, targets, loss_mask, chunk=c) returns the chunk's output activation, or the mean loss
when the chunk ends the network.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..model.gpt2 import (
    build_blocks,
    build_embeddings,
    build_head,
    dropout_tracker,
    embed_tokens,
    lm_loss,
    prepare_parameters,
    run_blocks,
    zero_padding_rows,
)
from ..parallel import ProcessGroups
from ..parallel.layers import init_parameter, mark
from .partition import StageLayout


class PipelineStage(nn.Module):
    """This rank's model chunks; forward(x, targets, loss_mask, chunk) runs one of them."""

    head_weight: torch.Tensor  # the last stage's copy of wte.weight (a buffer)

    def __init__(
        self,
        cfg: ModelConfig,
        groups: ProcessGroups,
        split: StageLayout,
        sequence_parallel: bool = False,
        seed: int = 1234,
    ):
        super().__init__()
        layout = groups.layout
        self.cfg, self.groups, self.split = cfg, groups, split
        self.chunk_blocks = split.chunks(layout.pp_rank)
        self.sp = sequence_parallel and layout.tp > 1
        self.pre_process, self.post_process = layout.is_first_stage, layout.is_last_stage
        self.tracker = dropout_tracker(cfg, groups, seed)
        if self.pre_process:
            self.wte, self.wpe, self.drop = build_embeddings(cfg, groups, self.sp, self.tracker)
        self.h = build_blocks(cfg, groups, self.sp, self.tracker, [i for c in self.chunk_blocks for i in c])
        if self.post_process:
            self.ln_f, self.lm_head = build_head(cfg, groups, self.sp)
            if not self.pre_process:
                # The last stage's copy of the tied embedding. A plain tensor, not a parameter:
                # the first stage owns it in the optimizer (see tied.py).
                self.register_buffer(
                    "head_weight", torch.empty(cfg.padded_vocab_size // layout.tp, cfg.n_embd), persistent=False
                )
        # Stages hold disjoint parameters, so with the grad-norm marks each counts once.
        prepare_parameters(self, groups, seed, cfg, self.wte if self.pre_process else None)
        if self.post_process and not self.pre_process:
            self._draw_head_copy(seed)

    @torch.no_grad()
    def _draw_head_copy(self, seed: int) -> None:
        """head_weight := wte.weight as the first stage draws it (they start equal)."""
        w = mark(torch.empty_like(self.head_weight), 0, f"normal:{self.cfg.init_std}")
        init_parameter(w, "wte.weight", seed, self.groups.layout.tp_rank, self.groups.layout.tp)
        self.head_weight.copy_(w)
        zero_padding_rows(self.head_weight, self.cfg.vocab_size, self.groups.layout.tp_rank)

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

    @property
    def output_weight(self) -> torch.Tensor:
        return self.wte.weight if self.pre_process else self.head_weight

    def forward(
        self,
        x: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
        chunk: int = 0,
    ) -> torch.Tensor:
        """Token ids (B, T) or an activation (B, T, C) -> activation (B, T, C), or the mean loss
        (0-dim) when this chunk ends the network and targets are given."""
        if self.starts_network(chunk):
            x = embed_tokens(self.wte, self.wpe, self.drop, x)  # (B, T, C), or (B, T/tp, C) with SP
        blocks = [self.h[str(i)] for i in self.chunk_blocks[chunk]]
        x, _ = run_blocks(blocks, x, self.tracker, self.cfg.activation_checkpointing and self.training)
        if not self.ends_network(chunk):
            return x
        if targets is None:
            raise ValueError("the last pipeline stage needs targets to compute the loss")
        logits = self.lm_head(self.ln_f(x), self.output_weight)  # (B, T, V/tp)
        return lm_loss(logits, targets, loss_mask, self.groups, self.cfg.vocab_size)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def activation_shape(
    cfg: ModelConfig, micro_batch: int, seq_length: int, tp: int, sequence_parallel: bool
) -> tuple[int, int, int]:
    """Shape of every activation / gradient message between stages."""
    t = seq_length // tp if (sequence_parallel and tp > 1) else seq_length
    return micro_batch, t, cfg.n_embd


def build_stage(
    cfg: ModelConfig, groups: ProcessGroups, split: StageLayout, sequence_parallel: bool = False, seed: int = 1234
) -> PipelineStage:
    """This rank's PipelineStage of `split` (see partition.py)."""
    return PipelineStage(cfg, groups, split, sequence_parallel, seed)
