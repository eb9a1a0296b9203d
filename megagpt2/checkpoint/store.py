"""Writing a checkpoint: every rank its own slices, rank 0 the metadata, COMPLETE last.

    <dir>/latest                        tag of the newest complete checkpoint (informational)
    <dir>/step_00000100/                one checkpoint ("tag")
        tensors/rank_00003.safetensors  rank 3's slices: fp32 masters and optimizer moments
        rng/rank_00003.safetensors      rank 3's random states
        megagpt2.json                   step, data position, resolved config, tokenizer, layout,
                                        scheduler / loss scaler and the index of every tensor
        config.yaml                     the resolved config, for people
        COMPLETE                        every file with its size and CRC-32; written last

Nothing is gathered on one rank but metadata; nothing is pickled. A save that cannot finish (a
full disk above all) removes its directory and raises with the path and the bytes it needed, so
the previous checkpoint stays the newest complete one. The format is described in
docs/checkpoints.md.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .engine_state import MASTER, engine_state
from .files import (
    CheckpointError,
    file_bytes,
    filesystem_id,
    free_bytes,
    human_bytes,
    is_disk_full,
    write_safetensors,
    write_text,
)
from .index import build_index
from .legacy import safe_torch_load  # noqa: F401  (re-exported: the first format's safe loader)
from .tags import STATE_FILE, TAG_RE, complete_tags, find_latest, is_complete, step_dirs, tag_for  # noqa: F401

FORMAT_VERSION = 2
_METADATA_ALLOWANCE = 1 << 20  # bytes reserved for rank 0's JSON files in the free-space check


# -- collectives that degrade to no-ops in a single process ---------------------------------
def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    if not _dist():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _gather(obj: Any) -> Optional[list[Any]]:
    """Every rank's `obj` on rank 0 (None elsewhere)."""
    if not _dist():
        return [obj]
    out: Optional[list] = [None] * dist.get_world_size() if _rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def _from_rank0(obj: Any) -> Any:
    if not _dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- random states ---------------------------------------------------------------------------
def rng_state(tracker=None) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if tracker is not None:
        state["tracker"] = tracker.get_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], tracker=None) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if tracker is not None and "tracker" in state:
        tracker.set_state(state["tracker"])


def _write_atomic(path: Path, text: str) -> dict[str, Any]:
    """Small files that must never be seen half-written (COMPLETE, latest)."""
    return write_text(path, text, atomic=True)


def _all_finite(slices) -> bool:
    """Collective: are the masters every rank is about to write finite (each rank checks its own
    share)? A sum is finite when every element is, inf - inf being nan; only a sum that overflows
    or is not finite needs the element-wise check, 30 times slower."""
    from ..parallel.collectives import all_reduce_small

    def finite(t: torch.Tensor) -> bool:
        return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())

    ok = torch.tensor([float(all(finite(s.tensors[MASTER]) for s in slices))])
    return bool(all_reduce_small(ok, op=dist.ReduceOp.MIN).item())


def engine_extras(engine) -> dict[str, Any]:
    """Scheduler, loss scaler and engine counters: the same on every rank, JSON-able."""
    out: dict[str, Any] = {
        "global_steps": int(engine.global_steps),
        "global_samples": int(engine.global_samples),
        "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
    }
    sched = getattr(engine, "lr_scheduler", None)
    if sched is not None:
        sd = sched.state_dict()
        out["scheduler"] = {k: sd[k] for k in ("last_epoch", "_step_count", "_last_lr", "base_lrs") if k in sd}
    if engine.fp16_enabled():
        from .resume import LOSS_SCALER_KEYS

        holder = getattr(engine.optimizer, "loss_scaler", engine.optimizer)
        out["loss_scaler"] = {
            k: getattr(holder, k) for k in LOSS_SCALER_KEYS if isinstance(getattr(holder, k, None), (bool, int, float))
        }
    return out


# -- saving ------------------------------------------------------------------------------------
def save(engine, layout, ckpt_dir: str, step: int, state: dict[str, Any], keep_last: int, tracker=None) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    es = engine_state(engine, layout.tp_rank, layout.tp, layout.dp_rank, layout.dp)
    slices = es.slices()
    if not _all_finite(slices):
        raise CheckpointError(f"step {step}: model weights contain NaN/inf; refusing to write a checkpoint")
    root, tag = Path(ckpt_dir), tag_for(step)
    path = root / tag
    rank = _rank()
    files: dict[str, dict[str, torch.Tensor]] = {f"rng/rank_{rank:05d}.safetensors": rng_state(tracker)}
    tensors = {f"{s.name}/{k}": t for s in slices for k, t in s.tensors.items()}
    mine = f"tensors/rank_{rank:05d}.safetensors" if tensors else None
    if mine:
        files[mine] = tensors
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():
            shutil.rmtree(path)  # a leftover of an interrupted save of this very step
    _barrier()
    _check_space(root, path, sum(file_bytes(t) for t in files.values()))
    records, error, current = {}, None, path
    try:
        for sub in ("tensors", "rng"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        for rel, content in files.items():
            current = path / rel
            records[rel] = write_safetensors(current, content)
    except OSError as e:
        error = _write_error(e, current, sum(file_bytes(t) for t in files.values()), rank)
    _fail_together(_all_gather(error), path)
    gathered = _gather((records, mine, [s.meta() for s in slices]))
    problem = None
    if rank == 0:
        assert gathered is not None  # rank 0 gathers
        problem = _finish(path, step, state, engine_extras(engine), gathered)
    _fail_together([_from_rank0(problem)], path)
    if rank == 0:
        try:
            _write_atomic(root / "latest", tag + "\n")
        except OSError as e:  # informational only: resume looks for the newest complete checkpoint
            print(f"warning: could not update {root / 'latest'}: {e}", file=sys.stderr, flush=True)
        prune(root, keep_last)
    _barrier()
    return tag


def _finish(path: Path, step: int, state: dict[str, Any], extras: dict[str, Any], gathered: list) -> Optional[str]:
    """Rank 0: the metadata and COMPLETE. Returns an error message instead of raising (the other
    ranks learn it from the broadcast that follows)."""
    try:
        records = {rel: rec for rank_records, _, _ in gathered for rel, rec in rank_records.items()}
        index = build_index((mine, metas) for _, mine, metas in gathered)
        layout = {**state.get("layout", {}), "world_size": len(gathered)}
        doc = {"format_version": FORMAT_VERSION, "step": step, **state, "layout": layout, **extras, "tensors": index}
        doc.pop("config_yaml", None)
        records[STATE_FILE] = write_text(path / STATE_FILE, json.dumps(doc, indent=1), atomic=False)
        if "config_yaml" in state:
            records["config.yaml"] = write_text(path / "config.yaml", state["config_yaml"], atomic=False)
        _write_atomic(
            path / "COMPLETE",
            json.dumps({"format_version": FORMAT_VERSION, "files": dict(sorted(records.items()))}, indent=1),
        )
        return None
    except OSError as e:
        return _write_error(e, path / STATE_FILE, _METADATA_ALLOWANCE, 0)
    except CheckpointError as e:
        return str(e)


def _write_error(e: OSError, f: Path, needed: int, rank: int) -> str:
    if is_disk_full(e):
        free = free_bytes(f.parent if f.parent.exists() else f.parent.parent)
        return (
            f"No space left on device writing {f} (rank {rank}): its files need {human_bytes(needed)}, "
            f"{human_bytes(free) if free is not None else 'unknown'} free"
        )
    return f"cannot write {f} (rank {rank}): {e.strerror or e}"


def _fail_together(errors: list[Optional[str]], path: Path) -> None:
    """If any rank failed: remove the partial checkpoint (rank 0) and raise on every rank."""
    errors = [e for e in errors if e]
    if not errors:
        return
    _barrier()
    if _rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    latest = find_latest(str(path.parent))
    raise CheckpointError(
        f"checkpoint {path.name} was not saved: {errors[0]}. Removed the partial {path}; "
        f"the newest complete checkpoint is {latest or 'none'}"
    )


def _check_space(root: Path, path: Path, mine: int) -> None:
    """Before writing: is there room on each filesystem for what the ranks writing to it need?"""
    fs, free = filesystem_id(root), free_bytes(root)
    extra = _METADATA_ALLOWANCE if _rank() == 0 else 0
    table = _all_gather((fs, mine + extra, free))
    need = sum(n for f, n, _ in table if f == fs)
    short = None
    if free is not None and need > free:
        short = (
            f"No space left on device for checkpoint {path}: the ranks writing to {root} need "
            f"{human_bytes(need)} ({need} bytes) but {human_bytes(free)} are free; free space or point "
            f"checkpoint.dir elsewhere"
        )
    errors = [e for e in _all_gather(short) if e]
    if errors:
        raise CheckpointError(errors[0])


def prune(root: Path, keep_last: int) -> None:
    """Remove all but the newest `keep_last` complete checkpoints, and interrupted saves older than
    the newest complete one. Never fails: a problem is a warning (the run goes on)."""
    try:
        tags = complete_tags(str(root))
        doomed = [root / t for t in tags[:-keep_last]]
        if tags:
            doomed += [p for p in step_dirs(str(root)) if p.name < tags[-1] and not is_complete(p)]
        for d in doomed:
            shutil.rmtree(d, onerror=_warn_rmtree)
    except Exception as e:  # pruning must never end a run
        print(f"warning: could not prune old checkpoints in {root}: {e}", file=sys.stderr, flush=True)


def _warn_rmtree(func, path, exc_info) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):  # another process removed it first: fine
        print(f"warning: could not remove {path}: {exc_info[1]}", file=sys.stderr, flush=True)


def read_state(ckpt_path: str) -> dict[str, Any]:
    """megagpt2.json of a complete checkpoint."""
    from .verify import read_meta

    p = Path(ckpt_path)
    if not is_complete(p):
        raise CheckpointError(f"{p} is not a complete megagpt2 checkpoint (no COMPLETE or {STATE_FILE})")
    return read_meta(p)
