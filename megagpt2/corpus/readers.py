"""Document readers for WebText-style scrapes: jsonl (plain or compressed), text files, tar archives.

Every input yields ``Record``s in a deterministic order (inputs as given, globs and directories
sorted). A record that cannot be read (bad JSON, a missing text field, a corrupt archive member or
compressed stream) comes back with ``error`` set and its location, so the caller counts and logs
it and carries on; nothing here raises on bad data. Invalid UTF-8 is not a reason to lose a
document: each invalid byte sequence becomes U+FFFD and ``Record.repaired`` counts them.

Supported inputs (compression by extension: .gz, .zst/.zstd, .xz/.lzma, .bz2):
    *.jsonl, *.json, *.ndjson   one JSON object per line, text under the requested keys
    *.txt                       one document per file
    directories                 every supported file below them, in sorted path order
    *.tar (and .tar.gz/.tgz/.tar.xz/...)   OpenWebText-style archives whose members are .xz files,
                                each an xz-compressed tar of .txt documents (or a single .txt);
                                plain .txt members are documents too
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import io
import json
import lzma
import os
import tarfile
from dataclasses import dataclass
from typing import IO, Iterator

import zstandard

_COMPRESSORS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".xz": "xz", ".lzma": "xz", ".bz2": "bz2"}
_JSON_EXTS = (".jsonl", ".json", ".ndjson")
_TAR_EXTS = (".tar", ".tgz", ".tar.gz", ".tar.xz", ".tar.bz2", ".tar.zst")
# Exceptions a damaged compressed stream raises while being read.
STREAM_ERRORS = (EOFError, OSError, lzma.LZMAError, zstandard.ZstdError, tarfile.TarError)


@dataclass
class Record:
    """One document (``fields``: key -> text) or one unreadable item (``error`` set)."""

    where: str  # "path:line", "path", or "archive.tar:member[:inner]"
    fields: dict[str, str] | None = None
    error: str | None = None
    nbytes: int = 0  # raw bytes consumed, for throughput figures
    repaired: int = 0  # invalid UTF-8 sequences replaced by U+FFFD


class InputPosition:
    """How far the readers are through their inputs, in bytes on disk (compressed bytes for
    compressed files), against the total size of the inputs: what a progress bar's ETA needs."""

    def __init__(self, paths: list[str]) -> None:
        self.total = sum(os.path.getsize(p) for p in paths)
        self._done = 0  # bytes of the files already finished
        self._raw: IO | None = None  # the raw file being read

    def _start(self, raw: IO) -> None:
        self._raw = raw

    def _finish(self, path: str) -> None:
        self._done += os.path.getsize(path)
        self._raw = None

    @property
    def bytes_read(self) -> int:
        raw = self._raw
        try:
            return self._done + (raw.tell() if raw is not None and not raw.closed else 0)
        except (OSError, ValueError):
            return self._done


def open_compressed(path: str, mode: str = "rb") -> IO:
    """Open ``path`` for reading or writing, (de)compressing by its extension."""
    kind = _COMPRESSORS.get(os.path.splitext(path)[1].lower())
    if kind == "gzip":
        return gzip.open(path, mode)
    if kind == "bz2":
        return bz2.open(path, mode)
    if kind == "xz":
        return lzma.open(path, mode)
    if kind == "zstd":
        stream = zstandard.open(path, mode)
        # The zstd reader has no readline; a buffer gives line iteration and large reads.
        return io.BufferedReader(stream, 1 << 20) if "r" in mode else stream
    return open(path, mode)


@contextlib.contextmanager
def _open_input(path: str, position: InputPosition | None) -> Iterator[IO]:
    """``open_compressed(path)`` for reading, reporting the raw file's offset to ``position``."""
    kind = _COMPRESSORS.get(os.path.splitext(path)[1].lower())
    with open(path, "rb") as raw:
        if position is not None:
            position._start(raw)
        if kind == "gzip":
            stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb")  # pyright: ignore[reportAssignmentType]
        elif kind == "bz2":
            stream = bz2.BZ2File(raw, "rb")
        elif kind == "xz":
            stream = lzma.LZMAFile(raw, "rb")
        elif kind == "zstd":
            stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), 1 << 20)
        else:
            stream = raw
        with stream:
            yield stream


def _base_name(path: str) -> str:
    """Name without a compression extension: 'a.jsonl.gz' -> 'a.jsonl'."""
    root, ext = os.path.splitext(path)
    return root if ext.lower() in _COMPRESSORS else path


def input_kind(path: str) -> str | None:
    """'tar', 'json', 'text' or None (unsupported) from the file name."""
    lower = path.lower()
    if lower.endswith(_TAR_EXTS):
        return "tar"
    base = _base_name(lower)
    if base.endswith(_JSON_EXTS):
        return "json"
    if base.endswith(".txt"):
        return "text"
    return None


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by ``patterns`` (paths, globs, directories), in a deterministic order.

    Raises ValueError when a pattern matches nothing or names an unsupported file, so a typo
    fails before any work is done. Unsupported files inside directories are skipped.
    """
    files: list[str] = []
    for pattern in patterns:
        matches = (
            sorted(glob.glob(pattern, recursive=True))
            if glob.has_magic(pattern)
            else ([pattern] if os.path.exists(pattern) else [])
        )
        if not matches:
            raise ValueError(f"input {pattern!r} matches no file or directory")
        for match in matches:
            if os.path.isdir(match):
                for root, dirs, names in os.walk(match):
                    dirs.sort()
                    files.extend(os.path.join(root, n) for n in sorted(names) if input_kind(n) is not None)
            elif input_kind(match) is None:
                raise ValueError(
                    f"input {match!r}: unsupported file type (expected .jsonl/.json/.ndjson, "
                    ".txt, .tar, optionally compressed with .gz/.zst/.xz/.bz2)"
                )
            else:
                files.append(match)
    return files


_REPLACEMENT = "\ufffd".encode()


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """(text, invalid sequences replaced): ``raw`` as UTF-8, each invalid sequence -> U+FFFD."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - raw.count(_REPLACEMENT)


def parse_json_line(line: bytes, keys: list[str], where: str) -> Record:
    """A Record from one jsonl line; the first key is required, the others default to ''."""
    text, repaired = decode_utf8(line)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return Record(where, error=f"invalid JSON: {err.msg} (column {err.colno})", nbytes=len(line))
    if not isinstance(obj, dict):
        return Record(where, error=f"JSON value is a {type(obj).__name__}, not an object", nbytes=len(line))
    fields = {}
    for i, key in enumerate(keys):
        value = obj.get(key)
        if not isinstance(value, str):
            if i == 0:
                found = "missing" if value is None else f"a {type(value).__name__}"
                return Record(where, error=f"field {key!r} is {found}, not a string", nbytes=len(line))
            value = ""
        fields[key] = value
    return Record(where, fields=fields, nbytes=len(line), repaired=repaired)


def _read_json(path: str, keys: list[str], position: InputPosition | None) -> Iterator[Record]:
    lineno = 0
    try:
        with _open_input(path, position) as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield parse_json_line(line, keys, f"{path}:{lineno}")
    except STREAM_ERRORS as err:
        yield Record(f"{path}:{lineno + 1}", error=f"unreadable file after line {lineno} ({type(err).__name__}: {err})")


def _text_record(raw: bytes, keys: list[str], where: str) -> Record:
    text, repaired = decode_utf8(raw)
    return Record(where, fields={keys[0]: text, **{k: "" for k in keys[1:]}}, nbytes=len(raw), repaired=repaired)


def _read_text(path: str, keys: list[str], position: InputPosition | None) -> Iterator[Record]:
    try:
        with _open_input(path, position) as f:
            raw = f.read()
    except STREAM_ERRORS as err:
        yield Record(path, error=f"unreadable file ({type(err).__name__}: {err})")
        return
    yield _text_record(raw, keys, path)


def _member_documents(payload: bytes, keys: list[str], where: str) -> Iterator[Record]:
    """Documents inside one decompressed archive member: a tar of .txt files, or one text."""
    if len(payload) >= 262 and payload[257:262] == b"ustar":
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:") as inner:
            for info in inner:
                if info.isfile() and info.name.endswith(".txt"):
                    raw = inner.extractfile(info).read()
                    yield _text_record(raw, keys, f"{where}:{info.name}")
    else:
        yield _text_record(payload, keys, where)


def _read_tar(path: str, keys: list[str], position: InputPosition | None) -> Iterator[Record]:
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as archive:
            if position is not None:
                position._start(raw)
            for info in archive:
                if not info.isfile():
                    continue
                where = f"{path}:{info.name}"
                name = info.name.lower()
                try:
                    data = archive.extractfile(info).read()
                    if name.endswith((".xz", ".lzma")):
                        data = lzma.decompress(data)
                    elif not name.endswith(".txt"):
                        continue
                    # Materialise so that a corrupt inner tar fails here, inside the try.
                    records = list(_member_documents(data, keys, where))
                except STREAM_ERRORS as err:
                    yield Record(
                        where, error=f"unreadable archive member ({type(err).__name__}: {err})", nbytes=info.size
                    )
                    continue
                yield from records
    except STREAM_ERRORS as err:
        yield Record(path, error=f"unreadable archive ({type(err).__name__}: {err})")


def iter_records(paths: list[str], keys: list[str], position: InputPosition | None = None) -> Iterator[Record]:
    """Records of every file in ``paths`` (from ``expand_inputs``), in order; ``position``, when
    given, follows the bytes read."""
    readers = {"json": _read_json, "text": _read_text, "tar": _read_tar}
    for path in paths:
        yield from readers[input_kind(path)](path, keys, position)
        if position is not None:
            position._finish(path)
