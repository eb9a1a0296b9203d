"""Checkpoints: DeepSpeed writes model, optimizer and ZeRO shards; we add our state around them.

    <dir>/latest                   tag of the newest complete checkpoint (written last, atomically)
    <dir>/step_00000100/           one checkpoint ("tag")
        mp_rank_*_model_states.pt, *_optim_states.pt      DeepSpeed's files (per TP x PP rank,
                                                           ZeRO shards per DP rank)
        megagpt2.json              step, data position, resolved config, tokenizer identity,
                                   layout and the sharding of every parameter
        config.yaml                the resolved config, for people
        rng/rank_00003.safetensors random states of each rank
        COMPLETE                   written by rank 0 after every rank finished writing

A checkpoint becomes "latest" only after COMPLETE exists; a directory without it (a crash
mid-write) is never loaded. Nothing is unpickled with arbitrary classes: our files are JSON and
safetensors, and DeepSpeed's are read with torch.load(weights_only=True) and an allowlist of the
plain DeepSpeed/Python types they contain.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

TAG_RE = re.compile(r"^step_(\d{8})$")
STATE_FILE = "megagpt2.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the model being trained."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_complete(path: Path) -> bool:
    return (path / "COMPLETE").is_file() and (path / STATE_FILE).is_file()


def complete_tags(ckpt_dir: str) -> list[str]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    tags = [p.name for p in d.iterdir() if p.is_dir() and TAG_RE.match(p.name) and is_complete(p)]
    return sorted(tags)


def find_latest(ckpt_dir: Optional[str]) -> Optional[str]:
    """Tag of the newest complete checkpoint in ckpt_dir, or None."""
    if not ckpt_dir or not Path(ckpt_dir).is_dir():
        return None
    latest = Path(ckpt_dir) / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if is_complete(Path(ckpt_dir) / tag):
            return tag
    tags = complete_tags(ckpt_dir)  # `latest` missing or pointing at something unusable
    return tags[-1] if tags else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def sharding_of(model: torch.nn.Module) -> dict[str, list]:
    """{parameter name: [tp_dim or None, stride]}: how to gather each parameter over TP."""
    return {n: [getattr(p, "tp_dim", None), getattr(p, "tp_stride", 1)] for n, p in model.named_parameters()}


def _all_finite(model: torch.nn.Module) -> bool:
    from ..parallel.collectives import all_reduce_small

    ok = torch.tensor([float(all(bool(torch.isfinite(p).all()) for p in model.parameters()))])
    return bool(all_reduce_small(ok, op=dist.ReduceOp.MIN).item())


def save(engine, ckpt_dir: str, step: int, state: dict[str, Any], keep_last: int, tracker=None) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    if not _all_finite(engine.module):
        raise CheckpointError(f"step {step}: model weights contain NaN/inf; refusing to write a checkpoint")
    tag = tag_for(step)
    path = Path(ckpt_dir) / tag
    if _rank() == 0 and path.exists():
        shutil.rmtree(path)  # a leftover of an interrupted save of this very step
    _barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={}, save_latest=False)
    from safetensors.torch import save_file

    (path / "rng").mkdir(parents=True, exist_ok=True)
    save_file(rng_state(tracker), str(path / "rng" / f"rank_{_rank():05d}.safetensors"))
    sharding = sharding_of(engine.module)
    if dist.is_initialized():  # pipeline stages own different parameters: merge every rank's map
        maps: list = [None] * dist.get_world_size()
        dist.all_gather_object(maps, sharding)
        sharding = {k: v for m in maps for k, v in m.items()}
    if _rank() == 0:
        doc = {"format_version": FORMAT_VERSION, "step": step, **state, "sharding": sharding}
        _write_atomic(path / STATE_FILE, json.dumps(doc, indent=1))
        if "config_yaml" in state:
            _write_atomic(path / "config.yaml", state["config_yaml"])
    _barrier()  # every rank has written its files
    if _rank() == 0:
        _write_atomic(path / "COMPLETE", "")
        _write_atomic(Path(ckpt_dir) / "latest", tag + "\n")
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(Path(ckpt_dir) / old, ignore_errors=True)
    _barrier()
    return tag


def read_state(ckpt_path: str) -> dict[str, Any]:
    p = Path(ckpt_path)
    if not is_complete(p):
        raise CheckpointError(f"{p} is not a complete megagpt2 checkpoint (no COMPLETE or {STATE_FILE})")
    return json.loads((p / STATE_FILE).read_text())


# -- safe loading of DeepSpeed's files -------------------------------------------------------
def _safe_globals() -> list:
    """The classes DeepSpeed's files name beyond torch's tensor types: plain data, no callables.

    Only types whose construction and state restore run no code of the file's choosing belong
    here. Never add builtins such as getattr: with torch's own rebuild helpers (which call the
    callable they are given) getattr reaches any builtin, eval included."""
    import collections

    allowed: list = [collections.OrderedDict, set, torch.Size]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:  # pragma: no cover
        pass
    return allowed


def safe_torch_load(path: str, map_location=None) -> Any:
    """torch.load that cannot run code: weights_only with DeepSpeed's plain data types allowed.

    A file that names anything else is refused, as is an unreadable one, with a CheckpointError
    that names the file and says what to do."""
    import pickle

    f = Path(path)
    where = f"{f.parent.name}/{f.name}" if TAG_RE.match(f.parent.name) else str(f)
    if not f.is_file():
        raise CheckpointError(f"checkpoint file {f} is missing; {_previous_hint(f)}")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"refusing to load {where}: it holds objects a checkpoint never contains "
                              f"({first}). The file may have been tampered with; do not load it with "
                              f"weights_only=False. {_previous_hint(f)}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {f} is damaged or truncated ({str(e).splitlines()[0]}); "
                              f"{_previous_hint(f)}") from None


def _previous_hint(f: Path) -> str:
    """What to do when a file of checkpoint step_N is unusable: name the older complete tag."""
    tag_dir = f.parent if TAG_RE.match(f.parent.name) else None
    if tag_dir is None:
        return "use another checkpoint"
    older = [t for t in complete_tags(str(tag_dir.parent)) if t < tag_dir.name]
    if older:
        return (f"resume from the previous complete checkpoint with --checkpoint.tag={older[-1]} "
                f"(or move {tag_dir} aside)")
    return f"no older complete checkpoint exists in {tag_dir.parent}; start without it (move {tag_dir} aside)"


def install_safe_loader(engine) -> None:
    """Make engine.load_checkpoint read files with safe_torch_load."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class _SafeEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_torch_load(path, map_location)

    engine.checkpoint_engine = _SafeEngine(None)


def check_shapes(model: torch.nn.Module, ckpt_path: Path, mp_rank: int) -> None:
    """Fail with the name of the first tensor whose shape differs from the model's."""
    f = ckpt_path / f"mp_rank_{mp_rank:02d}_model_states.pt"
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: the checkpoint was written with another tp/pp layout "
                              f"(convert it with tools/convert_checkpoint.py)")
    stored = safe_torch_load(str(f), map_location="cpu")["module"]
    own = dict(model.named_parameters())
    for name, p in own.items():
        if name not in stored:
            raise CheckpointError(f"{f}: tensor {name} is missing (different model shape?)")
        if tuple(stored[name].shape) != tuple(p.shape):
            raise CheckpointError(f"{f}: tensor {name} has shape {tuple(stored[name].shape)} in the checkpoint "
                                  f"but {tuple(p.shape)} in the model (model config differs)")
    extra = sorted(set(stored) - set(own) - {n for n, _ in model.named_buffers()})
    if extra:
        raise CheckpointError(f"{f}: unexpected tensor {extra[0]} (different model shape?)")


def load(engine, ckpt_dir: str, tag: str, layout, tracker=None) -> dict[str, Any]:
    """Collective: restore model, optimizer, scheduler and RNG; return our stored state.

    `layout` is this run's megagpt2.parallel.ParallelLayout."""
    path = Path(ckpt_dir) / tag
    state = read_state(str(path))
    stored = state.get("layout", {})
    want = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp}
    if stored and any(stored.get(k) != v for k, v in want.items()):
        raise CheckpointError(f"{path} was written with layout {stored} but this run is {want}; "
                              f"convert it with tools/convert_checkpoint.py or start with the same layout")
    check_shapes(engine.module, path, layout.model_parallel_rank)
    install_safe_loader(engine)
    loaded, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    from safetensors.torch import load_file

    rng_file = path / "rng" / f"rank_{_rank():05d}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_file(str(rng_file)), tracker)
    else:
        print(f"warning: [rank {_rank()}] {rng_file} is missing: resuming with fresh random states, so "
              f"dropout masks differ from an uninterrupted run (the run is no longer exact)",
              file=sys.stderr, flush=True)
    return state
