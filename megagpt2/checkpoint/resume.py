"""Resuming under any layout: choose a checkpoint that verifies, read this rank's slices, go on.

Each rank reads, memory-mapped, exactly the parts of the stored pieces that overlap what it now
owns (its TP shard of each parameter and, under ZeRO, its flat partition of that shard), straight
into the fp32 master partition and the optimizer's moments; DeepSpeed then refreshes the model's
weights from the masters. Step, learning-rate schedule, loss scale and data position (in samples)
continue; random states are restored per rank when the (tp, pp, dp) grid is unchanged and
re-seeded deterministically otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from .engine_state import MASTER, engine_state
from .files import CheckpointError, OpenFiles
from .index import check_model, read_into
from .store import _all_gather, _barrier, _rank, set_rng_state
from .tags import STATE_FILE, complete_tags, is_complete
from .verify import choose, read_meta

if TYPE_CHECKING:
    from ..parallel import ParallelLayout

LOSS_SCALER_KEYS = (
    "cur_scale",
    "cur_iter",
    "last_overflow_iter",
    "cur_hysteresis",
    "scale_factor",
    "scale_window",
    "min_scale",
    "delayed_shift",
    "consecutive_hysteresis",
    "dynamic",
    "dynamic_loss_scale",
)
_GRID = ("tp", "pp", "dp")
_KNOBS = ("tp", "pp", "dp", "zero_stage", "schedule", "virtual_stages", "sequence_parallel", "precision")


def run_layout(cfg, ds: dict, grid: ParallelLayout) -> dict[str, Any]:
    """The layout of this run as a checkpoint records it (`ds`: the engine's DeepSpeed config)."""
    precision = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
    return {
        "tp": grid.tp,
        "pp": grid.pp,
        "dp": grid.dp,
        "zero_stage": int(ds.get("zero_optimization", {}).get("stage", 0)),
        "schedule": cfg.parallel.schedule if grid.pp > 1 else "none",
        "virtual_stages": cfg.parallel.virtual_stages if grid.pp > 1 else 1,
        "sequence_parallel": bool(cfg.parallel.sequence_parallel and grid.tp > 1),
        "precision": precision,
        "micro_batch": ds["train_micro_batch_size_per_gpu"],
        "grad_accum": ds["gradient_accumulation_steps"],
        "global_batch": ds["train_batch_size"],
    }


def describe(layout: dict[str, Any]) -> str:
    """'tp=2 pp=2 dp=2 ZeRO-2 fp32 1f1b' (virtual stages and sequence parallelism when used)."""
    parts = [f"tp={layout.get('tp')} pp={layout.get('pp')} dp={layout.get('dp')}"]
    if "zero_stage" in layout:
        parts.append(f"ZeRO-{layout['zero_stage']}")
    parts.append(layout.get("precision", "fp32"))
    if layout.get("pp", 1) > 1:
        parts.append(str(layout.get("schedule")))
        if layout.get("virtual_stages", 1) > 1:
            parts.append(f"virtual stages {layout['virtual_stages']}")
    if layout.get("sequence_parallel"):
        parts.append("sequence parallel")
    return " ".join(parts)


def resume(
    engine, grid: ParallelLayout, cfg, layout: dict[str, Any], tracker=None, log: Callable[[str], None] = print
) -> Optional[dict[str, Any]]:
    """Collective: restore the newest usable checkpoint of cfg.checkpoint.dir into `engine`.

    Returns the checkpoint's metadata (plus "tag"), or None when there is nothing to resume."""
    c = cfg.checkpoint
    root = Path(c.dir)
    tags = complete_tags(str(root))
    if c.tag and not is_complete(root / c.tag):
        raise CheckpointError(
            f"checkpoint.tag={c.tag}: {root / c.tag} is not a complete checkpoint; complete "
            f"ones: {', '.join(tags) or 'none'}"
        )
    damaged: list[str] = []
    tag = choose(root, tags, c.tag, c.fallback, c.verify, log, damaged)
    _move_aside(root, damaged, log)
    if tag is None:
        return None
    path = root / tag
    meta = read_meta(path)
    if int(meta.get("format_version", 1)) < 2:
        from . import legacy

        legacy.load(engine, path, meta, grid, tracker)
        return {**meta, "tag": tag}
    old = meta.get("layout", {})
    _check_batch(path, meta, layout, c.allow_batch_change, log)
    if any(old.get(k) != layout.get(k) for k in _KNOBS):
        log(f"layout changed from {describe(old)} to {describe(layout)}")
    load_tensors(engine, grid, path, meta)
    restore_extras(engine, meta)
    _restore_rng(path, meta, layout, grid, cfg.train.seed, tracker, log)
    return {**meta, "tag": tag}


def _move_aside(root: Path, damaged: list[str], log: Callable[[str], None]) -> None:
    """Rename damaged checkpoints to <tag>.damaged: kept for inspection, never counted as one of
    the checkpoint.keep_last to keep, never tried again."""
    if damaged and _rank() == 0:
        for t in damaged:
            dest = root / f"{t}.damaged"
            n = 1
            while dest.exists():
                n, dest = n + 1, root / f"{t}.damaged{n}"
            try:
                (root / t).rename(dest)
                log(f"moved the damaged {root / t} aside to {dest}")
            except OSError as e:  # it is skipped either way; the next save of that step replaces it
                log(f"warning: could not move the damaged {root / t} aside: {e}")
    if damaged:
        _barrier()


def _check_batch(path: Path, meta: dict, layout: dict, allowed: bool, log: Callable[[str], None]) -> None:
    old, new = meta.get("layout", {}).get("global_batch"), layout["global_batch"]
    if old is None or old == new:
        return
    what = (
        f"{path} was trained with a global batch of {old} samples and this run has {new}; the data position "
        f"({meta.get('consumed_samples')} samples) and the step count carry over"
    )
    if not allowed:
        raise CheckpointError(
            f"{what}. To continue with the new batch size pass --checkpoint.allow_batch_change=true "
            f"(or restore the old one in the DeepSpeed config)"
        )
    log(f"warning: {what}; the run is no longer the one an unchanged batch would give")


def load_tensors(engine, grid: ParallelLayout, path: Path, meta: dict[str, Any]) -> None:
    """Collective: fill this rank's masters and moments from the checkpoint's pieces."""
    index = meta["tensors"]
    params = dict(engine.module.named_parameters())
    where = str(path / STATE_FILE)
    check_model(index, params, grid.tp, where)
    names = set().union(*_all_gather(sorted(params)))
    extra = sorted(set(index) - names)
    if extra:
        raise CheckpointError(
            f"{where}: tensor {extra[0]} is in the checkpoint but not in the model (different model shape?)"
        )
    keys = sorted(set().union(*(e["keys"] for e in index.values())) - {MASTER})
    es = engine_state(engine, grid.tp_rank, grid.tp, grid.dp_rank, grid.dp)
    targets = es.targets(keys)
    files = OpenFiles(path)
    try:
        with torch.no_grad():
            for t in targets:
                entry = index[t.name]
                for key, dest in t.tensors.items():
                    read_into(files, t.name, entry, key, t.tp, t.start, dest)
                t.step = int(entry["step"])
    finally:
        files.close()
    es.finish(targets, keys, default_step=max((int(e["step"]) for e in index.values()), default=0))


def restore_extras(engine, meta: dict[str, Any]) -> None:
    """Learning-rate schedule, loss scale and the engine's counters."""
    for k in ("global_steps", "global_samples", "skipped_steps"):
        if k in meta:
            setattr(engine, k, int(meta[k]))
    sched, s = getattr(engine, "lr_scheduler", None), meta.get("scheduler")
    if sched is not None and s:
        sched.last_epoch = int(s["last_epoch"])
        sched._step_count = int(s.get("_step_count", sched.last_epoch + 1))
        if hasattr(sched, "lr_lambdas"):  # LambdaLR: the rate at this step under this run's config
            lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        else:  # pragma: no cover - the trainer always builds a LambdaLR
            lrs = list(s["_last_lr"])
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs
    scaler = meta.get("loss_scaler")
    if scaler and engine.fp16_enabled():
        holder = getattr(engine.optimizer, "loss_scaler", engine.optimizer)
        for k, v in scaler.items():
            if k in LOSS_SCALER_KEYS:
                setattr(holder, k, v)


def _restore_rng(
    path: Path, meta: dict, layout: dict, grid: ParallelLayout, seed: int, tracker, log: Callable[[str], None]
) -> None:
    from safetensors.torch import load_file

    old = meta.get("layout", {})
    if all(old.get(k) == layout.get(k) for k in _GRID):
        set_rng_state(load_file(str(path / "rng" / f"rank_{_rank():05d}.safetensors")), tracker)
        return
    # Another grid: no rank's stream continues. Re-seed from (seed, step), the same on every rank
    # (the default stream must agree over TP); the TP tracker from it and the TP rank.
    new_seed = (seed * 1_000_003 + int(meta["step"])) % (2**63)
    torch.manual_seed(new_seed)
    if tracker is not None:
        from ..parallel.random import RNGTracker

        tracker.set_state(RNGTracker(new_seed, grid.tp_rank).get_state())
    log(
        "random states re-seeded for the new (tp, pp, dp) grid: dropout masks differ from an uninterrupted "
        "run from here on (nothing else does)"
    )
