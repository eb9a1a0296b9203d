"""Weights across layouts: gather a full state dict from any checkpoint, shard it for any rank.

Parameter names are global (`h.7.mlp.c_fc.weight` is block 7 in every layout) and every
checkpoint records how each parameter is split over TP, so:

    full = full_state_dict(path)          # any checkpoint, a converted dir, or HF GPT-2
    load_pretrained(model, path)          # this rank's shard of every parameter it owns

Sources understood by `read_weights`:
  - a training checkpoint directory (its newest complete checkpoint is taken) or one of its
    step_* tags; the weights are the fp32 masters (a bf16 run exports without rounding);
  - a converted directory (tools/convert_checkpoint.py): megagpt2.json + model_tp00.safetensors ...;
  - a Hugging Face GPT-2 directory (config.json + model.safetensors / pytorch_model.bin).
A training run resumes its optimizer state under any layout by itself (megagpt2.checkpoint.resume);
this module is for weights only (init_from, evaluation, export).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from ..parallel.layers import shard, unshard
from .engine_state import MASTER
from .files import CheckpointError, OpenFiles
from .index import check_model, read_into
from .legacy import safe_torch_load
from .tags import STATE_FILE, find_latest
from .verify import read_meta

CONVERTED_KIND = "megagpt2-weights"


def resolve(path: str) -> tuple[str, Path]:
    """(kind, directory): kind is "training", "converted" or "hf"."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (p / "config.json").is_file() and not (p / STATE_FILE).is_file():
        return "hf", p
    if (p / STATE_FILE).is_file():
        meta = read_meta(p)
        return ("converted" if meta.get("kind") == CONVERTED_KIND else "training"), p
    tag = find_latest(str(p))
    if tag is not None:
        return "training", p / tag
    raise CheckpointError(
        f"{path}: not a megagpt2 checkpoint (no {STATE_FILE}, no complete step_* tag) "
        f"nor a Hugging Face directory (no config.json)"
    )


def read_weights(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, full state dict) from any supported source. Metadata has "config" (a Config
    dict, model section at least) and, for megagpt2 sources, "step", "tokenizer", "layout"."""
    kind, d = resolve(path)
    if kind == "hf":
        from ..interop import load_hf_dir

        cfg, sd = load_hf_dir(str(d))
        return {"config": {"model": vars(cfg)}, "source": "hf", "sharding": default_sharding(sd)}, sd
    meta = read_meta(d)
    if kind == "training" and int(meta.get("format_version", 1)) >= 2:
        return _read_masters(d, meta)
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


def _read_masters(d: Path, meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Full fp32 master weights of a layout-free checkpoint (every piece of every tensor)."""
    index = meta["tensors"]
    files = OpenFiles(d)
    full = {}
    try:
        for name, entry in index.items():
            flat = torch.empty(math.prod(entry["shape"]), dtype=_dtype(entry["dtypes"][MASTER]))
            read_into(files, name, entry, MASTER, (0, 1), 0, flat)
            full[name] = flat.view(entry["shape"])
    finally:
        files.close()
    sharding = {n: [e["tp_dim"], e["tp_stride"]] for n, e in index.items()}
    return {**{k: v for k, v in meta.items() if k != "tensors"}, "sharding": sharding}, full


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in the checkpoint index")
    return dtype


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


def shard_for(
    model: torch.nn.Module, full: dict[str, torch.Tensor], tp_rank: int, tp_size: int, strict: bool = True
) -> dict[str, torch.Tensor]:
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
            raise CheckpointError(
                f"tensor {name}: pretrained shape {tuple(full[name].shape)} gives "
                f"{tuple(t.shape)} on this rank but the model has {tuple(p.shape)} "
                f"(different model config?)"
            )
        out[name] = t
    return out


@torch.no_grad()
def load_pretrained(model, path: str) -> dict[str, Any]:
    """Copy weights from `path` (any layout or HF) into this rank's `model`; returns metadata.

    From a layout-free training checkpoint each rank reads only its own TP shards."""
    kind, d = resolve(path)
    if kind == "training" and int(read_meta(d).get("format_version", 1)) >= 2:
        meta = read_meta(d)
        _check_same_model(meta, model.cfg, path)
        local = _read_local_masters(model, d, meta)
    else:
        meta, full = read_weights(path)
        _check_same_model(meta, model.cfg, path)
        local = shard_for(model, full, model.groups.layout.tp_rank, model.groups.layout.tp)
        if getattr(model, "post_process", False) and not getattr(model, "pre_process", True):
            local["head_weight"] = shard(full["wte.weight"], 0, model.groups.layout.tp_rank, model.groups.layout.tp)
    for name, p in model.named_parameters():
        p.copy_(local[name].to(p.dtype))
    if "head_weight" in local:  # a pipeline's last stage: its copy of the tied embedding
        model.head_weight.copy_(local["head_weight"])
    return meta


def _check_same_model(meta: dict[str, Any], want, path: str) -> None:
    stored = meta.get("config", {}).get("model", {})
    for key in ("vocab_size", "n_embd", "n_layer", "n_head"):
        if key in stored and stored[key] != getattr(want, key):
            raise CheckpointError(
                f"{path}: model.{key}={stored[key]} but this run has model.{key}="
                f"{getattr(want, key)}; use the same model config (or another checkpoint)"
            )


def _read_local_masters(model, d: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """This rank's TP shard of each parameter it owns, read from the checkpoint's pieces."""

    index, tp_rank, tp_size = meta["tensors"], model.groups.layout.tp_rank, model.groups.layout.tp
    params = dict(model.named_parameters())
    wanted = list(params.items())
    if getattr(model, "post_process", False) and not getattr(model, "pre_process", True):
        wanted.append(("head_weight", model.head_weight))  # read as the matching shard of wte.weight
    check_model(index, params, tp_size, str(d / STATE_FILE))
    files, out = OpenFiles(d), {}
    try:
        for name, p in wanted:
            source = "wte.weight" if name == "head_weight" else name
            dim = 0 if name == "head_weight" else getattr(p, "tp_dim", None)
            tp = (tp_rank, tp_size) if dim is not None else (0, 1)
            flat = torch.empty(p.numel(), dtype=_dtype(index[source]["dtypes"][MASTER]))
            read_into(files, source, index[source], MASTER, tp, 0, flat)
            out[name] = flat.view(p.shape)
    finally:
        files.close()
    return out


def write_converted(
    full: dict[str, torch.Tensor],
    sharding: dict[str, list],
    meta: dict[str, Any],
    out_dir: str,
    tp: int,
    dtype: Optional[torch.dtype] = None,
) -> None:
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
    doc = {
        **{k: v for k, v in meta.items() if k not in ("sharding", "layout", "history")},
        "kind": CONVERTED_KIND,
        "layout": {"tp": tp},
        "sharding": sharding,
    }
    (out / STATE_FILE).write_text(json.dumps(doc, indent=1))
