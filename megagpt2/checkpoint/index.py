"""The tensor index of a checkpoint: every tensor's global shape, split and which file holds which slice.

In megagpt2.json, under "tensors":

    "h.0.attn.c_attn.weight": {
        "shape": [96, 32], "tp_dim": 0, "tp_stride": 3, "step": 4,
        "keys": ["exp_avg", "exp_avg_sq", "master"], "dtypes": {"master": "float32", ...},
        "pieces": [{"file": "tensors/rank_00000.safetensors", "tp": [0, 2], "flat": [0, 768]}, ...]}

A piece holds elements [flat[0], flat[0] + flat[1]) of the flattened TP shard tp[0] of tp[1]
(geometry.py) for every key, as 1-D tensors named "<tensor>/<key>" in its file. The pieces of a
tensor tile each of its TP shards exactly once; `index_problem` checks that.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch

from .files import CheckpointError, OpenFiles
from .geometry import check_split, copy_runs, intersect, shard_runs

_SAME = ("shape", "tp_dim", "tp_stride", "keys")


def build_index(per_rank: Iterable[tuple[Optional[str], list[dict]]]) -> dict[str, dict[str, Any]]:
    """Merge every rank's slice list (Slice.meta()) into the index; raise on a writer bug."""
    index: dict[str, dict[str, Any]] = {}
    for file, metas in per_rank:
        for m in metas:
            entry = {
                "shape": m["shape"],
                "tp_dim": m["dim"],
                "tp_stride": m["stride"],
                "keys": sorted(m["keys"]),
                "dtypes": m["dtype"],
                "step": m["step"],
                "pieces": [],
            }
            have = index.setdefault(m["name"], entry)
            for k in _SAME:
                if have[k] != entry[k]:
                    raise CheckpointError(f"tensor {m['name']}: ranks disagree on {k} ({have[k]} vs {entry[k]})")
            have["step"] = max(have["step"], m["step"])
            have["pieces"].append({"file": file, "tp": m["tp"], "flat": [m["start"], m["numel"]]})
    for name, entry in index.items():
        entry["pieces"].sort(key=lambda q: (q["tp"][0], q["flat"][0]))
        problem = coverage_problem(name, entry)
        if problem:
            raise CheckpointError(f"refusing to write an inconsistent checkpoint: {problem}")
    return dict(sorted(index.items()))


def coverage_problem(name: str, entry: dict[str, Any]) -> Optional[str]:
    """Why the pieces of `entry` do not tile every TP shard exactly once, or None."""
    pieces = entry.get("pieces") or []
    shape = entry.get("shape")
    if not pieces or not isinstance(shape, list):
        return f"tensor {name}: no pieces or no shape in the index"
    sizes = {tuple(q["tp"])[1] for q in pieces}
    if len(sizes) != 1:
        return f"tensor {name}: pieces come from different TP sizes {sorted(sizes)}"
    T = sizes.pop()
    bad = check_split(shape, entry.get("tp_dim"), entry.get("tp_stride", 1), T)
    if bad:
        return f"tensor {name}: {bad}"
    shard_numel = math.prod(shape) // T
    for t in range(T):
        ranges = sorted((q["flat"][0], q["flat"][0] + q["flat"][1], q["file"]) for q in pieces if q["tp"][0] == t)
        pos, last_file = 0, None
        for a, b, f in ranges:
            if a > pos:
                return f"tensor {name}: elements [{pos}, {a}) of TP shard {t}/{T} are in no file (missing slice)"
            if a < pos:
                return (
                    f"tensor {name}: elements [{a}, {min(b, pos)}) of TP shard {t}/{T} are in both {last_file} and {f}"
                )
            pos, last_file = b, f
        if pos != shard_numel:
            return f"tensor {name}: elements [{pos}, {shard_numel}) of TP shard {t}/{T} are in no file (missing slice)"
    return None


def index_problem(index: dict[str, dict[str, Any]]) -> Optional[str]:
    for name, entry in index.items():
        problem = coverage_problem(name, entry)
        if problem:
            return problem
    return None


def pieces_by_file(index: dict[str, dict[str, Any]]) -> dict[str, list[tuple[str, dict, dict]]]:
    """{file: [(tensor name, index entry, piece), ...]}: what each tensor file should hold."""
    out: dict[str, list] = {}
    for name, entry in index.items():
        for q in entry.get("pieces", []):
            out.setdefault(q["file"], []).append((name, entry, q))
    return out


def header_problem(
    relpath: str, header: dict[str, Any], pieces: list[tuple[str, dict, dict]], data_bytes: int
) -> Optional[str]:
    """Whether the safetensors header of `relpath` holds the `pieces` the index puts there."""
    from .files import DTYPE_CODES

    codes = {str(k).replace("torch.", ""): v for k, v in DTYPE_CODES.items()}
    for name, entry, q in pieces:
        for key in entry["keys"]:
            h = header.get(f"{name}/{key}")
            if h is None:
                return f"{relpath}: tensor {name} ({key}) is listed in the index but not in the file"
            if h.get("shape") != [q["flat"][1]] or h.get("dtype") != codes.get(entry["dtypes"].get(key)):
                return (
                    f"{relpath}: tensor {name} ({key}) is {h.get('dtype')} {h.get('shape')} in the file but "
                    f"{entry['dtypes'].get(key)} [{q['flat'][1]}] in the index"
                )
            if h["data_offsets"][1] > data_bytes:
                return (
                    f"{relpath}: tensor {name} ({key}) ends at byte {h['data_offsets'][1]} of the data but the "
                    f"file holds {data_bytes} (truncated)"
                )
    return None


def check_model(index: dict[str, dict[str, Any]], params: dict[str, torch.Tensor], tp_size: int, where: str) -> None:
    """Fail naming the first of this rank's parameters the checkpoint cannot provide."""
    from .engine_state import split_of

    for name, p in params.items():
        entry = index.get(name)
        if entry is None:
            raise CheckpointError(f"{where}: tensor {name} is missing from the checkpoint (different model shape?)")
        shape, dim, stride, _ = split_of(p, 0, tp_size)
        if tuple(entry["shape"]) != shape:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {tuple(entry['shape'])} in the checkpoint but "
                f"{shape} in the model (model config differs)"
            )
        if (entry["tp_dim"], entry["tp_stride"]) != (dim, stride):
            raise CheckpointError(
                f"{where}: tensor {name} is split as (dim {entry['tp_dim']}, stride "
                f"{entry['tp_stride']}) in the checkpoint but (dim {dim}, stride {stride}) in the "
                f"model"
            )
        bad = check_split(shape, dim, stride, tp_size)
        if bad:
            raise CheckpointError(f"{where}: tensor {name} cannot be split over tp={tp_size}: {bad}")


def read_into(
    files: OpenFiles, name: str, entry: dict[str, Any], key: str, tp: tuple[int, int], start: int, dest: torch.Tensor
) -> None:
    """Fill `dest` (1-D) with elements [start, start + len(dest)) of TP shard `tp` of tensor `name`,
    reading only the overlapping parts of the stored pieces."""
    shape, dim, stride = entry["shape"], entry["tp_dim"], entry["tp_stride"]
    need = shard_runs(shape, dim, stride, tp[0], tp[1], start, dest.numel())
    filled = 0
    for q in entry["pieces"]:
        qt, qs, qn = q["tp"][0], q["flat"][0], q["flat"][1]
        if tuple(q["tp"]) == tuple(tp) or dim is None:  # same shard: plain flat ranges
            lo, hi = max(start, qs), min(start + dest.numel(), qs + qn)
            if lo >= hi:
                continue
            dest[lo - start : hi - start].copy_(files.read(q["file"], f"{name}/{key}", lo - qs, hi - qs))
            filled += hi - lo
            continue
        d_off, s_off, length = intersect(need, shard_runs(shape, dim, stride, qt, q["tp"][1], qs, qn))
        if not len(length):
            continue
        lo, hi = int(s_off.min()), int((s_off + length).max())
        src = files.read(q["file"], f"{name}/{key}", lo, hi)
        copy_runs(dest, src, d_off, s_off - lo, length)
        filled += int(length.sum())
    if filled != dest.numel():
        raise CheckpointError(
            f"{files.root}: tensor {name} ({key}): the pieces hold {filled} of the {dest.numel()} "
            f"elements this rank needs (missing slice in megagpt2.json)"
        )
