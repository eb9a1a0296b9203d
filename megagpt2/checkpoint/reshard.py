"""Weights across layouts: gather a full state dict from any checkpoint, shard it for any rank.

Parameter names are global (`h.7.mlp.c_fc.weight` is block 7 in every layout) and every
checkpoint records how each parameter is split over TP (`sharding` in megagpt2.json), so:

    full = full_state_dict(path)          # any tp x pp checkpoint, a converted dir, or HF GPT-2
    load_pretrained(model, path)          # this rank's shard of every parameter it owns

Sources understood by `read_weights`:
  - a training checkpoint directory (<dir>/latest is followed) or one of its step_* tags;
  - a converted directory (tools/convert_checkpoint.py): megagpt2.json + model_tp00.safetensors ...;
  - a Hugging Face GPT-2 directory (config.json + model.safetensors / pytorch_model.bin).
Only weights move: optimizer state stays with the layout that wrote it (see docs/checkpoints.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from ..parallel.layers import shard, unshard
from .store import STATE_FILE, CheckpointError, find_latest, safe_torch_load

CONVERTED_KIND = "megagpt2-weights"


def resolve(path: str) -> tuple[str, Path]:
    """(kind, directory): kind is "training", "converted" or "hf"."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (p / "config.json").is_file() and not (p / STATE_FILE).is_file():
        return "hf", p
    if (p / STATE_FILE).is_file():
        meta = json.loads((p / STATE_FILE).read_text())
        return ("converted" if meta.get("kind") == CONVERTED_KIND else "training"), p
    tag = find_latest(str(p))
    if tag is not None:
        return "training", p / tag
    raise CheckpointError(f"{path}: not a megagpt2 checkpoint (no {STATE_FILE}, no complete step_* tag) "
                          f"nor a Hugging Face directory (no config.json)")


def read_weights(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, full state dict) from any supported source. Metadata has "config" (a Config
    dict, model section at least) and, for megagpt2 sources, "step", "tokenizer", "layout"."""
    kind, d = resolve(path)
    if kind == "hf":
        from ..interop import load_hf_dir

        cfg, sd = load_hf_dir(str(d))
        return {"config": {"model": vars(cfg)}, "source": "hf", "sharding": default_sharding(sd)}, sd
    meta = json.loads((d / STATE_FILE).read_text())
    sharding = meta["sharding"]
    tp = meta["layout"]["tp"]
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    if kind == "converted":
        from safetensors.torch import load_file

        for t in range(tp):
            for name, tensor in load_file(str(d / f"model_tp{t:02d}.safetensors")).items():
                pieces.setdefault(name, {})[t] = tensor
    else:
        for f in sorted(d.glob("mp_rank_*_model_states.pt")):
            mp_rank = int(f.name.split("_")[2])
            module = safe_torch_load(str(f), map_location="cpu")["module"]
            for name, tensor in module.items():
                if name in sharding:
                    pieces.setdefault(name, {})[mp_rank % tp] = tensor
    missing = [n for n in sharding if n not in pieces]
    if missing:
        raise CheckpointError(f"{d}: no data for {missing[0]} (and {len(missing) - 1} more): files missing?")
    full = {}
    for name, by_rank in pieces.items():
        dim, stride = sharding[name]
        if dim is None:
            full[name] = by_rank[min(by_rank)]
            continue
        if sorted(by_rank) != list(range(tp)):
            raise CheckpointError(f"{d}: {name} has TP shards {sorted(by_rank)}, expected 0..{tp - 1}")
        full[name] = unshard([by_rank[t] for t in range(tp)], dim, stride)
    return meta, full


def default_sharding(names) -> dict[str, list]:
    """GPT-2's TP split of each parameter by name (what the layers mark; checked by a test)."""
    out = {}
    for n in names:
        if n == "wte.weight" or n.endswith(("mlp.c_fc.weight", "mlp.c_fc.bias")):
            out[n] = [0, 1]
        elif n.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
            out[n] = [0, 3]
        elif n.endswith("c_proj.weight"):
            out[n] = [1, 1]
        else:
            out[n] = [None, 1]
    return out


def full_state_dict(path: str) -> dict[str, torch.Tensor]:
    return read_weights(path)[1]


def shard_for(model: torch.nn.Module, full: dict[str, torch.Tensor], tp_rank: int, tp_size: int,
              strict: bool = True) -> dict[str, torch.Tensor]:
    """This rank's pieces of `full` for the parameters `model` owns (by the model's sharding)."""
    out = {}
    for name, p in model.named_parameters():
        if name not in full:
            if strict:
                raise CheckpointError(f"pretrained weights have no tensor {name}")
            continue
        t = full[name]
        dim = getattr(p, "tp_dim", None)
        if dim is not None:
            t = shard(t, dim, tp_rank, tp_size, getattr(p, "tp_stride", 1))
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"tensor {name}: pretrained shape {tuple(full[name].shape)} gives "
                                  f"{tuple(t.shape)} on this rank but the model has {tuple(p.shape)} "
                                  f"(different model config?)")
        out[name] = t
    return out


@torch.no_grad()
def load_pretrained(model, path: str) -> dict[str, Any]:
    """Copy weights from `path` (any layout or HF) into this rank's `model`; returns metadata."""
    meta, full = read_weights(path)
    want = model.cfg
    stored = meta.get("config", {}).get("model", {})
    for key in ("vocab_size", "n_embd", "n_layer", "n_head"):
        if key in stored and stored[key] != getattr(want, key):
            raise CheckpointError(f"{path}: model.{key}={stored[key]} but this run has model.{key}="
                                  f"{getattr(want, key)}; use the same model config (or another checkpoint)")
    tp_rank, tp = model.groups.layout.tp_rank, model.groups.layout.tp
    local = shard_for(model, full, tp_rank, tp)
    for name, p in model.named_parameters():
        p.copy_(local[name].to(p.dtype))
    if getattr(model, "post_process", False) and not getattr(model, "pre_process", True):
        model.head_weight.copy_(shard(full["wte.weight"], 0, tp_rank, tp))
    return meta


def write_converted(full: dict[str, torch.Tensor], sharding: dict[str, list], meta: dict[str, Any],
                    out_dir: str, tp: int, dtype: Optional[torch.dtype] = None) -> None:
    """A weights-only checkpoint pre-sharded for tensor-parallel size `tp` (any pp can load it)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for t in range(tp):
        part = {}
        for name, tensor in full.items():
            dim, stride = sharding[name]
            piece = tensor if dim is None else shard(tensor, dim, t, tp, stride)
            part[name] = (piece.to(dtype) if dtype is not None else piece).contiguous()
        save_file(part, str(out / f"model_tp{t:02d}.safetensors"))
    doc = {**{k: v for k, v in meta.items() if k not in ("sharding", "layout", "history")},
           "kind": CONVERTED_KIND, "layout": {"tp": tp}, "sharding": sharding}
    (out / STATE_FILE).write_text(json.dumps(doc, indent=1))
