"""Runs a pipeline schedule under the plain DeepSpeed engine (any ZeRO stage up to 2).

What the executor relies on (pinned by tests/test_deepspeed_contract.py):
  - forward goes through engine(...) so DeepSpeed's backward prologue runs; the stage's forward
    takes the chunk to run;
  - the last stage calls engine.backward(loss): DeepSpeed divides by the gradient accumulation
    steps m. Other stages call engine.backward(s, scale_wrt_gas=False) with a scalar s whose
    gradient with respect to the stage output is the received gradient, which already carries
    1/m (the default would divide again: 1/m^2);
  - the accumulation boundary is set explicitly before every backward: True only for this
    rank's last backward of the step (with interleaving a rank runs m x v backwards), and
    engine.step() follows the last backward of each micro-batch on this rank (chunk 0), so the
    engine sees m steps per optimizer step as in the plain loop and updates on the last.
"""

from __future__ import annotations

import math
import time
from typing import Iterable, Optional

import torch

from ..config import Config
from ..distributed import all_reduce_small
from ..parallel import ParallelState
from ..training.gradnorm import engine_keeps_no_norm, grad_norm
from .p2p import Channels, Link
from .schedules import Op, build_schedule, check_layout
from .stage import PipelineStage, activation_shape
from .tied import TiedEmbedding


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


def _loss_scale(engine) -> float:
    if not engine.fp16_enabled():
        return 1.0
    opt = engine.optimizer
    return float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", 1.0)))


class PipelineRunner:
    """The schedule of one rank: train_step, evaluate and the tied-embedding protocol."""

    def __init__(self, cfg: Config, ps: ParallelState, model: PipelineStage, channels: Channels):
        self.cfg, self.ps, self.model, self.channels = cfg, ps, model, channels
        self.schedule, self.virtual = cfg.parallel.schedule, cfg.parallel.virtual_stages
        self.timeout = cfg.parallel.timeout_seconds
        self.tied = TiedEmbedding(ps, model)
        self.engine = None
        self.grad_norm: Optional[float] = None  # ZeRO-0 fp32: DeepSpeed clips but keeps no norm
        self.stats: dict[str, float] = {}  # timings of the last step (benchmarks)

    # -- set-up -------------------------------------------------------------------------------
    def attach(self, engine) -> None:
        """After deepspeed.initialize: check the layout against the engine, hook the tied weight."""
        check_layout(self.schedule, self.ps.pp_size, self.virtual, engine.gradient_accumulation_steps())
        if engine.zero_optimization_stage() > 2:
            raise ValueError("pipeline parallelism supports ZeRO stages 0-2 (ZeRO-3 partitions the "
                             "parameters the stages exchange); set zero_optimization.stage <= 2")
        self.engine = engine
        self.tied.attach()

    def sync_tied_weight_from_first_stage(self, model: Optional[PipelineStage] = None) -> None:
        """Collective over the pipeline: the last stage's head copy := the first stage's wte."""
        self.tied.broadcast_weight()

    def _link(self, x: torch.Tensor, device: torch.device) -> Link:
        cfg = self.cfg
        B, T = x.shape
        shape = activation_shape(cfg.model, B, T, self.ps.tp_size, cfg.parallel.sequence_parallel)
        dtype = next(self.model.parameters()).dtype
        return Link(self.ps, self.channels, shape, dtype, device, self.timeout)

    # -- training -----------------------------------------------------------------------------
    def train_step(self, engine, data, device: torch.device, accum: int, on_nonfinite: str):
        """One optimizer step over `accum` micro-batches -> (mean loss of this replica, nonfinite)."""
        batches = [data.next_train(device) for _ in range(accum)]  # every rank reads the same
        ops = build_schedule(self.schedule, accum, self.ps.pp_size, self.ps.pp_rank, self.virtual)
        self.grad_norm = None
        step = _Step(self, engine, batches, ops, on_nonfinite == "skip", self._link(batches[0][0], device))
        t0 = time.perf_counter()
        step.run()
        t1 = time.perf_counter()
        self.tied.finish_step()
        self.stats = {"wall_s": t1 - t0 - step.optimizer_s, "busy_s": step.busy_s, "step_s": time.perf_counter() - t0}
        mean = self._from_last_stage(step.loss_sum / accum if self.model.post_process else 0.0)
        return mean, not math.isfinite(float(mean)) or step.nonfinite

    def _from_last_stage(self, value) -> torch.Tensor:
        """The last stage's value on every rank of the pipeline (a sum with zeros elsewhere)."""
        t = torch.as_tensor(value, dtype=torch.float64).reshape(()).clone()
        if not self.ps.is_last_stage:
            t.zero_()
        return all_reduce_small(t, group=self.ps.pp_group).reshape(())

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, engine, batches: Iterable) -> torch.Tensor:
        """Mean loss over `batches` (every rank iterates the same ones), forward only."""
        link, total, n = None, torch.zeros((), dtype=torch.float64), 0
        m = self.model
        for mb, (x, y, mask) in enumerate(batches):
            link = link or self._link(x, x.device)
            h = x
            for c in range(m.num_chunks):
                if not m.starts_network(c):
                    h = link.take("forward", ("E", mb, c), f"evaluation batch {mb}")
                if m.ends_network(c):
                    total += engine(h, y, mask, chunk=c).double().cpu()
                else:
                    link.post([("forward", engine(h, chunk=c))], [])
            n += 1
        if link is not None:
            link.finish()
        return self._from_last_stage(total / max(n, 1))


class _Step:
    """Executes one rank's op list for one optimizer step."""

    def __init__(self, runner: PipelineRunner, engine, batches: list, ops: list[Op], skip_nonfinite: bool,
                 link: Link):
        self.r, self.engine, self.batches, self.ops = runner, engine, batches, ops
        self.model, self.link, self.skip = runner.model, link, skip_nonfinite
        self.saved: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.loss_sum, self.nonfinite = torch.zeros((), dtype=torch.float64), False
        self.busy_s = self.optimizer_s = 0.0
        backwards = [k for k, op in enumerate(ops) if op.kind == "B"]
        self.final_backward = backwards[-1]
        heads = [k for k in backwards if self.model.ends_network(ops[k].chunk)]
        self.final_head_backward = heads[-1] if heads else None

    def _incoming(self, op: Op) -> Optional[tuple[str, tuple]]:
        """The message `op` waits for, if any: (channel, key)."""
        if op.kind == "F":
            return None if self.model.starts_network(op.chunk) else ("forward", tuple(op))
        return None if self.model.ends_network(op.chunk) else ("backward", tuple(op))

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
                self.r.tied.send_grad()
            if op.kind == "B" and op.chunk == 0:  # this micro-batch's last backward on this rank
                t = time.perf_counter()
                if k == self.final_backward and engine_keeps_no_norm(self.r.engine):  # TP x PP collective
                    self.r.grad_norm = grad_norm(self.model, self.r.ps)
                self.engine.step()
                self.optimizer_s += time.perf_counter() - t
        self.link.finish()
        if self.saved:
            raise RuntimeError(f"pipeline schedule bug: activations never consumed: {sorted(self.saved)}")

    def _forward(self, op: Op) -> Optional[torch.Tensor]:
        m, (x, y, mask) = self.model, self.batches[op.mb]
        if not m.starts_network(op.chunk):
            x = self.link.take("forward", tuple(op), f"micro-batch {op.mb} chunk {op.chunk}").requires_grad_(True)
        t = time.perf_counter()
        out = self.engine(x, y, mask, chunk=op.chunk) if m.ends_network(op.chunk) else self.engine(x, chunk=op.chunk)
        self.busy_s += time.perf_counter() - t
        self.saved[(op.mb, op.chunk)] = (x, out)
        if m.ends_network(op.chunk):
            self.loss_sum += out.detach().double().cpu()
            return None
        return out

    def _backward(self, op: Op, k: int) -> Optional[torch.Tensor]:
        m, engine = self.model, self.engine
        x, out = self.saved.pop((op.mb, op.chunk))
        final = k == self.final_backward
        if m.ends_network(op.chunk):
            loss = out
            if not torch.isfinite(out.detach()):
                self.nonfinite = True
                # As the plain loop: ZeRO >= 1 and half precision skip the whole step on
                # non-finite gradients; ZeRO-0 fp32 would apply them, so this micro-batch adds none.
                if self.skip and engine_keeps_no_norm(self.r.engine):
                    loss = (x * 0.0).sum() + sum(p.sum() * 0.0 for p in m.chunk_parameters(op.chunk))
        else:
            grad = self.link.take("backward", tuple(op), f"micro-batch {op.mb} chunk {op.chunk}")
            loss = _InjectGrad.apply(out, grad, _loss_scale(engine))
        if final and m.pre_process:
            self.r.tied.receive_grad()  # added to wte's gradient by its hook in this backward
        t = time.perf_counter()
        engine.set_gradient_accumulation_boundary(final)
        if m.ends_network(op.chunk):
            engine.backward(loss)
            self.r.tied.collect()
        else:
            engine.backward(loss, scale_wrt_gas=False)
        self.busy_s += time.perf_counter() - t
        self.r.tied.clear_pending()
        if m.starts_network(op.chunk):
            return None
        if x.grad is None:
            raise RuntimeError(f"stage {self.r.ps.pp_rank}: no gradient reached the input of chunk {op.chunk}")
        return x.grad
