"""GPT-2 (Radford et al. 2019), written like a single-device model.

Pre-LayerNorm blocks, a final LayerNorm, learned positions, GELU (tanh), the output projection
tied to the token embedding, residual projections initialised with std 0.02 / sqrt(2 n_layer).
Parallelism comes only from the layers it is built from (their communication lives in them):
at tp=1 they are plain linears and the model is exactly nanoGPT / Hugging Face GPT-2. Shapes are
given for tp=1; with tensor parallelism the hidden of attention/MLP and the vocabulary are split
by tp, and with sequence parallelism the residual stream is (B, T/tp, C) between blocks.

Parameter names use global block indices (`h.7.attn.c_attn.weight` is block 7 in every
layout); a pipeline stage (megagpt2.pipeline.stage) holds some of the same modules under the
same names, built by the helpers at the end of this file.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..kernels import LayerNorm as KernelLayerNorm
from ..kernels import layer_norm
from ..parallel import ProcessGroups
from ..parallel.comm import copy_to_tp_region
from ..parallel.cross_entropy import vocab_parallel_cross_entropy
from ..parallel.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    PositionEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    init_parameter,
    mark,
)
from ..parallel.random import RNGTracker
from .attention_core import attention

KVCache = list  # per block: (k, v) of shape (B, H, T_past, D), or None


class LayerNorm(KernelLayerNorm):
    """The kernels' LayerNorm, made sequence-parallel aware.

    With sequence parallelism each TP rank normalises its own slice of the sequence, so the
    weight and bias gradients are partial: they go through copy_to_tp_region (bwd all-reduce).
    """

    def __init__(self, dim: int, eps: float, kernels: str, group=None, sequence_parallel: bool = False):
        super().__init__(dim, eps, kernels)
        self.group = group if sequence_parallel else None
        mark(self.weight, None, "ones", sequence_parallel=sequence_parallel)
        mark(self.bias, None, "zeros", sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return super().forward(x)
        w, b = copy_to_tp_region(self.weight, self.group), copy_to_tp_region(self.bias, self.group)
        return layer_norm(x, w, b, self.eps, impl=self.impl)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, groups: ProcessGroups, sp: bool, tracker: Optional[RNGTracker]):
        super().__init__()
        C, L = cfg.n_embd, cfg.n_layer
        self.cfg, self.tracker = cfg, tracker
        self.n_head_local = cfg.n_head // groups.layout.tp
        # Fused q/k/v: the full weight is [q; k; v], each split by heads over TP (stride 3).
        self.c_attn = ColumnParallelLinear(C, 3 * C, groups.tp, std=cfg.init_std, stride=3, sequence_parallel=sp)
        self.c_proj = RowParallelLinear(C, C, groups.tp, std=cfg.init_std / math.sqrt(2 * L), sequence_parallel=sp)

    def forward(self, x: torch.Tensor, past: Optional[tuple] = None, mask: Optional[torch.Tensor] = None):
        qkv = self.c_attn(x)  # (B, T, 3C/tp)
        B, T, _ = qkv.shape
        q, k, v = (t.view(B, T, self.n_head_local, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # (B, h, T, D)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        p = self.cfg.attn_dropout if self.training else 0.0
        ctx = self.tracker.fork() if (self.tracker is not None and p > 0) else contextlib.nullcontext()
        with ctx:  # heads differ per TP rank: their dropout streams must too
            y = attention(
                q,
                k,
                v,
                path=self.cfg.attention,
                kernels=self.cfg.kernels,
                dropout_p=p,
                training=self.training,
                mask=mask,
            )  # (B, h, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C/tp)
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, groups: ProcessGroups, sp: bool):
        super().__init__()
        C, L = cfg.n_embd, cfg.n_layer
        self.c_fc = ColumnParallelLinear(C, 4 * C, groups.tp, std=cfg.init_std, sequence_parallel=sp)
        self.c_proj = RowParallelLinear(4 * C, C, groups.tp, std=cfg.init_std / math.sqrt(2 * L), sequence_parallel=sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, groups: ProcessGroups, sp: bool, tracker: Optional[RNGTracker]):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_eps, cfg.kernels, groups.tp, sp)
        self.attn = CausalSelfAttention(cfg, groups, sp, tracker)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_eps, cfg.kernels, groups.tp, sp)
        self.mlp = MLP(cfg, groups, sp)
        self.dropout = _ResidualDropout(cfg.dropout, tracker if sp else None)

    def forward(self, x: torch.Tensor, past: Optional[tuple] = None, mask: Optional[torch.Tensor] = None):
        a, kv = self.attn(self.ln_1(x), past, mask)
        x = x + self.dropout(a)
        x = x + self.dropout(self.mlp(self.ln_2(x)))
        return x, kv


class _ResidualDropout(nn.Module):
    """Dropout on the residual stream: replicated over TP (default stream) unless sharded."""

    def __init__(self, p: float, tracker: Optional[RNGTracker]):
        super().__init__()
        self.p, self.tracker = p, tracker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.tracker is None:
            return F.dropout(x, self.p, True)
        with self.tracker.fork():
            return F.dropout(x, self.p, True)


class GPT2(nn.Module):
    """The whole GPT-2 on this rank's tensor-parallel group (`ProcessGroups.single()` for one process)."""

    def __init__(self, cfg: ModelConfig, groups: ProcessGroups, sequence_parallel: bool = False, seed: int = 1234):
        super().__init__()
        self.cfg, self.groups = cfg, groups
        self.sp = sequence_parallel and groups.layout.tp > 1
        self.tracker = dropout_tracker(cfg, groups, seed)
        self.wte, self.wpe, self.drop = build_embeddings(cfg, groups, self.sp, self.tracker)
        self.h = build_blocks(cfg, groups, self.sp, self.tracker, range(cfg.n_layer))
        self.ln_f, self.lm_head = build_head(cfg, groups, self.sp)
        prepare_parameters(self, groups, seed, cfg, self.wte)

    def forward(
        self,
        idx: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        attn_mask: Optional[torch.Tensor] = None,
    ):
        """idx (B, T) -> mean loss if targets are given, else logits (B, T, vocab_size).

        With kv_cache (a list, one entry per block, None for an empty cache) returns
        (logits, new_cache) for incremental decoding; attn_mask (B, 1, Tq, Tk) bool,
        True = masked out, masks left padding.
        """
        x = self.embed(idx, position_ids)  # (B, T, C)
        x, new_cache = self.run_blocks(x, kv_cache, attn_mask)
        logits = self.logits_local(x)  # (B, T, V/tp)
        if targets is not None:
            return self.loss(logits, targets, loss_mask)
        logits = self.full_logits(logits)  # (B, T, vocab_size)
        return (logits, new_cache) if kv_cache is not None else logits

    # -- the pieces of forward (evaluation scores tokens with them) ------------------------
    def embed(self, idx: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token + position embeddings: (B, T) -> (B, T, C), or (B, T/tp, C) with SP."""
        return embed_tokens(self.wte, self.wpe, self.drop, idx, position_ids)

    def run_blocks(
        self, x: torch.Tensor, kv_cache: Optional[KVCache] = None, mask: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[KVCache]]:
        """Every block; returns (x, new_kv_cache or None)."""
        return run_blocks(self.h.values(), x, self.tracker, self.checkpointing, kv_cache, mask)

    def logits_local(self, x: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and tied output head: (B, T, C) -> this rank's vocab shard (B, T, V/tp)."""
        return self.lm_head(self.ln_f(x), self.wte.weight)

    def loss(
        self, logits_local: torch.Tensor, targets: torch.Tensor, loss_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return lm_loss(logits_local, targets, loss_mask, self.groups, self.cfg.vocab_size)

    def full_logits(self, logits_local: torch.Tensor) -> torch.Tensor:
        """Gather the vocabulary shards and drop the padding: (B, T, vocab_size)."""
        return self.lm_head.gather(logits_local)[..., : self.cfg.vocab_size]

    @property
    def output_weight(self) -> torch.Tensor:
        return self.wte.weight

    @property
    def checkpointing(self) -> bool:
        return self.cfg.activation_checkpointing and self.training

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if exclude_embeddings else n


# -- building blocks shared with the pipeline stage (same modules, same names) -------------------
def dropout_tracker(cfg: ModelConfig, groups: ProcessGroups, seed: int) -> Optional[RNGTracker]:
    """The per-TP-rank dropout stream, where tensor parallelism and dropout need one."""
    if groups.layout.tp > 1 and (cfg.dropout > 0 or cfg.attn_dropout > 0):
        return RNGTracker(seed, groups.layout.tp_rank)
    return None


def build_embeddings(cfg: ModelConfig, groups: ProcessGroups, sp: bool, tracker: Optional[RNGTracker]):
    """(wte, wpe, drop): vocab-parallel tokens, learned positions, embedding dropout."""
    wte = VocabParallelEmbedding(cfg.padded_vocab_size, cfg.n_embd, groups.tp, std=cfg.init_std, sequence_parallel=sp)
    wpe = PositionEmbedding(cfg.n_positions, cfg.n_embd, groups.tp, std=cfg.init_std, sequence_parallel=sp)
    return wte, wpe, _ResidualDropout(cfg.dropout, tracker if sp else None)


def build_blocks(
    cfg: ModelConfig, groups: ProcessGroups, sp: bool, tracker: Optional[RNGTracker], ids: Iterable[int]
) -> nn.ModuleDict:
    """The blocks `ids` (global indices: their parameter names are the same in every layout)."""
    return nn.ModuleDict({str(i): Block(cfg, groups, sp, tracker) for i in ids})


def build_head(cfg: ModelConfig, groups: ProcessGroups, sp: bool) -> tuple[LayerNorm, ParallelLMHead]:
    """(ln_f, lm_head): the final LayerNorm and the output head (its weight is the embedding's)."""
    return LayerNorm(cfg.n_embd, cfg.layer_norm_eps, cfg.kernels, groups.tp, sp), ParallelLMHead(groups.tp, sp)


def prepare_parameters(
    model: nn.Module, groups: ProcessGroups, seed: int, cfg: ModelConfig, wte: Optional[VocabParallelEmbedding]
) -> None:
    """Mark each parameter for DeepSpeed's grad-norm rule and draw it from its global name.

    DeepSpeed counts a parameter in the global grad norm when p.model_parallel is set or the rank
    is tensor-parallel rank 0 (ZeRO 1/2) / model-parallel rank 0 (ZeRO 0). So: shards are marked
    everywhere; TP-replicated parameters only on tp_rank 0, once per stage. Every parameter is
    the same for any tp / pp layout; padding rows of the embedding `wte` (if held) are zero."""
    tp_rank, tp = groups.layout.tp_rank, groups.layout.tp
    for name, p in model.named_parameters():
        setattr(p, "model_parallel", getattr(p, "tp_dim", None) is not None or tp_rank == 0)  # noqa: B010
        init_parameter(p, name, seed, tp_rank, tp)
    if wte is not None:
        zero_padding_rows(wte.weight, cfg.vocab_size, tp_rank)


@torch.no_grad()
def zero_padding_rows(w: torch.Tensor, vocab_size: int, tp_rank: int) -> None:
    """Rows past the real vocabulary are never looked up and their logits are masked; zero
    keeps them out of exported weights and makes ours -> HF -> ours exact."""
    start = tp_rank * w.shape[0]
    first_pad = max(vocab_size - start, 0)
    if first_pad < w.shape[0]:
        w[first_pad:] = 0.0


def embed_tokens(
    wte: VocabParallelEmbedding,
    wpe: PositionEmbedding,
    drop: nn.Module,
    idx: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """drop(wte(idx) + wpe(positions)): (B, T) -> (B, T, C), or (B, T/tp, C) with SP."""
    B, T = idx.shape
    if T > wpe.num_embeddings:
        raise ValueError(f"sequence of {T} tokens exceeds model.n_positions={wpe.num_embeddings}")
    if position_ids is None:
        position_ids = torch.arange(T, device=idx.device).unsqueeze(0)  # (1, T)
    return drop(wte(idx) + wpe(position_ids))


def run_blocks(
    blocks: Iterable[nn.Module],
    x: torch.Tensor,
    tracker: Optional[RNGTracker],
    checkpointing: bool,
    kv_cache: Optional[KVCache] = None,
    mask: Optional[torch.Tensor] = None,
):
    """x through `blocks` in order -> (x, new_kv_cache or None); recomputed in backward when
    `checkpointing` (never while decoding with a cache)."""
    new_cache = [] if kv_cache is not None else None
    for j, block in enumerate(blocks):
        if checkpointing and kv_cache is None:
            x = _checkpointed(block, x, tracker)
            continue
        x, kv = block(x, None if kv_cache is None else kv_cache[j], mask)
        if new_cache is not None:
            new_cache.append(kv)
    return x, new_cache


def lm_loss(
    logits_local: torch.Tensor,
    targets: torch.Tensor,
    loss_mask: Optional[torch.Tensor],
    groups: ProcessGroups,
    vocab_size: int,
) -> torch.Tensor:
    """Mean cross-entropy over target tokens (those with loss_mask 1 and target != -100)."""
    per_token = vocab_parallel_cross_entropy(logits_local, targets, groups.tp, vocab_size)
    valid = (targets != -100).float()
    if loss_mask is not None:
        valid = valid * loss_mask.float()
    return (per_token * valid).sum() / valid.sum().clamp(min=1.0)


def _checkpointed(block: nn.Module, x: torch.Tensor, tracker: Optional[RNGTracker]) -> torch.Tensor:
    """Recompute `block` in backward; the TP dropout stream replays the same masks."""
    state = tracker.get_state() if tracker is not None else None
    calls = [0]

    def run(inp: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if tracker is None or calls[0] == 1:
            return block(inp)[0]
        assert state is not None
        current = tracker.get_state()  # recomputation: replay, then put the stream back
        tracker.set_state(state)
        try:
            return block(inp)[0]
        finally:
            tracker.set_state(current)

    return checkpoint(run, x, use_reentrant=False, preserve_rng_state=True)
