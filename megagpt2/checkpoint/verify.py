"""Checking a checkpoint before trusting it, and choosing the newest one that checks out.

A checkpoint's COMPLETE marker (written last) records every file with its size and CRC-32.
`verify` checks that each file exists with that size (and, with mode "checksum", that CRC), that
megagpt2.json parses and its index tiles every tensor, and that each tensor file's header holds
what the index says. The files are shared out over the ranks, so each reads 1/world of the bytes.
Checkpoints of the first format (DeepSpeed .pt files, an empty COMPLETE) are checked for every
file their layout implies and, with "checksum", for the CRC-32s torch's zip container records.

A problem is a message naming the file and the cause; `choose` walks from the newest complete
checkpoint back to the newest one without a problem (or stops at the first, when told to).
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from .files import CheckpointError, file_crc32, read_header
from .index import header_problem, index_problem, pieces_by_file

STATE_FILE = "megagpt2.json"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _first(problem: Optional[str]) -> Optional[str]:
    """The first problem over all ranks (in rank order), on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return problem
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, problem)
    return next((p for p in found if p), None)


def read_meta(path: Path) -> dict:
    """megagpt2.json of a checkpoint, or a CheckpointError naming the file and the cause."""
    f = path / STATE_FILE
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{f} is damaged or truncated (not valid JSON: {e})") from None


def verify(path: Path, mode: str = "checksum") -> Optional[str]:
    """Collective when torch.distributed is initialised: the first problem of checkpoint `path`."""
    rank, world = _rank_world()
    try:
        problem = _verify_share(path, mode, rank, world)
    except CheckpointError as e:
        problem = str(e)
    except OSError as e:
        problem = f"{path}: {e}"
    return _first(problem)


def _verify_share(path: Path, mode: str, rank: int, world: int) -> Optional[str]:
    text = (path / "COMPLETE").read_text() if (path / "COMPLETE").is_file() else None
    if text is None:
        return f"{path / 'COMPLETE'} is missing (the save was interrupted)"
    if not text.strip():
        if int(read_meta(path).get("format_version", 1)) >= 2:
            return f"{path / 'COMPLETE'} is empty but {STATE_FILE} is of the layout-free format (damaged)"
        return _verify_legacy(path, mode, rank, world)
    try:
        files = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{path / 'COMPLETE'} is damaged ({e})"
    meta = read_meta(path) if (path / STATE_FILE).is_file() and files.get(STATE_FILE) else None
    if rank == 0:
        problem = _check_listing(path, files, meta)
        if problem:
            return problem
    by_file = pieces_by_file(meta.get("tensors", {})) if meta else {}
    for i, (rel, rec) in enumerate(sorted(files.items())):
        if i % world == rank:
            problem = _check_file(path, rel, rec, mode, by_file.get(rel) if meta else None)
            if problem:
                return problem
    return None


def _check_listing(path: Path, files: dict, meta: Optional[dict]) -> Optional[str]:
    """Everything the metadata refers to is listed in COMPLETE (so it gets checked)."""
    if STATE_FILE not in files:
        return f"{path / 'COMPLETE'} does not list {STATE_FILE}"
    if meta is None or not (path / STATE_FILE).is_file():
        return f"{path / STATE_FILE} is missing"
    world = int(meta.get("layout", {}).get("world_size", 0))
    for r in range(world):
        rel = f"rng/rank_{r:05d}.safetensors"
        if rel not in files:
            return f"{path / rel} is missing (random state of rank {r})"
    index = meta.get("tensors", {})
    for name, entry in index.items():
        for q in entry.get("pieces", []):
            if q["file"] not in files:
                return f"{path / q['file']} is missing (holds tensor {name})"
    problem = index_problem(index)
    return f"{path / STATE_FILE}: {problem}" if problem else None


def _check_file(path: Path, rel: str, rec: dict, mode: str, pieces: Optional[list]) -> Optional[str]:
    """`pieces`: what the index says this tensor file holds (None for other files)."""
    f = path / rel
    if not f.is_file():
        return f"{f} is missing"
    size = f.stat().st_size
    if size != rec["bytes"]:
        return f"{f}: {size} bytes but {rec['bytes']} were written (truncated or damaged){_cut_tensor(f)}"
    if pieces is not None:
        problem = header_problem(rel, read_header(f), pieces, size - _data_start(f))
        if problem:
            return f"{path}/{problem}"
    if mode == "checksum" and file_crc32(f) != rec["crc32"]:
        return f"{f}: checksum mismatch (the file changed after it was written: damaged)"
    return None


def _data_start(f: Path) -> int:
    """Byte offset of the first tensor in a safetensors file (after the length and the header)."""
    with open(f, "rb") as fh:
        raw = fh.read(8)
    return 8 + struct.unpack("<Q", raw)[0] if len(raw) == 8 else 8


def _cut_tensor(f: Path) -> str:
    """ "; tensor X is cut short" for a truncated tensor file whose header survived."""
    if not f.name.endswith(".safetensors"):
        return ""
    try:
        header = read_header(f)
        data = f.stat().st_size - _data_start(f)
    except CheckpointError:
        return " (its header is gone too)"
    for key, h in header.items():
        if key != "__metadata__" and h["data_offsets"][1] > data:
            return f"; tensor {key} is cut short"
    return ""


# -- the first format (DeepSpeed files) --------------------------------------------------------
def _verify_legacy(path: Path, mode: str, rank: int, world: int) -> Optional[str]:
    meta = read_meta(path)
    layout = meta.get("layout") or {}
    tp, pp, dp = (int(layout.get(k, 1)) for k in ("tp", "pp", "dp"))
    expected = [f"mp_rank_{m:02d}_model_states.pt" for m in range(tp * pp)]
    if list(path.glob("*_optim_states.pt")):
        expected += [f"zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt" for d in range(dp) for m in range(tp * pp)]
    expected += [f"rng/rank_{r:05d}.safetensors" for r in range(tp * pp * dp)]
    for i, rel in enumerate(expected):
        f = path / rel
        if not f.is_file():
            return f"{f} is missing"
        if mode == "checksum" and rel.endswith(".pt") and i % world == rank:
            try:
                with zipfile.ZipFile(f) as z:
                    bad = z.testzip()
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                return f"{f} is damaged or truncated ({e})"
            if bad is not None:
                return f"{f} is damaged: record {bad} fails its CRC-32"
    return None


# -- choosing a checkpoint ------------------------------------------------------------------
def choose(
    root: Path,
    tags: list[str],
    tag: Optional[str],
    fallback: bool,
    mode: str,
    log: Callable[[str], None],
    skipped: Optional[list[str]] = None,
) -> Optional[str]:
    """The tag to resume from: `tag` if given (it must verify), else the newest complete one that
    verifies; the damaged newer ones are appended to `skipped`. `tags` are the complete tags,
    oldest first. Collective (every rank calls it)."""
    if tag is not None:
        problem = verify(root / tag, mode)
        if problem:
            raise CheckpointError(f"checkpoint.tag={tag}: {problem}. {_older_hint(tags, tag)}")
        return tag
    skipped = [] if skipped is None else skipped
    for t in reversed(tags):
        problem = verify(root / t, mode)
        if problem is None:
            if skipped:
                log(f"resuming from {root / t}, the newest checkpoint that verifies")
            return t
        if not fallback:
            raise CheckpointError(
                f"checkpoint {root / t} is damaged: {problem}. {_older_hint(tags, t)}, or set "
                f"checkpoint.fallback=true to resume from the newest checkpoint that verifies"
            )
        log(f"warning: checkpoint {root / t} is damaged: {problem}; trying the previous one")
        skipped.append(t)
    if skipped:
        raise CheckpointError(
            f"no checkpoint in {root} verifies (damaged: {', '.join(skipped)}); move them aside to "
            f"start over, or fix the files named above"
        )
    return None


def _older_hint(tags: list[str], tag: str) -> str:
    older = [t for t in tags if t < tag]
    if older:
        return f"Resume from the previous checkpoint with --checkpoint.tag={older[-1]}"
    return "No older checkpoint exists; move it aside to start over"
