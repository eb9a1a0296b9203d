"""One optimizer step under the plain DeepSpeed engine (any ZeRO stage up to 2), for every layout.

A step is a schedule: each rank walks its list of forward and backward passes (schedules.py).
Without pipelining the model is the whole GPT2, the schedule is `none` with one chunk (forward
and backward of each micro-batch in turn: plain gradient accumulation) and no message is ever
sent; pipelines add the p2p link and the tied-embedding protocol. The executor holds the engine
and owns what every step needs, whatever the layout: the global grad norm where DeepSpeed keeps
none (ZeRO-0 fp32), non-finite losses (train.on_nonfinite, capped by train.max_skipped_steps:
NonfiniteGuard) and the mean loss over the replicas.

What it relies on (pinned by tests/test_deepspeed_contract.py):
  - forward goes through engine(...) so DeepSpeed's backward prologue runs; a pipeline stage's
    forward takes the chunk to run;
  - the chunk that ends the network calls engine.backward(loss): DeepSpeed divides by the
    gradient accumulation steps m. Other chunks call engine.backward(s, scale_wrt_gas=False)
    with a scalar s whose gradient with respect to the chunk output is the received gradient,
    which already carries 1/m (the default would divide again: 1/m^2);
  - the accumulation boundary is set explicitly before every backward: True only for this
    rank's last backward of the step (with interleaving a rank runs m x v backwards), and
    engine.step() follows the last backward of each micro-batch on this rank (chunk 0), so the
    engine sees m steps per optimizer step and updates on the last.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..config import ParallelConfig
from ..model import GPT2
from ..parallel import ProcessGroups
from ..parallel.collectives import all_reduce_small
from .p2p import Link
from .schedules import Op, build_schedule
from .stage import PipelineStage, activation_shape
from .tied import TiedEmbedding

Batch = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # inputs (B, T), targets (B, T), loss mask


@dataclass
class StepResult:
    loss: float  # mean over the global batch
    grad_norm: Optional[float]  # before clipping
    lr: float
    nonfinite: bool  # a loss or the grad norm was NaN/inf (what train.on_nonfinite acts on)
    overflow: bool = False  # fp16: finite loss, inf gradients; DeepSpeed skipped the step and lowered the loss scale


def classify(loss_finite: bool, norm: Optional[float], fp16: bool) -> tuple[bool, bool]:
    """(nonfinite, overflow) of a step. Under fp16 a finite loss with an inf/NaN grad norm is the
    dynamic loss scale overflowing: DeepSpeed already skipped that update and halved the scale
    (routine early in a run), so it is not a non-finite step; a non-finite loss always is."""
    norm_bad = norm is not None and not math.isfinite(norm)
    overflow = fp16 and loss_finite and norm_bad
    return (not loss_finite) or (norm_bad and not overflow), overflow


class NonFiniteError(RuntimeError):
    """Training cannot go on: a non-finite step under train.on_nonfinite=stop, or too many in a row under skip."""


class NonfiniteGuard:
    """train.on_nonfinite, applied to every step (with the flag every rank agreed on): `stop` ends
    the run at the first non-finite step, `skip` skips it, but at most `max_skipped` in a row: a
    run that keeps producing NaN has diverged, and skipping forever would only burn the budget."""

    def __init__(self, mode: str, max_skipped: int):
        self.mode, self.max_skipped, self.in_a_row = mode, max_skipped, 0

    def check(self, step: int, r: StepResult, nonfinite: bool) -> Optional[str]:
        """None for a good step, the line to log for a skipped one; raises NonFiniteError to stop."""
        if not nonfinite:
            self.in_a_row = 0
            return None
        what = f"step {step}: loss {r.loss} / grad norm {r.grad_norm} is not finite"
        if self.mode == "stop":
            raise NonFiniteError(f"{what}; stopping without a checkpoint (train.on_nonfinite=skip skips such steps)")
        self.in_a_row += 1
        if self.in_a_row >= self.max_skipped:
            first = step - self.in_a_row + 1
            raise NonFiniteError(
                f"{what}: {self.in_a_row} non-finite steps in a row (steps {first}-{step}) reached "
                f"train.max_skipped_steps={self.max_skipped}; stopping without a checkpoint of this step. The run "
                f"has diverged: resume from a checkpoint of before step {first} (checkpoint.tag) with a lower "
                f"optim.lr or more warmup, or check the data of these steps"
            )
        return f"{what}: update skipped ({self.in_a_row} in a row, the run stops at {self.max_skipped})"


def engine_keeps_no_norm(engine: Any) -> bool:
    """True for DeepSpeed's ZeRO-0 fp32 path: it clips without keeping the norm, so the norm is
    computed here (before engine.step() clips) with the same counting rule."""
    return engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())


def grad_norm(model: nn.Module, groups: ProcessGroups) -> float:
    """Global L2 norm of the gradients, each parameter counted once across TP x PP x DP.

    Parameters marked `model_parallel` are this rank's own (shards, and TP-replicated ones on
    tp_rank 0 only); gradients are identical across DP after the all-reduce."""
    sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None and getattr(p, "model_parallel", True):
            sq += p.grad.detach().double().pow(2).sum().cpu()
    if groups.mp is not None:
        sq = all_reduce_small(sq, group=groups.mp)
    return float(sq.sqrt())


class WholeModel:
    """The chunk view of a model that is not split: one chunk that starts and ends the network."""

    num_chunks = 1
    pre_process = post_process = True  # holds the embedding and the head

    def __init__(self, model: nn.Module):
        self.model = model

    def starts_network(self, chunk: int) -> bool:
        return True

    def ends_network(self, chunk: int) -> bool:
        return True

    def chunk_parameters(self, chunk: int) -> list[nn.Parameter]:
        return list(self.model.parameters())


class _InjectGrad(torch.autograd.Function):
    """fwd: a zero scalar standing in for <out, grad>; bwd: d/d out = grad x upstream / scale.

    Same gradients as (out * grad).sum() without the (B, T, C) product or an fp16 overflow in
    the forward value; `scale` removes the loss scale engine.backward applies again (fp16)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, grad: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(grad)
        ctx.scale = scale
        return torch.zeros((), dtype=torch.float32, device=out.device)

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grad,) = ctx.saved_tensors
        factor = upstream / ctx.scale
        return grad * factor.to(grad.dtype) if float(factor) != 1.0 else grad, None, None


def _loss_scale(engine: Any) -> float:
    if not engine.fp16_enabled():
        return 1.0
    opt = engine.optimizer
    return float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", 1.0)))


class StepExecutor:
    """Runs this rank's schedule: `train_step` (one optimizer step) and `evaluate`.

    `model` is the module the engine wraps: GPT2 without pipelining, else this rank's
    PipelineStage. `engine` may be the module itself for forward-only use (`evaluate`)."""

    def __init__(
        self,
        engine: Any,
        model: Union[GPT2, PipelineStage],
        groups: ProcessGroups,
        par: ParallelConfig,
        on_nonfinite: str = "stop",
    ):
        layout = groups.layout
        self.engine, self.model, self.groups = engine, model, groups
        self.pipelined = layout.pp > 1
        self.chunks: Any = model if self.pipelined else WholeModel(model)
        self.schedule = par.schedule if self.pipelined else "none"
        self.virtual = par.virtual_stages if self.pipelined else 1
        self.sequence_parallel, self.timeout = par.sequence_parallel, par.timeout_seconds
        self.skip_nonfinite = on_nonfinite == "skip"
        self.tied = TiedEmbedding(groups, model)
        self.grad_norm: Optional[float] = None  # computed here where DeepSpeed keeps none (ZeRO-0 fp32)
        self.stats: dict[str, float] = {}  # timings of the last step (benchmarks)
        self.tied.attach()

    def sync_tied_weight(self) -> None:
        """Collective over the pipeline: the last stage's head copy := the first stage's wte."""
        self.tied.broadcast_weight()

    def _link(self, x: torch.Tensor) -> Link:
        B, T = x.shape
        shape = activation_shape(self.model.cfg, B, T, self.groups.layout.tp, self.sequence_parallel)
        dtype = next(self.model.parameters()).dtype
        return Link(self.groups, shape, dtype, x.device, self.timeout)

    def _call(self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor], chunk: int) -> torch.Tensor:
        """Forward of one chunk through the engine: the loss where the chunk ends the network."""
        kw = {"chunk": chunk} if self.pipelined else {}
        return self.engine(x, y, mask, **kw) if self.chunks.ends_network(chunk) else self.engine(x, **kw)

    # -- training -----------------------------------------------------------------------------
    def train_step(self, batches: Sequence[Batch]) -> StepResult:
        """One optimizer step over the micro-batches `batches` (this replica's share)."""
        layout = self.groups.layout
        ops = build_schedule(self.schedule, len(batches), layout.pp, layout.pp_rank, self.virtual)
        self.grad_norm = None
        step = _Step(self, batches, ops, self._link(batches[0][0]))
        t0 = time.perf_counter()
        step.run()
        t1 = time.perf_counter()
        self.tied.finish_step()
        self.stats = {"wall_s": t1 - t0 - step.optimizer_s, "busy_s": step.busy_s, "step_s": time.perf_counter() - t0}
        mean = self._replica_mean(step.loss_sum / len(batches) if self.chunks.post_process else step.loss_sum)
        norm = self.engine.get_global_grad_norm()
        norm = self.grad_norm if norm is None else float(norm)
        nonfinite, overflow = classify(not step.nonfinite and math.isfinite(mean), norm, self.engine.fp16_enabled())
        return StepResult(mean, norm, self.engine.get_lr()[0], nonfinite, overflow)

    def _replica_mean(self, value: torch.Tensor) -> float:
        """The last stage's mean over its micro-batches, averaged over data parallelism."""
        layout = self.groups.layout
        t = value.detach().double().cpu().reshape(()).clone()
        if self.pipelined:  # a sum with zeros everywhere but the last stage
            if not layout.is_last_stage:
                t.zero_()
            t = all_reduce_small(t, group=self.groups.pp).reshape(())
        if layout.dp > 1:
            t = all_reduce_small(t, group=self.groups.dp) / layout.dp
        return float(t)

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> float:
        """Mean loss over `batches` (every rank iterates the same ones), forward only."""
        link, total, n = None, torch.zeros((), dtype=torch.float64), 0
        chunks = self.chunks
        for mb, (x, y, mask) in enumerate(batches):
            link = link or self._link(x)
            h = x
            for c in range(chunks.num_chunks):
                if not chunks.starts_network(c):
                    h = link.take("forward", ("E", mb, c), f"evaluation batch {mb}")
                if chunks.ends_network(c):
                    total += self._call(h, y, mask, c).double().cpu()
                else:
                    link.post([("forward", self._call(h, y, mask, c))], [])
            n += 1
        if link is not None:
            link.finish()
        return self._replica_mean(total / max(n, 1))


class _Step:
    """Executes one rank's op list for one optimizer step."""

    def __init__(self, ex: StepExecutor, batches: Sequence[Batch], ops: list[Op], link: Link):
        self.ex, self.engine, self.batches, self.ops = ex, ex.engine, batches, ops
        self.chunks, self.link = ex.chunks, link
        self.saved: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.loss_sum, self.nonfinite = torch.zeros((), dtype=torch.float64), False
        self.busy_s = self.optimizer_s = 0.0
        backwards = [k for k, op in enumerate(ops) if op.kind == "B"]
        self.final_backward = backwards[-1]
        heads = [k for k in backwards if self.chunks.ends_network(ops[k].chunk)]
        self.final_head_backward = heads[-1] if heads else None

    def _incoming(self, op: Op) -> Optional[tuple[str, tuple]]:
        """The message `op` waits for, if any: (channel, key)."""
        if op.kind == "F":
            return None if self.chunks.starts_network(op.chunk) else ("forward", tuple(op))
        return None if self.chunks.ends_network(op.chunk) else ("backward", tuple(op))

    def run(self) -> None:
        first = self._incoming(self.ops[0])
        if first:
            self.link.post([], [first])
        for k, op in enumerate(self.ops):
            out = self._forward(op) if op.kind == "F" else self._backward(op, k)
            sends = [] if out is None else [("forward" if op.kind == "F" else "backward", out)]
            nxt = self._incoming(self.ops[k + 1]) if k + 1 < len(self.ops) else None
            self.link.post(sends, [nxt] if nxt else [])  # one batch: this output, next input
            if k == self.final_head_backward:
                self.ex.tied.send_grad()
            if op.kind == "B" and op.chunk == 0:  # this micro-batch's last backward on this rank
                t = time.perf_counter()
                if k == self.final_backward and engine_keeps_no_norm(self.engine):  # TP x PP collective
                    self.ex.grad_norm = grad_norm(self.ex.model, self.ex.groups)
                self.engine.step()
                self.optimizer_s += time.perf_counter() - t
        self.link.finish()
        if self.saved:
            raise RuntimeError(f"pipeline schedule bug: activations never consumed: {sorted(self.saved)}")

    def _forward(self, op: Op) -> Optional[torch.Tensor]:
        x, y, mask = self.batches[op.mb]
        if not self.chunks.starts_network(op.chunk):
            x = self.link.take("forward", tuple(op), f"micro-batch {op.mb} chunk {op.chunk}").requires_grad_(True)
        t = time.perf_counter()
        out = self.ex._call(x, y, mask, op.chunk)
        self.busy_s += time.perf_counter() - t
        self.saved[(op.mb, op.chunk)] = (x, out)
        if self.chunks.ends_network(op.chunk):
            self.loss_sum += out.detach().double().cpu()
            return None
        return out

    def _backward(self, op: Op, k: int) -> Optional[torch.Tensor]:
        chunks, engine = self.chunks, self.engine
        x, out = self.saved.pop((op.mb, op.chunk))
        final = k == self.final_backward
        if chunks.ends_network(op.chunk):
            loss = out
            if not torch.isfinite(out.detach()):
                self.nonfinite = True
                # ZeRO >= 1 and half precision skip the whole step on non-finite gradients;
                # ZeRO-0 fp32 would apply them, so there this micro-batch adds no gradient.
                if self.ex.skip_nonfinite and engine_keeps_no_norm(engine):
                    loss = (x * 0.0).sum() + sum(p.sum() * 0.0 for p in chunks.chunk_parameters(op.chunk))
        else:
            grad = self.link.take("backward", tuple(op), f"micro-batch {op.mb} chunk {op.chunk}")
            loss = _InjectGrad.apply(out, grad, _loss_scale(engine))
        if final and chunks.pre_process:
            self.ex.tied.receive_grad()  # added to wte's gradient by its hook in this backward
        t = time.perf_counter()
        engine.set_gradient_accumulation_boundary(final)
        if chunks.ends_network(op.chunk):
            engine.backward(loss)
            self.ex.tied.collect()
        else:
            engine.backward(loss, scale_wrt_gas=False)
        self.busy_s += time.perf_counter() - t
        self.ex.tied.clear_pending()
        if chunks.starts_network(op.chunk):
            return None
        if x.grad is None:
            raise RuntimeError(
                f"stage {self.ex.groups.layout.pp_rank}: no gradient reached the input of chunk {op.chunk}"
            )
        return x.grad
