"""The files of a checkpoint: safetensors written with a running CRC-32, JSON, free-space checks.

Tensor files are standard safetensors (any safetensors reader opens them; a test checks the
library does). We write and read them ourselves: `safetensors.torch.save_file` first copies every
tensor into a Python bytes object, and its reader copies each slice out of the map before we copy
it again. Here each tensor's memory goes straight to the file while a second thread computes the
CRC-32 that the COMPLETE marker records (zlib releases the GIL, so the checksum costs little wall
time), and a load copies each needed slice once, from the memory-mapped file to where it belongs.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import queue
import struct
import threading
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Optional

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, incomplete, or does not fit the model being trained."""


DTYPE_CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
_CHUNK = 16 << 20  # bytes handed to the writer and the checksum thread at a time


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is a contiguous CPU tensor."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")  # pyright: ignore[reportArgumentType]  (numpy buffers)


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> bytes:
    """The 8-byte length and the JSON header (padded to 8 bytes) of a safetensors file."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in DTYPE_CODES:
            raise CheckpointError(f"tensor {name}: dtype {t.dtype} cannot be stored in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def file_bytes(tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> int:
    """Size on disk of the safetensors file `write_safetensors` would write."""
    return len(safetensors_header(tensors, metadata)) + sum(t.numel() * t.element_size() for t in tensors.values())


class _Crc:
    """CRC-32 of a byte stream computed on a second thread, in order."""

    def __init__(self):
        self.value = 0
        self._q: queue.Queue = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._q.get()) is not None:
            self.value = zlib.crc32(chunk, self.value)

    def add(self, chunk: memoryview) -> None:
        self._q.put(chunk)

    def result(self) -> int:
        self._q.put(None)
        self._thread.join()
        return self.value


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None
) -> dict[str, Any]:
    """Write `tensors` (in order) as a safetensors file; return its record {"bytes", "crc32"}.

    An OSError (a full disk above all) propagates with the file named; the caller removes the
    partial checkpoint."""
    crc = _Crc()
    size = 0
    try:
        with open(path, "wb") as f:
            header = memoryview(safetensors_header(tensors, metadata))
            for chunk in _chunks(itertools.chain([header], (_as_bytes(t) for t in tensors.values()))):
                f.write(chunk)
                crc.add(chunk)
                size += len(chunk)
    finally:
        value = crc.result()
    return {"bytes": size, "crc32": value}


def _chunks(buffers: Iterable[memoryview]) -> Iterable[memoryview]:
    for b in buffers:
        for start in range(0, len(b), _CHUNK):
            yield b[start : start + _CHUNK]


def write_text(path: Path, text: str, atomic: bool = True) -> dict[str, Any]:
    """Write `text` (fsynced; through a temporary file and a rename when atomic); return its record."""
    data = text.encode()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}") if atomic else path
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if atomic:
        os.replace(tmp, path)
    return {"bytes": len(data), "crc32": zlib.crc32(data)}


def file_crc32(path: Path) -> int:
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (raises CheckpointError naming the file)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: {len(raw)} bytes, too short for a safetensors file (truncated)")
            (n,) = struct.unpack("<Q", raw)
            if n > 1 << 30:
                raise CheckpointError(f"{path}: header length {n} is not plausible (damaged file)")
            text = f.read(n)
        if len(text) < n:
            raise CheckpointError(f"{path}: header cut short at {len(text)} of {n} bytes (truncated)")
        return json.loads(text)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None


class OpenFiles:
    """Memory-mapped safetensors files of one checkpoint, opened on first use and kept (the least
    recently used beyond `limit` are dropped, so a checkpoint of thousands of ranks does not
    exhaust file handles). `read` returns a view of the mapped bytes: the caller copies it
    wherever it belongs, the only copy a load makes."""

    def __init__(self, root: Path, limit: int = 64):
        self.root, self.limit = root, limit
        self._open: OrderedDict[str, tuple[Any, dict, int]] = OrderedDict()

    def _get(self, relpath: str) -> tuple[Any, dict, int]:
        import mmap

        if relpath in self._open:
            self._open.move_to_end(relpath)
            return self._open[relpath]
        path = self.root / relpath
        header = read_header(path)
        try:
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot map ({e})") from None
        entry = (mapped, header, 8 + struct.unpack("<Q", mapped[:8])[0])
        self._open[relpath] = entry
        if len(self._open) > self.limit:
            self._open.popitem(last=False)  # unmapped once no view of it is left
        return entry

    def read(self, relpath: str, key: str, start: int, stop: int) -> torch.Tensor:
        """A read-only view of elements [start, stop) of the 1-D tensor `key` in file `relpath`."""
        import warnings

        mapped, header, data_start = self._get(relpath)
        h = header.get(key)
        if h is None:
            raise CheckpointError(f"{self.root / relpath}: no tensor {key} in the file")
        dtype = CODE_DTYPES.get(h["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.root / relpath}: tensor {key} has unknown dtype {h['dtype']}")
        size = torch.empty((), dtype=dtype).element_size()
        first, last = h["data_offsets"]
        offset = data_start + first + start * size
        if not 0 <= start <= stop <= (last - first) // size or data_start + last > len(mapped):
            raise CheckpointError(
                f"{self.root / relpath}: tensor {key} does not hold elements [{start}, {stop}) "
                f"(truncated or damaged file)"
            )
        if stop == start:
            return torch.empty(0, dtype=dtype)
        with warnings.catch_warnings():  # the view is only ever read
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.frombuffer(mapped, dtype=dtype, count=stop - start, offset=offset)

    def close(self) -> None:
        self._open.clear()  # each map closes when the last view of it goes


# -- disk space ------------------------------------------------------------------------------
def free_bytes(directory: Path) -> Optional[int]:
    """Bytes an unprivileged writer may still use on directory's filesystem (None if unknown)."""
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    if st.f_blocks == 0:  # the filesystem does not say (some FUSE and network mounts)
        return None
    return st.f_bavail * st.f_frsize


def filesystem_id(directory: Path) -> str:
    """Identifies the filesystem (host and device) so ranks writing to the same one add up."""
    import socket

    try:
        dev = os.stat(directory).st_dev
    except OSError:
        dev = -1
    return f"{socket.gethostname()}:{dev}"


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
