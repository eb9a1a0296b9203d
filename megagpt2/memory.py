"""Per-rank memory of a training run, estimated from the config alone (no model is built).

    est = estimate(cfg.model, seq=1024, micro_batch=8, tp=2, pp=2, dp=4, zero_stage=2)
    est.peak, est.parameters, est.gradients, est.buckets, est.optimizer, est.activations, est.transient

What is counted is what megagpt2 and DeepSpeed 0.19 actually hold (checked against bytes
measured on CPU by tests/test_memory_estimate.py), not a textbook formula:

- parameters: this rank's shard of its pipeline stage (TP splits the matrices, the embedding
  rows and the vocabulary; LayerNorms and row-parallel biases are replicated), in the training
  dtype. A pipeline's last stage also holds its copy of the tied embedding (a buffer).
- gradients: ZeRO-0 keeps a full gradient per parameter; ZeRO 1 and 2 reduce through DeepSpeed's
  bucket buffers (two of `reduce_bucket_size` elements with overlap_comm, allocated at every
  backward) and keep, of the averaged gradients, the full set (ZeRO-1) or this rank's 1/dp
  partition (ZeRO-2).
- optimizer: AdamW's two fp32 moments, plus the fp32 master copy DeepSpeed keeps with ZeRO >= 1
  or half precision; sharded 1/dp with ZeRO >= 1.
- activations: the tensors autograd saves for backward, per micro-batch, times the micro-batches
  a pipeline rank holds at once under its schedule. Per block: the LayerNorm inputs (and, with
  activation checkpointing, only the block input), the inputs of the four matmuls, the q/k/v
  projection, the attention's own state (flash: the log-sum-exp, its output doubling as the
  c_proj input; the other paths: the (T x T) probabilities per head), the GELU input, the dropout
  masks; plus the output head's
  fp32 softmax over the vocabulary shard, which at GPT-2 sizes is often the largest single item.
- transient: the largest short-lived allocation on top of the saved activations: the logits next
  to the loss's fp32 softmax, or a block's backward (its MLP gradients, and under activation
  checkpointing the recomputed block).
- peak: the highest of the step's phases: the loss's backward (all activations of the micro-batches
  in flight + the logits), a block's backward (activations, the reduction buffers, earlier
  micro-batches' gradients), the end of backward (gradients and buffers).

Not modelled: interleaved pipeline chunks (virtual stages count as one chunk per rank). Half
precision has not been measured (CPU runs fp32): DeepSpeed may keep bf16 gradient partitions in
fp32. The step-1 log line shows the estimate next to the measured peak on any run.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from .config import ModelConfig

FP32, INT64, BOOL = 4, 8, 1


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank (one pipeline stage); `peak` is the highest point of a step."""

    parameters: int
    gradients: int  # kept gradients: full (ZeRO 0, 1) or this rank's partition (ZeRO-2)
    buckets: int  # DeepSpeed's gradient reduction buffers (ZeRO >= 1), alive through backward
    optimizer: int
    activations: int
    transient: int  # the logits next to the loss's softmax, or one block's backward (and recomputation)
    peak: int

    @property
    def static(self) -> int:
        """What lives between steps: weights and optimizer state."""
        return self.parameters + self.optimizer

    def describe(self, unit: float = 2**30) -> str:
        parts = [f"{f.name} {getattr(self, f.name) / unit:.2f}" for f in fields(self) if f.name != "peak"]
        return f"{self.peak / unit:.2f} GiB peak (" + ", ".join(parts) + ")"


def stage_parameters(cfg: ModelConfig, tp: int, n_blocks: int, first: bool, last: bool) -> tuple[int, int]:
    """(parameters, elements of the tied-embedding buffer of a pipeline's last stage), one TP rank."""
    C, V = cfg.n_embd, cfg.padded_vocab_size
    per_block = 4 * C + (3 * C * C + 3 * C) // tp + C * C // tp + C + (4 * C * C + 4 * C) // tp + 4 * C * C // tp + C
    n = n_blocks * per_block
    if first:
        n += V // tp * C + cfg.n_positions * C
    if last:
        n += 2 * C
    return n, (V // tp * C if last and not first else 0)


def block_activation_bytes(cfg: ModelConfig, b: int, T: int, tp: int, sp: bool, a: int, checkpointed: bool) -> int:
    """Bytes one block saves for backward, for b sequences of T tokens (a: bytes per element)."""
    C, hl = cfg.n_embd, cfg.n_head // tp
    Tl = T // tp if sp else T  # the residual stream's local sequence length
    if checkpointed:
        return b * Tl * C * a  # the block input only; the rest is recomputed in backward
    ln = 2 * (b * Tl * C * a + 2 * b * Tl * FP32)  # two LayerNorms: input + fp32 mean and rstd
    matmul_in = 2 * b * T * C * a + b * T * C // tp * a  # c_attn, c_fc (full or gathered); c_proj
    qkv, mlp = 3 * b * T * C // tp * a, 2 * 4 * b * T * C // tp * a  # q/k/v; GELU input and output
    if cfg.attention == "flash":
        # The log-sum-exp; the output, laid out (B, T, h, D), is the c_proj input counted above.
        attn = b * hl * T * FP32
    elif cfg.attention == "fused_softmax":
        attn = b * hl * T * T * a  # probabilities (used by the kernel's backward and by @ v)
    else:
        attn = b * hl * T * T * (FP32 + (a if a != FP32 else 0)) + T * T * BOOL  # fp32 softmax (+ cast), mask
    drop = 0
    if cfg.attn_dropout > 0 and cfg.attention != "flash":
        drop += b * hl * T * T * (BOOL + a)  # mask and the dropped probabilities
    if cfg.dropout > 0:
        drop += 2 * b * Tl * C * BOOL  # the two residual dropouts' masks
    return ln + matmul_in + qkv + mlp + attn + drop


def head_bytes(cfg: ModelConfig, b: int, T: int, tp: int, sp: bool, a: int) -> tuple[int, int]:
    """(saved, transient) of final LayerNorm + output head + vocab-parallel cross-entropy."""
    C, Vl = cfg.n_embd, cfg.padded_vocab_size // tp
    Tl = T // tp if sp else T
    saved = b * Tl * C * a + 2 * b * Tl * FP32 + b * T * C * a  # ln_f input + stats; head matmul input
    saved += b * T * Vl * FP32 + b * T * (INT64 + 2 * BOOL) + 3 * b * T * FP32  # softmax, targets, loss terms
    # The logits themselves, alive next to the fp32 softmax while the loss is computed (and, in
    # half precision, the gradient's cast back to it): the loss works in place on one fp32 buffer.
    transient = b * T * Vl * a
    return saved, transient


def embedding_bytes(cfg: ModelConfig, b: int, T: int, tp: int, sp: bool) -> int:
    Tl = T // tp if sp else T
    out = b * T * INT64 + T * INT64  # token and position ids
    if tp > 1:
        out += b * T * BOOL  # tokens outside this rank's vocabulary range
    if cfg.dropout > 0:
        out += b * Tl * cfg.n_embd * BOOL
    return out


def estimate(
    cfg: ModelConfig,
    seq: int,
    micro_batch: int,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    zero_stage: int = 2,
    precision: str = "bf16",
    sequence_parallel: bool = False,
    grad_accum: int = 1,
    schedule: str = "1f1b",
    stage: Optional[int] = None,
    reduce_bucket_size: int = 50_000_000,
    overlap_comm: bool = True,
    contiguous_gradients: bool = True,
) -> MemoryEstimate:
    """Per-rank bytes of pipeline stage `stage` (default: the largest of all stages)."""
    if stage is None:
        return max(
            (
                estimate(
                    cfg,
                    seq,
                    micro_batch,
                    tp,
                    pp,
                    dp,
                    zero_stage,
                    precision,
                    sequence_parallel,
                    grad_accum,
                    schedule,
                    s,
                    reduce_bucket_size,
                    overlap_comm,
                    contiguous_gradients,
                )
                for s in range(pp)
            ),
            key=lambda e: e.peak,
        )
    a = {"bf16": 2, "fp16": 2, "fp32": 4}[precision]
    sp = sequence_parallel and tp > 1
    first, last = stage == 0, stage == pp - 1
    n_blocks = cfg.n_layer // pp
    n, head_buffer = stage_parameters(cfg, tp, n_blocks, first, last)
    shard = n // dp if zero_stage >= 1 else n
    master = shard * FP32 if (zero_stage >= 1 or a != FP32) else 0
    optimizer = 2 * shard * FP32 + master
    grads = (shard if zero_stage == 2 else n) * a
    buckets = 0
    if zero_stage >= 1 and contiguous_gradients:
        buckets = (2 if overlap_comm else 1) * reduce_bucket_size * a
    b, T = micro_batch, seq
    blocks = n_blocks * block_activation_bytes(cfg, b, T, tp, sp, a, cfg.activation_checkpointing)
    head_saved, head_transient = head_bytes(cfg, b, T, tp, sp, a) if last else (0, 0)
    per_mb = blocks + (embedding_bytes(cfg, b, T, tp, sp) if first else 0) + head_saved
    # The gradient received from the next stage, held through one micro-batch's backward.
    received = 0 if last else b * (T // tp if sp else T) * cfg.n_embd * a
    # A block's backward: the recomputed block under activation checkpointing, and the MLP's
    # two (B, T, 4C/tp) gradients.
    block_work = 2 * 4 * b * T * cfg.n_embd // tp * a if n_blocks else 0
    if cfg.activation_checkpointing and n_blocks:
        block_work += block_activation_bytes(cfg, b, T, tp, sp, a, False)
    transient = max(head_transient, block_work)
    most_live, highest = 0, grads + buckets  # the end of backward: gradients and buffers alone
    for live, later in _backwards(schedule, grad_accum, pp, stage):
        kept = grads if later else 0  # earlier micro-batches' gradients
        most_live = max(most_live, live)
        # The loss's backward (last stage) comes before the first gradient, so before DeepSpeed
        # allocates this micro-batch's reduction buffers; the blocks' backward comes after.
        held = live * per_mb + received
        highest = max(highest, held + head_transient + kept, held - head_saved + buckets + block_work + kept)
    peak = (n + head_buffer) * a + optimizer + highest
    activations = most_live * per_mb + received
    return MemoryEstimate((n + head_buffer) * a, grads, buckets, optimizer, activations, transient, peak)


def _backwards(schedule: str, m: int, pp: int, rank: int) -> list[tuple[int, bool]]:
    """For each backward pass of a step on this rank: (micro-batches in flight, an earlier backward ran?)."""
    if pp == 1:
        return [(1, i > 0) for i in range(m)]
    from .pipeline.schedules import SCHEDULES

    out, live, done = [], 0, 0
    for op in SCHEDULES[schedule](m, pp, rank, 1):
        if op.kind == "F":
            live += 1
            continue
        out.append((live, done > 0))
        live, done = live - 1, done + 1
    return out


def estimate_run(
    cfg, ds: dict, dp: int, stage: Optional[int] = None, precision: Optional[str] = None
) -> MemoryEstimate:
    """The estimate for a run: a Config and its resolved DeepSpeed settings (DeepSpeed's defaults
    for what the JSON leaves out), for pipeline stage `stage` (default: the largest)."""
    zero = ds.get("zero_optimization", {})
    z = int(zero.get("stage", 0))
    if precision is None:
        precision = (
            "bf16"
            if ds.get("bf16", {}).get("enabled") is True
            else "fp16"
            if ds.get("fp16", {}).get("enabled") is True
            else "fp32"
        )
    return estimate(
        cfg.model,
        cfg.data.seq_length,
        int(ds["train_micro_batch_size_per_gpu"]),
        tp=cfg.parallel.tp,
        pp=cfg.parallel.pp,
        dp=dp,
        zero_stage=z,
        precision=precision,
        sequence_parallel=cfg.parallel.sequence_parallel,
        grad_accum=int(ds.get("gradient_accumulation_steps", 1)),
        schedule=cfg.parallel.schedule,
        stage=stage,
        reduce_bucket_size=int(zero.get("reduce_bucket_size", 500_000_000)),
        overlap_comm=bool(zero.get("overlap_comm", False)),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
    )
