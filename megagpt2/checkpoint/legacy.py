"""Checkpoints of the first format: DeepSpeed's .pt files (per TP x PP rank, ZeRO shards per DP rank)
next to megagpt2.json (format_version 1), an empty COMPLETE and per-rank RNG files.

They still resume, under the layout that wrote them (the next save writes the layout-free format,
so one resume converts a run), and their weights still convert and export. Nothing is unpickled
with arbitrary classes: the files are read with torch.load(weights_only=True) and an allowlist of
the plain DeepSpeed/Python types they contain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .files import CheckpointError
from .tags import TAG_RE, complete_tags


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
        raise CheckpointError(
            f"refusing to load {where}: it holds objects a checkpoint never contains "
            f"({first}). The file may have been tampered with; do not load it with "
            f"weights_only=False. {_previous_hint(f)}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint file {f} is damaged or truncated ({str(e).splitlines()[0]}); {_previous_hint(f)}"
        ) from None


def _previous_hint(f: Path) -> str:
    """What to do when a file of checkpoint step_N is unusable: name the older complete tag."""
    tag_dir = f.parent if TAG_RE.match(f.parent.name) else None
    if tag_dir is None:
        return "use another checkpoint"
    older = [t for t in complete_tags(str(tag_dir.parent)) if t < tag_dir.name]
    if older:
        return (
            f"resume from the previous complete checkpoint with --checkpoint.tag={older[-1]} (or move {tag_dir} aside)"
        )
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
        raise CheckpointError(f"{f} is missing: the checkpoint was written with another tp/pp layout")
    stored = safe_torch_load(str(f), map_location="cpu")["module"]
    own = dict(model.named_parameters())
    for name, p in own.items():
        if name not in stored:
            raise CheckpointError(f"{f}: tensor {name} is missing (different model shape?)")
        if tuple(stored[name].shape) != tuple(p.shape):
            raise CheckpointError(
                f"{f}: tensor {name} has shape {tuple(stored[name].shape)} in the checkpoint "
                f"but {tuple(p.shape)} in the model (model config differs)"
            )
    extra = sorted(set(stored) - set(own) - {n for n, _ in model.named_buffers()})
    if extra:
        raise CheckpointError(f"{f}: unexpected tensor {extra[0]} (different model shape?)")


def load(engine, path: Path, state: dict[str, Any], grid, tracker=None) -> None:
    """Collective: restore model, optimizer, scheduler and RNG from a first-format checkpoint.

    `grid` is this run's megagpt2.parallel.ParallelLayout."""
    from safetensors.torch import load_file

    from .store import set_rng_state

    stored = state.get("layout", {})
    want = {"tp": grid.tp, "pp": grid.pp, "dp": grid.dp}
    if stored and any(stored.get(k) != v for k, v in want.items()):
        raise CheckpointError(
            f"{path} is in the first checkpoint format (DeepSpeed .pt files), which resumes only under the layout "
            f"that wrote it: tp={stored.get('tp')} pp={stored.get('pp')} dp={stored.get('dp')}, but this run is "
            f"tp={grid.tp} pp={grid.pp} dp={grid.dp}. Resume once with that layout (every save after it "
            f"is layout-free), or carry the weights over with tools/convert_checkpoint.py and --train.init_from"
        )
    check_shapes(engine.module, path, grid.model_parallel_rank)
    install_safe_loader(engine)
    loaded, _ = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    rank = engine.global_rank
    rng_file = path / "rng" / f"rank_{rank:05d}.safetensors"
    if not rng_file.is_file():  # verification checks this before; a file removed since is still an error
        raise CheckpointError(f"{rng_file} is missing: the random state of rank {rank} cannot be restored")
    set_rng_state(load_file(str(rng_file)), tracker)
    if rank == 0:
        print(f"{path} is in the first checkpoint format; the next save writes the layout-free one", flush=True)
