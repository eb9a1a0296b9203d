"""Document readers for WebText-style scrapes: jsonl (plain or compressed), text files, tar archives.

Every input yields ``Record``s in a deterministic order (inputs as given, globs and directories
sorted). A record that cannot be read (bad JSON, bad UTF-8, a missing text field, a corrupt
archive member or compressed stream) comes back with ``error`` set and its location, so the caller
counts and logs it and carries on; nothing here raises on bad data.

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

_COMPRESSORS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".xz": "xz", ".lzma": "xz",
                ".bz2": "bz2"}
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
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else (
            [pattern] if os.path.exists(pattern) else [])
        if not matches:
            raise ValueError(f"input {pattern!r} matches no file or directory")
        for match in matches:
            if os.path.isdir(match):
                for root, dirs, names in os.walk(match):
                    dirs.sort()
                    files.extend(os.path.join(root, n) for n in sorted(names)
                                 if input_kind(n) is not None)
            elif input_kind(match) is None:
                raise ValueError(
                    f"input {match!r}: unsupported file type (expected .jsonl/.json/.ndjson, "
                    ".txt, .tar, optionally compressed with .gz/.zst/.xz/.bz2)"
                )
            else:
                files.append(match)
    return files


def _decode(raw: bytes) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return None, f"bad UTF-8 at byte {err.start}"


def parse_json_line(line: bytes, keys: list[str], where: str) -> Record:
    """A Record from one jsonl line; the first key is required, the others default to ''."""
    text, error = _decode(line)
    if error:
        return Record(where, error=error, nbytes=len(line))
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return Record(where, error=f"invalid JSON: {err.msg} (column {err.colno})",
                      nbytes=len(line))
    if not isinstance(obj, dict):
        return Record(where, error=f"JSON value is a {type(obj).__name__}, not an object",
                      nbytes=len(line))
    fields = {}
    for i, key in enumerate(keys):
        value = obj.get(key)
        if not isinstance(value, str):
            if i == 0:
                found = "missing" if value is None else f"a {type(value).__name__}"
                return Record(where, error=f"field {key!r} is {found}, not a string",
                              nbytes=len(line))
            value = ""
        fields[key] = value
    return Record(where, fields=fields, nbytes=len(line))


def _read_json(path: str, keys: list[str]) -> Iterator[Record]:
    lineno = 0
    try:
        with open_compressed(path) as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield parse_json_line(line, keys, f"{path}:{lineno}")
    except STREAM_ERRORS as err:
        yield Record(f"{path}:{lineno + 1}",
                     error=f"unreadable file after line {lineno} ({type(err).__name__}: {err})")


def _text_record(raw: bytes, keys: list[str], where: str) -> Record:
    text, error = _decode(raw)
    if error:
        return Record(where, error=error, nbytes=len(raw))
    return Record(where, fields={keys[0]: text, **{k: "" for k in keys[1:]}}, nbytes=len(raw))


def _read_text(path: str, keys: list[str]) -> Iterator[Record]:
    try:
        with open_compressed(path) as f:
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


def _read_tar(path: str, keys: list[str]) -> Iterator[Record]:
    try:
        with tarfile.open(path, mode="r|*") as archive:
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
                    yield Record(where, error=f"unreadable archive member "
                                 f"({type(err).__name__}: {err})", nbytes=info.size)
                    continue
                yield from records
    except STREAM_ERRORS as err:
        yield Record(path, error=f"unreadable archive ({type(err).__name__}: {err})")


def iter_records(paths: list[str], keys: list[str]) -> Iterator[Record]:
    """Records of every file in ``paths`` (from ``expand_inputs``), in order."""
    readers = {"json": _read_json, "text": _read_text, "tar": _read_tar}
    for path in paths:
        yield from readers[input_kind(path)](path, keys)
