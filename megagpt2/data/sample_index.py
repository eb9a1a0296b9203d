"""Vectorised construction of the GPT sample indices, and their on-disk cache.

Three arrays turn a set of variable-length documents into fixed ``seq_length + 1`` samples
(Megatron-LM's semantics, built with numpy instead of a C++ helper):

    doc_idx      (E_docs * D,) int32   document ids in reading order: epoch after epoch, each epoch
                                       a seeded permutation of the D documents of the split
    sample_idx   (S + 1, 2)   int64    row s = (position in doc_idx, token offset) where sample s
                                       starts; sample s ends (inclusive) where sample s+1 starts
    shuffle_idx  (num_samples,) int64  the order samples are served in

Reading the documents in ``doc_idx`` order gives one token stream; sample ``s`` is
``stream[s * L : s * L + L + 1]`` (``L = seq_length``), so consecutive samples share one token and
every token is the target of exactly one prediction. Samples are shuffled within each epoch
(samples whose first token lies in epoch e come before those of epoch e+1).

Every random draw is a prefix of one seeded stream, so the first k samples are the same for any
``num_samples >= k``: lengthening a run never reorders what was already trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

#: Bump when the arrays built for the same inputs change, so stale caches are never read.
INDEX_VERSION = 1


@dataclass
class SampleIndex:
    """The three arrays of one (dataset, split, seq_length, seed, num_samples)."""

    doc_idx: np.ndarray  # (E_docs * D,) int32
    sample_idx: np.ndarray  # (S + 1, 2) int64
    shuffle_idx: np.ndarray  # (num_samples,) int64


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose token stream holds ``num_samples`` samples of ``seq_length + 1``."""
    # Sample s needs tokens s*L .. s*L+L, so n samples need n*L + 1 tokens.
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_sample_index(
    sizes: np.ndarray, documents: np.ndarray, seq_length: int, seed: int, num_samples: int
) -> SampleIndex:
    """Build doc/sample/shuffle indices for ``documents`` (ids into ``sizes``).

    The stream covers whole epochs: every sample whose first token lies in the last needed epoch
    exists (the documents of one more epoch supply its tail), so each epoch's shuffle has the same
    size whatever ``num_samples`` is, which keeps the order prefix-stable.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    documents = np.asarray(documents, dtype=np.int64)
    doc_sizes = np.asarray(sizes, dtype=np.int64)[documents]  # (D,)
    tokens_per_epoch = int(doc_sizes.sum())
    if tokens_per_epoch == 0:
        raise ValueError(f"the {len(documents)} documents of this split hold no tokens")
    length = seq_length
    epochs = num_epochs_needed(tokens_per_epoch, length, num_samples)
    total_samples = -(-(epochs * tokens_per_epoch) // length)  # samples starting in those epochs
    doc_epochs = -(-(total_samples * length + 1) // tokens_per_epoch)

    # One row of keys per epoch from a single stream: rows of earlier epochs never depend on how
    # many epochs are drawn. Stable argsort makes the permutation exact even on (absurd) ties.
    keys = np.random.default_rng([seed, 0]).random((doc_epochs, len(documents)))
    order = np.argsort(keys, axis=1, kind="stable").reshape(-1)  # (E_docs*D,) positions in documents
    del keys
    id_dtype = np.int32 if len(sizes) < 2**31 else np.int64
    doc_idx = documents[order].astype(id_dtype)
    stream_sizes = doc_sizes[order]  # (E_docs*D,) tokens of each document in reading order
    del order

    ends = np.cumsum(stream_sizes)  # exclusive end of each document in the token stream
    positions = np.arange(total_samples + 1, dtype=np.int64) * length  # first token of each sample
    where = np.searchsorted(ends, positions, side="right")  # document holding that token
    offsets = positions - (ends[where] - stream_sizes[where])
    sample_idx = np.stack([where, offsets], axis=1)  # (S+1, 2) int64

    epoch_of_sample = positions[:-1] // tokens_per_epoch  # (S,)
    shuffle_keys = np.random.default_rng([seed, 1]).random(total_samples)
    shuffle_idx = np.lexsort((shuffle_keys, epoch_of_sample))[:num_samples].astype(np.int64)
    return SampleIndex(doc_idx, sample_idx, shuffle_idx)


def blend_index(weights: list[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Interleave datasets by weight: (dataset id, sample index within it) of each blended sample.

    Dataset d's k-th sample is placed at time (k + 0.5) / w_d and all samples are merged by time
    (ties by dataset id). Any prefix of m samples then holds w_d * m samples of dataset d, within
    one; the result depends only on the weights and is prefix-stable in ``num_samples``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"blend weights must be non-negative with a positive sum, got {weights}")
    w = w / w.sum()
    ids, times, ranks = [], [], []
    for d, weight in enumerate(w):
        if weight == 0:
            continue
        count = int(np.ceil(weight * num_samples)) + 1
        k = np.arange(count, dtype=np.int64)
        ids.append(np.full(count, d, dtype=np.int64))
        times.append((k + 0.5) / weight)
        ranks.append(k)
    ids_all, times_all, ranks_all = map(np.concatenate, (ids, times, ranks))
    order = np.lexsort((ids_all, times_all))[:num_samples]
    dtype = np.uint8 if len(w) < 256 else np.int32
    return ids_all[order].astype(dtype), ranks_all[order]


# ---------------------------------------------------------------------------------------------
# Cache: one directory entry per index, named by a hash of every input the arrays depend on.


def file_sha256(path: str) -> str:
    """Hex sha256 of a file (the ``.idx``: it fixes sizes and document order of the data)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(description: dict) -> str:
    """sha256 of the canonical JSON of ``description`` (plus the index format version)."""
    text = json.dumps({"index_version": INDEX_VERSION, **description}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _write_atomic(path: str, write) -> None:
    """``write(file)`` into a uniquely named temporary file, then rename it to ``path``.

    Unique names (not just the pid) keep builders on different nodes sharing one file system
    from writing into each other's temporary file.
    """
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class IndexCache:
    """Named arrays stored as ``{stem}_{name}.npy`` plus ``{stem}.json``, the completion marker.

    The marker is written last (after every array was renamed into place), so a crash mid-build
    leaves an entry that is simply rebuilt. Readers memory-map the arrays.
    """

    def __init__(self, directory: str, label: str, description: dict) -> None:
        self.directory = directory
        self.description = description
        safe_label = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
        self.stem = os.path.join(directory, f"{safe_label}_{cache_key(description)[:24]}")

    def _array_path(self, name: str) -> str:
        return f"{self.stem}_{name}.npy"

    def complete(self) -> bool:
        return os.path.isfile(self.stem + ".json")

    def save(self, arrays: dict[str, np.ndarray], seconds: float) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as err:
            raise OSError(
                f"cannot create the index cache directory {self.directory!r} ({err}); "
                "set data.cache_dir to a writable directory"
            ) from err
        for name, array in arrays.items():
            _write_atomic(self._array_path(name),
                          lambda f, a=array: np.save(f, a, allow_pickle=False))
        marker = dict(self.description, arrays=sorted(arrays), build_seconds=round(seconds, 3))
        text = json.dumps(marker, indent=1, sort_keys=True).encode()
        _write_atomic(self.stem + ".json", lambda f: f.write(text))

    def ensure(self, build) -> None:
        """Run ``build()`` (returning named arrays) and save its result unless already cached."""
        if not self.complete():
            start = time.perf_counter()
            arrays = build()
            self.save(arrays, time.perf_counter() - start)

    def load(self, names: list[str]) -> dict[str, np.ndarray]:
        if not self.complete():
            raise FileNotFoundError(
                f"index cache {self.stem}.json is missing after the barrier: the building rank "
                "did not write it, or this node cannot see its cache directory "
                f"({self.directory}); use a cache_dir every rank of the node can read"
            )
        return {n: np.load(self._array_path(n), mmap_mode="r", allow_pickle=False) for n in names}
