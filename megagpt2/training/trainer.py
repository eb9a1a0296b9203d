"""The training loop: engine and step executor, data, evaluation, logging, checkpoints, signals."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..checkpoint import store as ckpt
from ..checkpoint.resume import resume, run_layout
from ..config import dump_yaml
from ..parallel import ProcessGroups
from ..parallel.collectives import all_reduce_small
from ..pipeline.executor import NonFiniteError, NonfiniteGuard, StepResult
from .data import build_data
from .metrics import (
    RunClock,
    Scalars,
    flops_per_token,
    memory_gb,
    memory_report,
    peak_tflops,
    print_sample,
    truncate_metrics,
)
from .model_setup import build_engine, engine_ds_config
from .plan import RunPlan
from .signals import TIME_LIMIT, Signals

__all__ = ["NonFiniteError", "Trainer", "describe"]


class Trainer:
    """Builds everything of a checked run plan on this rank and runs `train()`."""

    def __init__(self, plan: RunPlan, groups: ProcessGroups, device: torch.device, signals: Optional[Signals] = None):
        cfg = plan.cfg
        self.plan, self.cfg, self.groups, self.layout, self.device = plan, cfg, groups, groups.layout, device
        self.tokenizer = plan.tokenizer
        for note in plan.notes:  # where the run saves, warnings about the data
            self.log(note)
        if plan.tokenizer_summary:
            self.log(plan.tokenizer_summary)
        self.micro, self.accum, self.global_batch = plan.micro_batch, plan.grad_accum, plan.global_batch
        torch.manual_seed(cfg.train.seed)
        self.engine, self.model, self.executor = build_engine(plan, groups, device)
        self.data = build_data(
            cfg.data,
            self.layout,
            self.micro,
            self.global_batch,
            self.tokenizer,
            seed=cfg.train.seed,
            train_samples=cfg.train.steps * self.global_batch,
            valid_samples=cfg.train.eval_steps * self.global_batch if cfg.train.eval_interval else 0,
            eval_steps=cfg.train.eval_steps,
        )
        self.scalars = Scalars(cfg.logging.tensorboard_dir, enabled=self.layout.rank == 0)
        self.step = 0
        # The entry passes the Signals it installed first thing; a Trainer built in code (tests,
        # benchmarks, a notebook) leaves the process's signal handlers alone.
        self.signals = signals if signals is not None else Signals(install=False)
        self.stop_code = 0  # why the loop stopped early (signals.SIGTERM, ...); 0: it did not
        self.flops_token = flops_per_token(cfg.model, cfg.data.seq_length)
        self.peak = peak_tflops(device)
        self.metrics_path = Path(cfg.checkpoint.dir) / "metrics.jsonl" if cfg.checkpoint.dir else None
        self.nonfinite = NonfiniteGuard(cfg.train.on_nonfinite, cfg.train.max_skipped_steps)
        self.clock = RunClock(cfg.train.steps)

    def log(self, msg: str) -> None:
        if self.layout.rank == 0:
            print(msg, flush=True)

    def _record(self, **values: Any) -> None:
        """Append one JSON line of exact values (rank 0): the machine-readable training log."""
        if self.metrics_path is None or self.layout.rank != 0:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": self.step, **values}) + "\n")

    # -- one optimizer step -------------------------------------------------------------------
    def train_step(self) -> StepResult:
        """This replica's micro-batches of the step through the executor's schedule."""
        batches = [self.data.next_train(self.device) for _ in range(self.accum)]
        return self.executor.train_step(batches)

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean validation loss over train.eval_steps global batches (the same ones each time)."""
        if self.data.valid is None:
            return None
        self.engine.eval()
        mean = self.executor.evaluate(self.data.valid_batches(self.device))
        self.engine.train()
        return mean

    # -- checkpoints --------------------------------------------------------------------------
    def run_layout(self) -> dict[str, Any]:
        """This run's layout as a checkpoint records it (grid, ZeRO stage, schedule, precision, batch)."""
        return run_layout(self.cfg, engine_ds_config(self.plan, self.device), self.layout)

    def save(self) -> Optional[str]:
        cfg, layout = self.cfg, self.layout
        if not cfg.checkpoint.dir:
            return None
        state = {
            "consumed_samples": self.data.consumed,
            "config": cfg.to_dict(),
            "config_yaml": dump_yaml(cfg),
            "tokenizer": self.tokenizer.identity(),
            "layout": self.run_layout(),
            "versions": {"torch": torch.__version__, "deepspeed": _ds_version()},
        }
        t0 = time.time()
        tag = ckpt.save(
            self.engine, layout, cfg.checkpoint.dir, self.step, state, cfg.checkpoint.keep_last, self.model.tracker
        )
        self.log(f"saved checkpoint {Path(cfg.checkpoint.dir) / tag} ({time.time() - t0:.1f} s)")
        return tag

    def maybe_resume(self) -> bool:
        cfg = self.cfg
        if not (cfg.checkpoint.dir and cfg.checkpoint.resume):
            return False
        state = resume(self.engine, self.layout, cfg, self.run_layout(), self.model.tracker, log=self.log)
        if state is None:
            return False
        self.executor.sync_tied_weight()  # the last stage's copy of the tied embedding is in no checkpoint
        from ..tokenizer.base import check_same_identity

        tag = state["tag"]
        check_same_identity(state["tokenizer"], self.tokenizer.identity(), where=f"checkpoint {tag}")
        self.step = int(state["step"])
        self.data.seek(int(state["consumed_samples"]))
        if self.metrics_path is not None and self.layout.rank == 0:
            dropped = truncate_metrics(self.metrics_path, self.step)  # steps after the checkpoint are redone
            if dropped:
                self.log(f"metrics.jsonl: dropped {dropped} record(s) of steps after {tag} (they are trained again)")
            self.scalars.restore(self.metrics_path, self.step)  # the curves so far, for the plot at the end
        self.log(
            f"resumed from {Path(cfg.checkpoint.dir) / tag}: step {self.step}, {self.data.consumed} samples consumed"
        )
        return True

    # -- the loop -------------------------------------------------------------------------------
    def _agree(self, *values: int) -> list[int]:
        """Every rank learns the largest value any rank gave for each flag or code (signals reach ranks
        unevenly: a `kill` of one rank, a launcher that only one node had)."""
        t = all_reduce_small(torch.tensor([float(v) for v in values]), op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def _stop_code(self, over_time: bool) -> int:
        """This rank's reason to stop after this step (megagpt2.training.signals codes; 0: none)."""
        return max(self.signals.code(), TIME_LIMIT if over_time else 0)

    def _log_step(self, r: StepResult, dt: float) -> None:
        cfg = self.cfg
        tokens = self.global_batch * cfg.data.seq_length
        tok_s = tokens / dt
        parts = [f"step {self.step:>6}/{cfg.train.steps}", f"loss {r.loss:.4f}", f"lr {r.lr:.3e}"]
        if r.grad_norm is not None:
            parts.append(f"grad norm {r.grad_norm:.3f}")
        parts.append(f"{tok_s:,.0f} tok/s")
        tflops = self.flops_token * tok_s / self.layout.world_size / 1e12
        if self.peak:
            parts += [f"{tflops:.1f} TFLOP/s/dev", f"MFU {100 * tflops / self.peak:.1f}%"]
        parts += [f"mem {memory_gb(self.device):.2f} GiB", f"{dt:.2f} s/step"]
        parts.append(self.clock.progress(self.step, self.data.consumed * cfg.data.seq_length))
        self.log(" | ".join(parts))
        for tag, v in (
            ("train/loss", r.loss),
            ("train/lr", r.lr),
            ("train/grad_norm", r.grad_norm),
            ("perf/tokens_per_s", tok_s),
            ("perf/tflops_per_device", tflops),
        ):
            if v is not None:
                self.scalars.add(tag, v, self.step)

    def _eval_and_log(self) -> Optional[float]:
        v = self.evaluate()
        if v is not None:
            self.log(f"validation at step {self.step}: loss {v:.4f} | perplexity {math.exp(min(v, 50)):.2f}")
            self.scalars.add("valid/loss", v, self.step)
            self._record(valid_loss=v)
            self.scalars.add("valid/ppl", math.exp(min(v, 50)), self.step)
        return v

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        resumed = self.maybe_resume()
        if not resumed and cfg.train.eval_interval:
            self._eval_and_log()  # the step-0 reference point
        start, stopped_by = time.time(), None
        last_saved = self.step if resumed else None
        interval_t, interval_steps = time.time(), 0
        self.clock.begin()
        while self.step < cfg.train.steps:
            r = self.train_step()
            self.step += 1
            self.clock.tick(self.step)
            if self.step == 1:
                self.log(memory_report(cfg, engine_ds_config(self.plan, self.device), self.layout, self.device))
            self._record(loss=r.loss, lr=r.lr, grad_norm=r.grad_norm, consumed_samples=self.data.consumed)
            interval_steps += 1
            over_time = cfg.train.max_minutes > 0 and (time.time() - start) > 60 * cfg.train.max_minutes
            nonfinite, stop = self._agree(r.nonfinite, self._stop_code(over_time))
            skipped = self.nonfinite.check(self.step, r, bool(nonfinite))  # NonFiniteError: stop, no checkpoint
            if skipped or r.overflow:
                self.log(
                    skipped
                    or f"step {self.step}: fp16 gradient overflow: DeepSpeed skipped the update "
                    f"and lowered the loss scale"
                )
            if self.step % cfg.logging.interval == 0 or self.step == cfg.train.steps:
                self._log_step(r, (time.time() - interval_t) / interval_steps)
                interval_t, interval_steps = time.time(), 0
            if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0:
                self._eval_and_log()
            if stop:
                self.stop_code, stopped_by = stop, self.signals.describe(stop)
                self.log(f"stopping at step {self.step} ({stopped_by}); checkpointing")
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
        cfg = self.cfg
        out: dict[str, Any] = {
            "step": self.step,
            "stopped_by": stopped_by,
            "stop_code": self.stop_code,
            "history": self.scalars.history,
        }
        if cfg.logging.plot and cfg.checkpoint.dir:
            png = self.scalars.plot(Path(cfg.checkpoint.dir) / "loss.png")
            if png:
                self.log(f"loss curves: {png}")
        self.scalars.close()
        if cfg.logging.sample_prompt and stopped_by is None:
            print_sample(
                self.model,
                self.tokenizer,
                cfg.logging.sample_prompt,
                self.layout,
                self.device,
                chat_format=None if cfg.data.format == "pretrain" else cfg.data.format,
            )
        return out


def _ds_version() -> str:
    import deepspeed

    return deepspeed.__version__


def describe(plan: RunPlan, n_params: int) -> str:
    """The run in one line (printed by rank 0 at the start)."""
    m, layout, ds = plan.cfg.model, plan.layout, plan.ds
    return (
        f"megagpt2: {m.n_layer} layers, hidden {m.n_embd}, {m.n_head} heads, {n_params / 1e6:.1f}M parameters "
        f"per rank | world {layout.world_size} = tp {layout.tp} x pp {layout.pp} x dp {layout.dp} | ZeRO stage "
        f"{ds.zero_stage} | global batch {ds.global_batch} = micro {ds.micro_batch} x accum {ds.grad_accum} x dp "
        f"{layout.dp} | seq {plan.cfg.data.seq_length}"
    )
