"""Memory-mapped token datasets in Megatron-LM's MMIDIDX format (``prefix.bin`` + ``prefix.idx``).

The ``.bin`` file is every sequence's tokens back to back, nothing else. The ``.idx`` file is:

    offset  type            field
    0       9 bytes         magic  b"MMIDIDX\\x00\\x00"
    9       <Q              version (1)
    17      <B              dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                            7 float32, 8 uint16)
    18      <Q              N = number of sequences
    26      <Q              M = number of entries of doc_idx (documents + 1)
    34      int32[N]        sizes: tokens per sequence
    ..      int64[N]        pointers: byte offset of each sequence in .bin
    ..      int64[M]        doc_idx: 0, then the sequence index one past each document's end

This is byte-for-byte what Megatron-LM and GPT-NeoX write, so files move freely between them.
A sequence is the unit the GPT dataset stitches; preprocessing writes one sequence per document.
"""

from __future__ import annotations

import os
import shutil
import struct
from typing import Callable, Optional, Sequence

import numpy as np
import numpy.typing as npt

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): code for code, t in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair is missing, corrupt or inconsistent; the message names the file."""


def dtype_for_vocab(vocab_size: int) -> type:
    """Smallest token dtype Megatron uses for a vocabulary: uint16 below 65,500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def dtype_code(dtype) -> int:
    """MMIDIDX code of a numpy dtype (raises for dtypes the format cannot store)."""
    try:
        return _CODE_OF[np.dtype(dtype)]
    except KeyError:
        raise IndexedDatasetError(f"dtype {np.dtype(dtype)} cannot be stored in MMIDIDX") from None


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def write_index(path: str, dtype, sizes: Sequence[int] | np.ndarray, doc_idx: Sequence[int] | np.ndarray) -> None:
    """Write an ``.idx`` file for ``sizes`` (tokens per sequence) and ``doc_idx`` at ``path``."""
    sizes = np.asarray(sizes, dtype=np.int32)
    doc_idx = np.asarray(doc_idx, dtype=np.int64)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])  # exclusive prefix sum
    pointers *= itemsize
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", dtype_code(dtype)))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(sizes.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc_idx.tobytes(order="C"))


class IndexedDatasetBuilder:
    """Appends token sequences to ``bin_path`` and writes the matching ``.idx`` on ``finalize``.

    Both files are written under temporary names (``<name>.tmp-<pid>``) and renamed into place
    only by ``finalize``, so an interrupted run never leaves a pair that looks complete. Call
    ``abort()`` (or use the builder as a context manager) to delete the temporary files on error.
    """

    def __init__(self, bin_path: str, dtype: npt.DTypeLike = np.uint16) -> None:
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # fail early on an unsupported dtype
        self._tmp_bin = f"{bin_path}.tmp-{os.getpid()}"
        self._file = open(self._tmp_bin, "wb")
        self._sizes: list[int] = []
        self._doc_idx: list[int] = [0]

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one sequence (the document stays open; see ``end_document``)."""
        array = np.asarray(tokens, dtype=self.dtype)
        self._file.write(array.tobytes(order="C"))
        self._sizes.append(int(array.size))

    def end_document(self) -> None:
        """Close the current document after the sequences added since the last one."""
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one document made of a single sequence."""
        self.add_item(tokens)
        self.end_document()

    def add_documents(self, flat_tokens: np.ndarray, lengths: Sequence[int] | np.ndarray) -> None:
        """Append many single-sequence documents given as one flat array and their lengths."""
        lengths = np.asarray(lengths, dtype=np.int64)
        flat = np.asarray(flat_tokens, dtype=self.dtype)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {flat.size} tokens given")
        self._file.write(flat.tobytes(order="C"))
        start = len(self._sizes)
        self._sizes.extend(lengths.tolist())
        self._doc_idx.extend(range(start + 1, start + 1 + len(lengths)))

    def add_index(self, prefix: str) -> None:
        """Append every sequence and document of the dataset at ``prefix`` (for merging)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{index_file_path(prefix)}: dtype {other.dtype} differs from the output's "
                f"{self.dtype}; datasets made with different tokenizers cannot be merged"
            )
        offset = len(self._sizes)
        self._sizes.extend(other.sizes.tolist())
        self._doc_idx.extend((other.doc_idx[1:] + offset).tolist())
        self._file.flush()
        with open(data_file_path(prefix), "rb") as src:
            shutil.copyfileobj(src, self._file, length=16 << 20)

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    def finalize(self, idx_path: str, before_rename: Optional[Callable[[], None]] = None) -> None:
        """Write the index and move both files to their final names (bin first, idx last).

        ``before_rename`` runs once no complete dataset exists under the name (the old .idx is
        gone, the new one not yet there): the moment to swap files that belong with the tokens,
        such as the tokenizer sidecar.
        """
        self._file.close()
        tmp_idx = f"{idx_path}.tmp-{os.getpid()}"
        write_index(tmp_idx, self.dtype, np.array(self._sizes, dtype=np.int32), self._doc_idx)
        # An old .idx next to the new .bin would describe the wrong tokens: remove it first.
        if os.path.exists(idx_path):
            os.remove(idx_path)
        if before_rename is not None:
            try:
                before_rename()
            except BaseException:
                os.remove(tmp_idx)
                raise
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(tmp_idx, idx_path)

    def abort(self) -> None:
        """Close and delete the temporary file (the final names are never touched)."""
        self._file.close()
        if os.path.exists(self._tmp_bin):
            os.remove(self._tmp_bin)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _read_header(path: str, buffer: np.ndarray) -> tuple[type, int, int]:
    """Validate the fixed header of an ``.idx`` file; return (dtype, sequences, doc_idx entries)."""
    if buffer.size < HEADER_BYTES:
        raise IndexedDatasetError(
            f"{path}: file is {buffer.size} bytes, shorter than the {HEADER_BYTES}-byte header "
            "(truncated or not an MMIDIDX index)"
        )
    head = buffer[:HEADER_BYTES].tobytes()
    if head[:9] != MAGIC:
        raise IndexedDatasetError(
            f"{path}: bad magic {head[:9]!r}, expected {MAGIC!r} (not a Megatron MMIDIDX index; "
            "re-run tools/preprocess_data.py)"
        )
    (version,) = struct.unpack("<Q", head[9:17])
    if version != VERSION:
        raise IndexedDatasetError(f"{path}: unsupported index version {version}, expected {VERSION}")
    (code,) = struct.unpack("<B", head[17:18])
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(f"{path}: unknown dtype code {code} (valid: 1..8)")
    num_seqs, num_docs = struct.unpack("<QQ", head[18:34])
    expected = HEADER_BYTES + num_seqs * 12 + num_docs * 8
    if buffer.size != expected:
        raise IndexedDatasetError(
            f"{path}: file is {buffer.size} bytes but its header ({num_seqs} sequences, "
            f"{num_docs} document-index entries) needs {expected} bytes (truncated or corrupt)"
        )
    return DTYPE_CODES[code], int(num_seqs), int(num_docs)


class IndexedDataset:
    """Read-only view of ``prefix.bin``/``prefix.idx``, memory-mapped (nothing is loaded eagerly).

    ``ds[i]`` is sequence ``i`` as a numpy array; ``ds.get(i, offset, length)`` a slice of it.
    Opening checks the header and that sizes, pointers, document index and ``.bin`` length agree,
    so a truncated or mismatched pair fails here, not in the middle of training.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise IndexedDatasetError(
                    f"{path}: not found (data prefix {prefix!r}; give the path without .bin/.idx, "
                    "as written by tools/preprocess_data.py)"
                )
        raw = np.memmap(idx_path, dtype=np.uint8, mode="r") if os.path.getsize(idx_path) else (
            np.zeros(0, dtype=np.uint8))
        self.dtype, num_seqs, num_docs = _read_header(idx_path, raw)
        offset = HEADER_BYTES
        self.sizes = np.frombuffer(raw, dtype=np.int32, count=num_seqs, offset=offset)
        offset += num_seqs * 4
        self.pointers = np.frombuffer(raw, dtype=np.int64, count=num_seqs, offset=offset)
        offset += num_seqs * 8
        self.doc_idx = np.frombuffer(raw, dtype=np.int64, count=num_docs, offset=offset)
        self._check_index(idx_path)
        bin_bytes = os.path.getsize(bin_path)
        itemsize = np.dtype(self.dtype).itemsize
        expected = int(self.sizes.sum(dtype=np.int64)) * itemsize
        if bin_bytes != expected:
            raise IndexedDatasetError(
                f"{bin_path}: file is {bin_bytes} bytes but {idx_path} describes {expected} bytes "
                f"({expected // itemsize} tokens of {np.dtype(self.dtype)}); the pair is truncated "
                "or the two files come from different runs"
            )
        self._bin = (np.memmap(bin_path, dtype=self.dtype, mode="r") if bin_bytes
                     else np.zeros(0, dtype=self.dtype))

    def __getstate__(self) -> dict:
        # Pickling a memmap copies its data; data-loader workers started with spawn reopen
        # the files by prefix instead.
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def _check_index(self, idx_path: str) -> None:
        """Vectorised consistency checks of sizes, pointers and doc_idx."""
        if (self.sizes < 0).any():
            raise IndexedDatasetError(f"{idx_path}: negative sequence length (corrupt index)")
        itemsize = np.dtype(self.dtype).itemsize
        expected = np.zeros(len(self.sizes), dtype=np.int64)
        np.cumsum(self.sizes[:-1], dtype=np.int64, out=expected[1:])
        if not np.array_equal(self.pointers, expected * itemsize):
            raise IndexedDatasetError(
                f"{idx_path}: sequence pointers do not match the sequence lengths (corrupt index)"
            )
        d = self.doc_idx
        if d.size == 0 or d[0] != 0 or d[-1] != len(self.sizes) or (np.diff(d) < 0).any():
            raise IndexedDatasetError(
                f"{idx_path}: document index must start at 0, never decrease and end at the "
                f"number of sequences ({len(self.sizes)}) (corrupt index)"
            )

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset .. offset+length`` of sequence ``i`` (to its end when length is None)."""
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        start = int(self.pointers[i]) // self._bin.itemsize + offset
        return self._bin[start:start + length]

    def __getitem__(self, i: int) -> np.ndarray:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({len(self)} sequences)")
        return self.get(i)

    def document(self, d: int) -> np.ndarray:
        """All tokens of document ``d`` (its sequences concatenated)."""
        start, end = int(self.doc_idx[d]), int(self.doc_idx[d + 1])
        if end == start:
            return np.zeros(0, dtype=self.dtype)
        first = int(self.pointers[start]) // self._bin.itemsize
        last = int(self.pointers[end - 1]) // self._bin.itemsize + int(self.sizes[end - 1])
        return self._bin[first:last]

