"""GPT-2 (Radford et al. 2019), written like a single-device model.

Pre-LayerNorm blocks, a final LayerNorm, learned positions, GELU (tanh), the output projection
tied to the token embedding, residual projections initialised with std 0.02 / sqrt(2 n_layer).
Parallelism comes only from the layers it is built from: at tp=1 they are plain linears and the
model is exactly nanoGPT / Hugging Face GPT-2. Shapes are given for tp=1; with tensor parallelism
the hidden of attention/MLP and the vocabulary are split by tp, and with sequence parallelism the
residual stream is (B, T/tp, C) between blocks.

A model may hold only part of the network (a pipeline stage): `layers` lists the global indices
of the blocks it owns, `pre_process` adds the embeddings, `post_process` the final LayerNorm and
the output head. Parameter names use global block indices, so they mean the same thing in every
layout (`h.7.attn.c_attn.weight` is block 7 wherever it lives).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..kernels import LayerNorm as KernelLayerNorm, layer_norm
from ..parallel import (
    ColumnParallelLinear,
    ParallelState,
    RNGTracker,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tp_region,
    gather_from_sequence_region,
    gather_from_tp_region,
    init_parameter,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
    vocab_parallel_cross_entropy,
)
from ..parallel.layers import mark
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
        mark(self.weight, None, "ones").sequence_parallel = sequence_parallel
        mark(self.bias, None, "zeros").sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return super().forward(x)
        w, b = copy_to_tp_region(self.weight, self.group), copy_to_tp_region(self.bias, self.group)
        return layer_norm(x, w, b, self.eps, impl=self.impl)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, sp: bool, tracker: Optional[RNGTracker]):
        super().__init__()
        C, L = cfg.n_embd, cfg.n_layer
        self.cfg, self.tracker = cfg, tracker
        self.n_head_local = cfg.n_head // ps.tp_size
        # Fused q/k/v: the full weight is [q; k; v], each split by heads over TP (stride 3).
        self.c_attn = ColumnParallelLinear(C, 3 * C, ps.tp_group, std=cfg.init_std, stride=3, sequence_parallel=sp)
        self.c_proj = RowParallelLinear(C, C, ps.tp_group, std=cfg.init_std / math.sqrt(2 * L), sequence_parallel=sp)

    def forward(self, x: torch.Tensor, past: Optional[tuple] = None, mask: Optional[torch.Tensor] = None):
        qkv = self.c_attn(x)  # (B, T, 3C/tp)
        B, T, _ = qkv.shape
        q, k, v = (t.view(B, T, self.n_head_local, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # (B, h, T, D)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        p = self.cfg.attn_dropout if self.training else 0.0
        ctx = self.tracker.fork() if (self.tracker is not None and p > 0) else contextlib.nullcontext()
        with ctx:  # heads differ per TP rank: their dropout streams must too
            y = attention(q, k, v, path=self.cfg.attention, kernels=self.cfg.kernels,
                          dropout_p=p, training=self.training, mask=mask)  # (B, h, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C/tp)
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, sp: bool):
        super().__init__()
        C, L = cfg.n_embd, cfg.n_layer
        self.c_fc = ColumnParallelLinear(C, 4 * C, ps.tp_group, std=cfg.init_std, sequence_parallel=sp)
        self.c_proj = RowParallelLinear(4 * C, C, ps.tp_group, std=cfg.init_std / math.sqrt(2 * L), sequence_parallel=sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState, sp: bool, tracker: Optional[RNGTracker]):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_eps, cfg.kernels, ps.tp_group, sp)
        self.attn = CausalSelfAttention(cfg, ps, sp, tracker)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_eps, cfg.kernels, ps.tp_group, sp)
        self.mlp = MLP(cfg, ps, sp)
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
    """GPT-2, or the part of it one pipeline stage owns (see module docstring)."""

    def __init__(self, cfg: ModelConfig, ps: Optional[ParallelState] = None, sequence_parallel: bool = False,
                 layers: Optional[Sequence[int]] = None, pre_process: bool = True, post_process: bool = True,
                 seed: int = 1234):
        super().__init__()
        ps = ps or ParallelState()
        self.cfg, self.ps, self.sp = cfg, ps, sequence_parallel and ps.tp_size > 1
        self.pre_process, self.post_process = pre_process, post_process
        needs_tracker = ps.tp_size > 1 and (cfg.dropout > 0 or cfg.attn_dropout > 0)
        self.tracker = RNGTracker(seed, ps.tp_rank) if needs_tracker else None
        layers = list(range(cfg.n_layer)) if layers is None else list(layers)
        V, C = cfg.padded_vocab_size, cfg.n_embd
        if pre_process:
            self.wte = VocabParallelEmbedding(V, C, ps.tp_group, std=cfg.init_std)
            self.wpe = nn.Embedding(cfg.n_positions, C)  # learned positions
            mark(self.wpe.weight, None, f"normal:{cfg.init_std}").sequence_parallel = self.sp
        self.h = nn.ModuleDict({str(i): Block(cfg, ps, self.sp, self.tracker) for i in layers})
        self.emb_dropout = _ResidualDropout(cfg.dropout, self.tracker if self.sp else None)
        if post_process:
            self.ln_f = LayerNorm(C, cfg.layer_norm_eps, cfg.kernels, ps.tp_group, self.sp)
            if not pre_process:
                # Pipeline: the last stage's copy of the tied embedding. A plain tensor, not a
                # parameter: the first stage owns it in the optimizer (see megagpt2.pipeline).
                self.register_buffer("head_weight", torch.empty(V // ps.tp_size, C), persistent=False)
        # DeepSpeed counts a parameter in the global grad norm when p.model_parallel is set or the
        # rank is tensor-parallel rank 0 (ZeRO 1/2) / model-parallel rank 0 (ZeRO 0). So: shards
        # are marked everywhere; TP-replicated parameters only on tp_rank 0, once per stage.
        for p in self.parameters():
            p.model_parallel = getattr(p, "tp_dim", None) is not None or ps.tp_rank == 0
        self.init_weights(seed)

    # -- init -----------------------------------------------------------------------------
    def init_weights(self, seed: int) -> None:
        """Every parameter drawn from its global name (identical for any tp / pp layout)."""
        for name, p in self.named_parameters():
            init_parameter(p, name, seed, self.ps.tp_rank, self.ps.tp_size)
        if self.pre_process:
            self._zero_padding_rows(self.wte.weight)
        if self.post_process and not self.pre_process:
            self.head_weight.copy_(self._drawn_wte(seed))
            self._zero_padding_rows(self.head_weight)

    @torch.no_grad()
    def _zero_padding_rows(self, w: torch.Tensor) -> None:
        """Rows past the real vocabulary are never looked up and their logits are masked; zero
        keeps them out of exported weights and makes ours -> HF -> ours exact."""
        start = self.ps.tp_rank * w.shape[0]
        first_pad = max(self.cfg.vocab_size - start, 0)
        if first_pad < w.shape[0]:
            w[first_pad:] = 0.0

    def _drawn_wte(self, seed: int) -> torch.Tensor:
        w = mark(torch.empty_like(self.head_weight), 0, f"normal:{self.cfg.init_std}")
        init_parameter(w, "wte.weight", seed, self.ps.tp_rank, self.ps.tp_size)
        return w

    @property
    def output_weight(self) -> torch.Tensor:
        return self.wte.weight if self.pre_process else self.head_weight

    # -- pieces (used directly by the pipeline schedule) -----------------------------------
    def embed(self, idx: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token + position embeddings: (B, T) -> (B, T, C), or (B, T/tp, C) with SP."""
        B, T = idx.shape
        if T > self.cfg.n_positions:
            raise ValueError(f"sequence of {T} tokens exceeds model.n_positions={self.cfg.n_positions}")
        tok = self.wte(idx)  # (B, T, C) partial over TP
        wpe = copy_to_tp_region(self.wpe.weight, self.ps.tp_group) if self.sp else self.wpe.weight
        if position_ids is None:
            position_ids = torch.arange(T, device=idx.device).unsqueeze(0)
        pos = F.embedding(position_ids, wpe)  # (1 or B, T, C)
        if self.sp:
            tok = reduce_scatter_to_sequence_region(tok, self.ps.tp_group)  # (B, T/tp, C)
            n = T // self.ps.tp_size
            pos = pos[:, self.ps.tp_rank * n:(self.ps.tp_rank + 1) * n]
        else:
            tok = reduce_from_tp_region(tok, self.ps.tp_group)
        return self.emb_dropout(tok + pos)

    def run_blocks(self, x: torch.Tensor, kv_cache: Optional[KVCache] = None,
                   mask: Optional[torch.Tensor] = None, block_ids: Optional[Sequence[int]] = None):
        """The blocks this model owns (or those of `block_ids`, global indices, for one
        pipeline chunk); returns (x, new_kv_cache or None)."""
        new_cache = [] if kv_cache is not None else None
        blocks = self.h.values() if block_ids is None else [self.h[str(i)] for i in block_ids]
        for j, block in enumerate(blocks):
            if self.cfg.activation_checkpointing and self.training and kv_cache is None:
                x = _checkpointed(block, x, self.tracker)
                continue
            x, kv = block(x, None if kv_cache is None else kv_cache[j], mask)
            if new_cache is not None:
                new_cache.append(kv)
        return x, new_cache

    def logits_local(self, x: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and output head: (B, T, C) -> this rank's vocab shard (B, T, V/tp)."""
        x = self.ln_f(x)
        if self.sp:
            x = gather_from_sequence_region(x, self.ps.tp_group)  # (B, T, C)
        else:
            x = copy_to_tp_region(x, self.ps.tp_group)
        return F.linear(x, self.output_weight)

    def loss(self, logits_local: torch.Tensor, targets: torch.Tensor,
             loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean cross-entropy over target tokens (those with loss_mask 1 and target != -100)."""
        per_token = vocab_parallel_cross_entropy(logits_local, targets, self.ps.tp_group, self.cfg.vocab_size)
        valid = (targets != -100).float()
        if loss_mask is not None:
            valid = valid * loss_mask.float()
        return (per_token * valid).sum() / valid.sum().clamp(min=1.0)

    def full_logits(self, logits_local: torch.Tensor) -> torch.Tensor:
        """Gather the vocabulary shards and drop the padding: (B, T, vocab_size)."""
        return gather_from_tp_region(logits_local, self.ps.tp_group)[..., : self.cfg.vocab_size]

    # -- whole model ---------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None, attn_mask: Optional[torch.Tensor] = None):
        """idx (B, T) -> mean loss if targets are given, else logits (B, T, vocab_size).

        With kv_cache (a list, one entry per block, None for an empty cache) returns
        (logits, new_cache) for incremental decoding; attn_mask (B, 1, Tq, Tk) bool,
        True = masked out, masks left padding.
        """
        if not (self.pre_process and self.post_process):
            raise RuntimeError("forward() needs the whole model; pipeline stages use embed/run_blocks/logits_local")
        x, new_cache = self.run_blocks(self.embed(idx, position_ids), kv_cache, attn_mask)
        logits = self.logits_local(x)
        if targets is not None:
            return self.loss(logits, targets, loss_mask)
        logits = self.full_logits(logits)
        return (logits, new_cache) if kv_cache is not None else logits

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and self.pre_process:
            n -= self.wpe.weight.numel()
        return n


def _checkpointed(block: Block, x: torch.Tensor, tracker: Optional[RNGTracker]) -> torch.Tensor:
    """Recompute `block` in backward; the TP dropout stream replays the same masks."""
    state = tracker.get_state() if tracker is not None else None
    calls = [0]

    def run(inp: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if tracker is None or calls[0] == 1:
            return block(inp)[0]
        current = tracker.get_state()  # recomputation: replay, then put the stream back
        tracker.set_state(state)
        try:
            return block(inp)[0]
        finally:
            tracker.set_state(current)

    return checkpoint(run, x, use_reentrant=False, preserve_rng_state=True)
