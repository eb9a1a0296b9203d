"""The training loop: model + DeepSpeed engine, data, evaluation, logging, checkpoints, signals."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..config import Config, dump_yaml
from ..distributed import all_reduce_small
from ..parallel import ParallelState
from ..checkpoint import store as ckpt
from ..checkpoint.resume import resume, run_layout
from .data import DataState, build_data
from .gradnorm import engine_keeps_no_norm, grad_norm
from .metrics import Scalars, flops_per_token, memory_gb, peak_tflops
from .model_setup import build_engine
from .signals import Signals


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm is NaN/inf and train.on_nonfinite=stop."""


@dataclass
class StepResult:
    loss: float
    grad_norm: Optional[float]
    lr: float
    nonfinite: bool


@dataclass
class Run:
    """What one training run holds: built by `Trainer.__init__`, used by its loop."""

    cfg: Config
    ds: dict
    ps: ParallelState
    device: torch.device
    log_rank0: bool = True


def log(msg: str, run: Run) -> None:
    if run.log_rank0:
        print(msg, flush=True)


class Trainer:
    """Builds everything for `cfg` on this rank and runs `train()`."""

    def __init__(self, cfg: Config, ds: dict, ps: ParallelState, device: torch.device,
                 signals: Optional[Signals] = None):
        self.run = Run(cfg, ds, ps, device, log_rank0=(ps.rank == 0))
        self.micro = ds["train_micro_batch_size_per_gpu"]
        self.accum = ds["gradient_accumulation_steps"]
        self.global_batch = ds["train_batch_size"]
        torch.manual_seed(cfg.train.seed)
        self.engine, self.model, self.tokenizer, self.pipe = build_engine(cfg, ds, ps, device)
        self.data: DataState = build_data(cfg, ps, self.micro, self.global_batch, self.tokenizer)
        self.scalars = Scalars(cfg.logging.tensorboard_dir, enabled=ps.rank == 0)
        self.step = 0
        self.signals = signals or Signals()
        self.flops_token = flops_per_token(cfg.model, cfg.data.seq_length)
        self.peak = peak_tflops(device)
        self.metrics_path = Path(cfg.checkpoint.dir) / "metrics.jsonl" if cfg.checkpoint.dir else None
        self._own_norm: Optional[float] = None  # grad norm computed here where DeepSpeed keeps none

    def _record(self, **values: Any) -> None:
        """Append one JSON line of exact values (rank 0): the machine-readable training log."""
        if self.metrics_path is None or self.run.ps.rank != 0:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": self.step, **values}) + "\n")

    # -- one optimizer step -------------------------------------------------------------------
    def train_step(self) -> StepResult:
        engine, cfg = self.engine, self.run.cfg
        if self.pipe is not None:  # the pipeline schedule runs the micro-batches of this step
            total, nonfinite = self.pipe.train_step(engine, self.data, self.run.device, self.accum,
                                                    cfg.train.on_nonfinite)
            self._own_norm = self.pipe.grad_norm  # set where DeepSpeed keeps none (ZeRO-0 fp32)
            return self._finish_step(total, nonfinite)
        total, nonfinite = torch.zeros((), dtype=torch.float64), False
        self._own_norm = None
        for i in range(self.accum):
            x, y, mask = self.data.next_train(self.run.device)
            loss = engine(x, y, mask)
            if not torch.isfinite(loss):
                nonfinite = True
                # ZeRO >= 1 and half precision see the non-finite gradients and skip the whole
                # step; ZeRO-0 fp32 would apply them, so there this micro-batch adds nothing.
                if cfg.train.on_nonfinite == "skip" and engine_keeps_no_norm(engine):
                    loss = sum(p.sum() * 0.0 for p in engine.module.parameters())
            engine.backward(loss)
            if i == self.accum - 1 and engine_keeps_no_norm(engine):
                self._own_norm = grad_norm(engine.module, self.run.ps)  # before step() clips
            engine.step()
            total += loss.detach().double().cpu()
        return self._finish_step(total / self.accum, nonfinite)

    def _finish_step(self, mean: torch.Tensor, nonfinite: bool) -> StepResult:
        """Average the replica's mean loss over DP; read grad norm and learning rate."""
        engine = self.engine
        mean = mean.detach().double().cpu().clone()
        if self.run.ps.dp_size > 1:
            mean = all_reduce_small(mean, group=self.run.ps.dp_group) / self.run.ps.dp_size
        norm = engine.get_global_grad_norm()
        norm = self._own_norm if norm is None else float(norm)
        if norm is not None and not math.isfinite(norm):
            nonfinite = True
        lr = engine.get_lr()[0]
        return StepResult(float(mean), norm, lr, nonfinite)

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean validation loss over train.eval_steps global batches (the same ones each time)."""
        if self.data.valid is None:
            return None
        self.engine.eval()
        if self.pipe is not None:
            mean = self.pipe.evaluate(self.engine, self.data.valid_batches(self.run.device))
        else:
            total, n = torch.zeros((), dtype=torch.float64), 0
            for x, y, mask in self.data.valid_batches(self.run.device):
                total += self.engine(x, y, mask).double().cpu()
                n += 1
            mean = total / max(n, 1)
        self.engine.train()
        mean = mean.detach().double().cpu().clone()
        if self.run.ps.dp_size > 1:
            mean = all_reduce_small(mean, group=self.run.ps.dp_group) / self.run.ps.dp_size
        return float(mean)

    # -- checkpoints --------------------------------------------------------------------------
    def save(self) -> Optional[str]:
        cfg = self.run.cfg
        if not cfg.checkpoint.dir:
            return None
        ps = self.run.ps
        state = {"consumed_samples": self.data.consumed, "config": cfg.to_dict(), "config_yaml": dump_yaml(cfg),
                 "tokenizer": self.tokenizer.identity(), "layout": run_layout(cfg, self.run.ds, ps),
                 "history": self.scalars.history if ps.rank == 0 else {},
                 "versions": {"torch": torch.__version__, "deepspeed": _ds_version()}}
        t0 = time.time()
        tag = ckpt.save(self.engine, ps, cfg.checkpoint.dir, self.step, state, cfg.checkpoint.keep_last,
                        self.model.tracker)
        log(f"saved checkpoint {Path(cfg.checkpoint.dir) / tag} ({time.time() - t0:.1f} s)", self.run)
        return tag

    def maybe_resume(self) -> bool:
        cfg = self.run.cfg
        if not (cfg.checkpoint.dir and cfg.checkpoint.resume):
            return False
        state = resume(self.engine, self.run.ps, cfg, run_layout(cfg, self.run.ds, self.run.ps), self.model.tracker,
                       log=lambda msg: log(msg, self.run))
        if state is None:
            return False
        if self.pipe is not None:  # the last stage's copy of the tied embedding is in no checkpoint
            self.pipe.sync_tied_weight_from_first_stage(self.model)
        from ..tokenizer.base import check_same_identity

        tag = state["tag"]
        check_same_identity(state["tokenizer"], self.tokenizer.identity(), where=f"checkpoint {tag}")
        self.step = int(state["step"])
        self.data.seek(int(state["consumed_samples"]))
        self.scalars.history = {k: [tuple(v) for v in vs] for k, vs in state.get("history", {}).items()}
        log(f"resumed from {Path(cfg.checkpoint.dir) / tag}: step {self.step}, "
            f"{self.data.consumed} samples consumed", self.run)
        return True

    # -- the loop -------------------------------------------------------------------------------
    def _agree(self, *flags: bool) -> list[bool]:
        """Every rank learns whether any rank raised each flag (signals reach ranks unevenly)."""
        t = all_reduce_small(torch.tensor([float(f) for f in flags]), op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def _log_step(self, r: StepResult, dt: float) -> None:
        cfg, run = self.run.cfg, self.run
        tokens = self.global_batch * cfg.data.seq_length
        tok_s = tokens / dt
        parts = [f"step {self.step:>6}/{cfg.train.steps}", f"loss {r.loss:.4f}", f"lr {r.lr:.3e}"]
        if r.grad_norm is not None:
            parts.append(f"grad norm {r.grad_norm:.3f}")
        parts.append(f"{tok_s:,.0f} tok/s")
        tflops = self.flops_token * tok_s / run.ps.world_size / 1e12
        if self.peak:
            parts += [f"{tflops:.1f} TFLOP/s/dev", f"MFU {100 * tflops / self.peak:.1f}%"]
        parts += [f"mem {memory_gb(run.device):.2f} GiB", f"{dt:.2f} s/step"]
        log(" | ".join(parts), run)
        for tag, v in (("train/loss", r.loss), ("train/lr", r.lr), ("train/grad_norm", r.grad_norm),
                       ("perf/tokens_per_s", tok_s), ("perf/tflops_per_device", tflops)):
            if v is not None:
                self.scalars.add(tag, v, self.step)

    def _eval_and_log(self) -> Optional[float]:
        v = self.evaluate()
        if v is not None:
            log(f"validation at step {self.step}: loss {v:.4f} | perplexity {math.exp(min(v, 50)):.2f}", self.run)
            self.scalars.add("valid/loss", v, self.step)
            self._record(valid_loss=v)
            self.scalars.add("valid/ppl", math.exp(min(v, 50)), self.step)
        return v

    def train(self) -> dict[str, Any]:
        cfg, run = self.run.cfg, self.run
        resumed = self.maybe_resume()
        if not resumed and cfg.train.eval_interval:
            self._eval_and_log()  # the step-0 reference point
        start, stopped_by = time.time(), None
        last_saved = self.step if resumed else None
        interval_t, interval_steps = time.time(), 0
        while self.step < cfg.train.steps:
            r = self.train_step()
            self.step += 1
            self._record(loss=r.loss, lr=r.lr, grad_norm=r.grad_norm, consumed_samples=self.data.consumed)
            interval_steps += 1
            over_time = cfg.train.max_minutes > 0 and (time.time() - start) > 60 * cfg.train.max_minutes
            nonfinite, stop = self._agree(r.nonfinite, self.signals.received is not None or over_time)
            if nonfinite and cfg.train.on_nonfinite == "stop":
                raise NonFiniteError(f"step {self.step}: loss {r.loss} / grad norm {r.grad_norm} is not finite; "
                                     f"stopping without a checkpoint (train.on_nonfinite=skip skips such steps)")
            if nonfinite:
                log(f"step {self.step}: non-finite loss or grad norm, update skipped", run)
            if self.step % cfg.logging.interval == 0 or self.step == cfg.train.steps:
                self._log_step(r, (time.time() - interval_t) / interval_steps)
                interval_t, interval_steps = time.time(), 0
            if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0:
                self._eval_and_log()
            if stop:
                stopped_by = "signal" if self.signals.received is not None else "time limit"
                log(f"stopping at step {self.step} ({stopped_by}); checkpointing", run)
                self.save()
                last_saved = self.step
                break
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                self.save()
                last_saved = self.step
        if stopped_by is None and cfg.train.eval_interval and self.step % cfg.train.eval_interval:
            self._eval_and_log()
        if last_saved != self.step:
            self.save()
        return self._finish(stopped_by)

    def _finish(self, stopped_by: Optional[str]) -> dict[str, Any]:
        cfg, run = self.run.cfg, self.run
        out: dict[str, Any] = {"step": self.step, "stopped_by": stopped_by, "history": self.scalars.history}
        if cfg.logging.plot and cfg.checkpoint.dir:
            png = self.scalars.plot(Path(cfg.checkpoint.dir) / "loss.png")
            if png:
                log(f"loss curves: {png}", run)
        self.scalars.close()
        if cfg.logging.sample_prompt and stopped_by is None:
            from .sample import print_sample

            print_sample(self.model, self.tokenizer, cfg.logging.sample_prompt, run.ps, run.device)
        return out


def _ds_version() -> str:
    import deepspeed

    return deepspeed.__version__


def describe(cfg: Config, ds: dict, ps: ParallelState, n_params: int) -> str:
    return (f"megagpt2: {cfg.model.n_layer} layers, hidden {cfg.model.n_embd}, {cfg.model.n_head} heads, "
            f"{n_params / 1e6:.1f}M parameters per rank | world {ps.world_size} = tp {ps.tp_size} x pp {ps.pp_size} "
            f"x dp {ps.dp_size} | ZeRO stage {ds.get('zero_optimization', {}).get('stage', 0)} | global batch "
            f"{ds['train_batch_size']} = micro {ds['train_micro_batch_size_per_gpu']} x accum "
            f"{ds['gradient_accumulation_steps']} x dp {ps.dp_size} | seq {cfg.data.seq_length}")

