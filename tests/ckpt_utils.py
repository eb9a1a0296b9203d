"""Checkpoint tests: train with the real Trainer on gloo ranks, resume under other layouts, and
capture the optimizer state through DeepSpeed's own gather functions (safe_get_full_fp32_param /
safe_get_full_optimizer_state, or the torch optimizer's state at ZeRO-0), which know nothing of the
checkpoint format under test.

Every run is GPT-2 with 4 layers, global batch 8 in micro-batches of 2, gradient clipping at 0.05
(active: the grad norm is far above it), dropout off, 7 steps.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from megagpt2.config import config_from_dict
from tests.dist_utils import run_distributed
from tests.train_utils import ds_config, make_dataset, tiny_config

CLIP = 0.05
MICRO, GLOBAL_BATCH, STEPS, SAVED = 2, 8, 7, 4
MOMENTS = ("exp_avg", "exp_avg_sq")


def run_config(prefix: str, ckpt: Optional[Path], **sections) -> dict:
    sections.setdefault("model", {"n_layer": 4})
    checkpoint = {"interval": 1, "keep_last": 10, **sections.pop("checkpoint", {})}
    return tiny_config(prefix, ckpt, steps=STEPS, checkpoint=checkpoint, **sections).to_dict()


def job(
    cfg: dict,
    world: int,
    layout: dict,
    stage: int = 2,
    bf16: bool = False,
    capture_at: tuple = (),
    copy_tags: tuple = (),
    expect_error: bool = False,
    kill_saving: Optional[int] = None,
    fake_free: Optional[int] = None,
) -> tuple:
    """A Trainer run on `world` ranks with `layout` (tp, pp, schedule, ...) and ZeRO `stage`.

    capture_at: steps after whose save the optimizer state is captured; copy_tags: checkpoints
    copied into cfg's checkpoint.dir when the job starts (they may come from an earlier job);
    expect_error: a CheckpointError is returned instead of raised; kill_saving: SIGKILL every
    rank halfway through writing its tensor file of that step; fake_free: the free space the
    filesystem reports."""
    dp = world // (layout.get("tp", 1) * layout.get("pp", 1))
    ds = ds_config(stage=stage, micro=MICRO, accum=GLOBAL_BATCH // (MICRO * dp), clip=CLIP, bf16=bf16)
    return (
        cfg,
        ds,
        layout,
        {
            "capture_at": tuple(capture_at),
            "copy_tags": tuple(copy_tags),
            "expect_error": expect_error,
            "kill_saving": kill_saving,
            "fake_free": fake_free,
        },
    )


def seed_dir(dest: Path, *tags: Path) -> Path:
    """A fresh checkpoint directory holding copies of the given checkpoints."""
    dest.mkdir(parents=True, exist_ok=True)
    for t in tags:
        shutil.copytree(t, dest / t.name)
    return dest


# -- in the ranks ------------------------------------------------------------------------------
def capture(trainer) -> dict[str, Any]:
    """Collective: this rank's TP shard of every parameter's master and moments (full over DP),
    the optimizer step, the learning rate and the tied-embedding copy."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from tests.test_deepspeed_contract import link_fragments

    engine = trainer.engine
    opt = engine.optimizer
    link_fragments(engine)  # DeepSpeed leaves all but the first group unlinked (see there)
    state: dict[str, dict[str, torch.Tensor]] = {}
    steps = set()
    for name, p in engine.module.named_parameters():
        if hasattr(p, "_hp_mapping"):  # ZeRO 1/2: DeepSpeed all-reduces the fragments over DP
            state[name] = {"master": safe_get_full_fp32_param(p).clone()}
            for key in MOMENTS:
                state[name][key] = safe_get_full_optimizer_state(p, key).clone()
            flat = (
                opt.optimizer.param_groups[p._hp_mapping.param_group_index]["params"][0]
                if p._hp_mapping is not None
                else None
            )
            if flat is not None:
                steps.add(float(opt.optimizer.state[flat]["step"]))
        else:  # ZeRO-0 fp32: the torch optimizer on the parameters themselves
            st = opt.state[p]
            state[name] = {"master": p.detach().float().clone(), **{k: st[k].clone() for k in MOMENTS}}
            steps.add(float(st["step"]))
    m = trainer.model
    tied = None
    if trainer.layout.pp > 1 and (m.pre_process or m.post_process):
        tied = (m.wte.weight if m.pre_process else m.head_weight).detach().float().clone()
    return {
        "state": state,
        "steps": sorted(steps),
        "lr": engine.get_lr()[0],
        "tied": tied,
        "lp": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
    }


def _job(rank: int, world: int, cfg_dict: dict, ds: dict, layout: dict, opts: dict) -> dict:
    from megagpt2.checkpoint import CheckpointError
    from megagpt2.parallel import build_process_groups
    from megagpt2.training.plan import plan_run
    from megagpt2.training.trainer import Trainer

    cfg = config_from_dict(copy.deepcopy(cfg_dict))
    for k, v in layout.items():
        setattr(cfg.parallel, k, v)
    if opts["copy_tags"] and rank == 0:
        seed_dir(Path(cfg.checkpoint.dir), *opts["copy_tags"])
    import megagpt2.checkpoint.store as store

    free_bytes = store.free_bytes
    if opts["fake_free"] is not None:
        store.free_bytes = lambda directory: opts["fake_free"]
    plan = plan_run(cfg, ds, world, rank)
    grid = plan.layout
    logged: list[str] = []
    out: dict[str, Any] = {"ps": (grid.tp_rank, grid.pp_rank, grid.dp_rank), "records": [], "tied": [], "captured": {}}
    try:
        trainer = Trainer(plan, build_process_groups(grid, 90), torch.device("cpu"))
        original_log = trainer.log
        trainer.log = lambda msg: (logged.append(msg), original_log(msg))[-1]
        _instrument(trainer, out, opts)
        if opts["kill_saving"]:
            _kill_while_saving(opts["kill_saving"])
        trainer.train()
    except CheckpointError as e:
        if not opts["expect_error"]:
            raise
        return {**out, "error": str(e), "log": logged}
    finally:
        store.free_bytes = free_bytes
    out["params"] = {
        n: (p.detach().float().clone(), getattr(p, "tp_dim", None), getattr(p, "tp_stride", 1))
        for n, p in trainer.model.named_parameters()
    }
    out["log"] = logged
    return out


def _instrument(trainer, out: dict, opts: dict) -> None:
    step, resume, save = trainer.train_step, trainer.maybe_resume, trainer.save
    m = trainer.model

    def train_step():
        r = step()
        out["records"].append({"loss": r.loss, "grad_norm": r.grad_norm, "lr": r.lr})
        if trainer.layout.pp > 1 and (m.pre_process or m.post_process):
            out["tied"].append((m.wte.weight if m.pre_process else m.head_weight).detach().float().clone())
        return r

    def maybe_resume():
        resumed = resume()
        out["resumed"] = capture(trainer) if resumed else None
        return resumed

    def save_():
        tag = save()
        if trainer.step in opts["capture_at"]:
            out["captured"][trainer.step] = capture(trainer)
        return tag

    trainer.train_step, trainer.maybe_resume, trainer.save = train_step, maybe_resume, save_


def _kill_while_saving(step: int) -> None:
    """Every rank writes half of its tensor file of `step`, then dies by SIGKILL."""
    import os
    import signal

    import megagpt2.checkpoint.store as store

    write = store.write_safetensors

    def half_then_die(path, tensors, metadata=None):
        record = write(path, tensors, metadata)
        if path.parent.name == "tensors" and path.parent.parent.name == store.tag_for(step):
            with open(path, "r+b") as f:
                f.truncate(record["bytes"] // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return record

    store.write_safetensors = half_then_die


def jobs_worker(rank: int, world: int, jobs: list) -> list:
    import torch.distributed as dist

    out = []
    for j in jobs:
        out.append(_job(rank, world, *j))
        dist.barrier()
    return out


def run_jobs(world: int, jobs: list, timeout: float = 600) -> list[list[dict]]:
    """results[job][rank]"""
    per_rank = run_distributed(jobs_worker, world, args=(jobs,), timeout=timeout, pg_timeout=120)
    return [[per_rank[r][j] for r in range(world)] for j in range(len(jobs))]


def train_source_222(tmp: Path) -> tuple[Path, dict, list[dict]]:
    """(tp, pp, dp) = (2, 2, 2), 1f1b, ZeRO-2, 7 steps with a checkpoint after every step and the
    optimizer state captured at step SAVED. Returns (dir, config, results by rank)."""
    prefix = make_dataset(tmp / "data")
    cfg = run_config(prefix, tmp / "ckpt")
    results = run_jobs(8, [job(cfg, 8, {"tp": 2, "pp": 2, "schedule": "1f1b"}, capture_at=(SAVED,))])[0]
    return tmp, cfg, results


# -- one process, no DeepSpeed -----------------------------------------------------------------
class FakeEngine:
    """What saving and resuming use of a DeepSpeed engine at ZeRO-0 fp32: the module, the torch
    optimizer stepping its parameters, the LR scheduler and the engine's counters."""

    def __init__(self, seed: int = 0):
        from megagpt2.config import ModelConfig, OptimConfig
        from megagpt2.model import GPT2
        from megagpt2.parallel import ProcessGroups
        from megagpt2.training.model_setup import build_optimizer

        cfg = ModelConfig(
            n_layer=2,
            n_embd=32,
            n_head=4,
            n_positions=16,
            vocab_size=100,
            make_vocab_size_divisible_by=64,
            dropout=0.0,
            attn_dropout=0.0,
            attention="torch",
            kernels="torch",
        )
        self.module = GPT2(cfg, ProcessGroups.single(), seed=seed)
        self.optimizer = build_optimizer(self.module, OptimConfig(lr=1e-2, warmup_steps=0))
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0 / (1.0 + s))
        self.global_steps = self.global_samples = self.skipped_steps = 0

    def fp16_enabled(self) -> bool:
        return False

    def train(self, steps: int) -> None:
        gen = torch.Generator().manual_seed(self.global_steps)
        for _ in range(steps):
            x = torch.randint(0, 100, (2, 9), generator=gen)
            self.module(x[:, :-1], x[:, 1:]).backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.lr_scheduler.step()
            self.global_steps += 1
            self.global_samples += 2


def save_fake(engine, root: Path, step: int, keep_last: int = 5, **layout) -> str:
    from megagpt2.checkpoint import store
    from megagpt2.parallel import ParallelLayout

    state = {
        "consumed_samples": engine.global_samples,
        "layout": {"tp": 1, "pp": 1, "dp": 1, "global_batch": 2, **layout},
    }
    return store.save(engine, ParallelLayout(), str(root), step, state, keep_last=keep_last)


def optimizer_state(engine) -> dict:
    return {
        n: {"master": p.detach().clone(), **{k: v.clone() for k, v in engine.optimizer.state[p].items()}}
        for n, p in engine.module.named_parameters()
    }


# -- in the test -------------------------------------------------------------------------------
def full_state(results: list[dict], which: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Whole tensors from every rank's TP shards of the state captured after resuming
    (which="resumed") or after saving step `which`."""
    from megagpt2.parallel.layers import unshard

    shards: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    split: dict[str, tuple] = {}
    for r in results:
        tp_rank, _, dp_rank = r["ps"]
        if dp_rank != 0:
            continue
        captured = r["resumed"] if which == "resumed" else r["captured"][which]
        for name, tensors in captured["state"].items():
            shards.setdefault(name, {})[tp_rank] = tensors
            split[name] = r["params"][name][1:]
    out = {}
    for name, by_tp in shards.items():
        dim, stride = split[name]
        ranks = sorted(by_tp)
        out[name] = {
            k: by_tp[ranks[0]][k] if dim is None else unshard([by_tp[t][k] for t in ranks], dim, stride)
            for k in by_tp[ranks[0]]
        }
    return out


def assert_same_state(got: dict, want: dict, keys=("master",) + MOMENTS) -> None:
    """Bit-identical masters and moments for every parameter."""
    assert set(got) == set(want), set(got) ^ set(want)
    for name in want:
        for k in keys:
            a, b = got[name][k], want[name][k]
            assert a.shape == b.shape and torch.equal(a, b), (name, k, (a - b).abs().max().item())


def assert_continues(
    results: list[dict], source: list[dict], first_step: int, rtol: float = 1e-6, later_rtol: Optional[float] = None
) -> None:
    """Loss, grad norm and learning rate of every resumed step equal the uninterrupted run's.

    `later_rtol` loosens the steps after the first, whose numbers also depend on the update
    arithmetic of the new layout: ZeRO-0 clips and averages gradients differently from ZeRO-1/2,
    and in fp32 the two drift apart by ~1e-5 within a few steps in any run, resumed or not."""
    want = source[0]["records"][first_step - 1 :]
    for r in results:
        got = r["records"]
        assert len(got) == len(want), (len(got), len(want))
        for i, (a, b) in enumerate(zip(got, want)):
            tol = rtol if i == 0 or later_rtol is None else later_rtol
            assert abs(a["loss"] - b["loss"]) <= tol * abs(b["loss"]), (i, got, want)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= tol * b["grad_norm"], (i, got, want)
            assert b["grad_norm"] > CLIP  # clipping was active
            assert a["lr"] == b["lr"], (a["lr"], b["lr"])


def assert_tied_after_resume(results: list[dict]) -> None:
    """The last stage's head copy equals the first stage's wte bit for bit, after the resume and
    after every step."""
    for first in (r for r in results if r["ps"][1] == 0 and r["resumed"]["tied"] is not None):
        tp, _, dp = first["ps"]
        last = [
            r
            for r in results
            if r["ps"][0] == tp and r["ps"][2] == dp and r["ps"][1] != 0 and r["resumed"]["tied"] is not None
        ]
        assert len(last) == 1
        assert torch.equal(first["resumed"]["tied"], last[0]["resumed"]["tied"])
        assert len(first["tied"]) == len(last[0]["tied"]) >= 1
        for a, b in zip(first["tied"], last[0]["tied"]):
            assert torch.equal(a, b)
