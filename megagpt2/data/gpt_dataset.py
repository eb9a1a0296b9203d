"""GPT pretraining samples: fixed-length windows stitched across documents, split and blended.

``build_gpt_datasets`` is the one entry point the trainer calls. On the builder rank of each node
it builds every index (see ``sample_index``) that is not cached yet, then everyone passes the
barrier and memory-maps the cached arrays, so all ranks read identical indices.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from megagpt2.data.blending import SPLIT_NAMES, BlendedDataset, parse_data_path, split_ranges
from megagpt2.data.indexed import IndexedDataset, index_file_path
from megagpt2.data.sample_index import (
    IndexCache,
    blend_index,
    build_sample_index,
    file_sha256,
)

log = logging.getLogger(__name__)
_GPT_ARRAYS = ["doc_idx", "sample_idx", "shuffle_idx"]
_BLEND_ARRAYS = ["dataset_index", "dataset_sample_index"]


class GPTDataset(Dataset):
    """Item i -> ``{"tokens": int64 array of seq_length + 1}`` (inputs are [:-1], targets [1:])."""

    def __init__(self, indexed: IndexedDataset, doc_idx: np.ndarray, sample_idx: np.ndarray,
                 shuffle_idx: np.ndarray, seq_length: int, name: str = "gpt") -> None:
        self.indexed = indexed
        self.doc_idx = doc_idx
        self.sample_idx = sample_idx
        self.shuffle_idx = shuffle_idx
        self.seq_length = seq_length
        self.name = name

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def sample(self, s: int) -> np.ndarray:
        """Unshuffled sample ``s``: stream tokens ``s*L .. s*L+L`` (inclusive)."""
        (first, start), (last, end) = self.sample_idx[s], self.sample_idx[s + 1]
        first, start, last, end = int(first), int(start), int(last), int(end)
        get = self.indexed.get
        if first == last:
            return get(int(self.doc_idx[first]), start, end - start + 1).astype(np.int64)
        parts = [get(int(self.doc_idx[first]), start)]
        parts += [get(int(self.doc_idx[j])) for j in range(first + 1, last)]
        parts.append(get(int(self.doc_idx[last]), 0, end + 1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: sample {i} out of range ({len(self)} samples)")
        return {"tokens": self.sample(int(self.shuffle_idx[i]))}


class _Source:
    """One prefix: its memory-mapped data, the hash that identifies it and its split ranges."""

    def __init__(self, prefix: str, split: str, cache_dir: str | None) -> None:
        self.prefix = prefix
        self.indexed = IndexedDataset(prefix)
        self.ranges = split_ranges(len(self.indexed), split)
        self.idx_sha256 = file_sha256(index_file_path(prefix))
        self.cache_dir = cache_dir or os.path.join(os.path.dirname(prefix) or ".", "index-cache")
        self.label = os.path.basename(prefix)

    def cache(self, split_id: int, seq_length: int, seed: int, num_samples: int) -> IndexCache:
        description = {
            "kind": "gpt",
            "idx_sha256": self.idx_sha256,
            "documents": list(self.ranges[split_id]),
            "seq_length": seq_length,
            "seed": seed,
            "num_samples": num_samples,
        }
        return IndexCache(self.cache_dir, f"{self.label}_{SPLIT_NAMES[split_id]}", description)

    def builder(self, split_id: int, seq_length: int, seed: int, num_samples: int):
        start, end = self.ranges[split_id]

        def build() -> dict[str, np.ndarray]:
            try:
                index = build_sample_index(self.indexed.sizes, np.arange(start, end), seq_length,
                                           seed, num_samples)
            except ValueError as err:
                raise ValueError(f"{self.prefix}, {SPLIT_NAMES[split_id]} split: {err}") from err
            return {"doc_idx": index.doc_idx, "sample_idx": index.sample_idx,
                    "shuffle_idx": index.shuffle_idx}
        return build

    def empty(self, split_id: int) -> bool:
        start, end = self.ranges[split_id]
        return end == start


def _plan_split(sources, weights, split_id, num_samples, cache_dir, is_builder):
    """Caches needed for one split: (blend cache or None, live weights, per-source sample counts)."""
    live = [(w, s) for w, s in zip(weights, sources) if w > 0 and not s.empty(split_id)]
    for w, s in zip(weights, sources):
        if w > 0 and s.empty(split_id):
            log.warning("%s: the %s split has no documents (of %d), so it gives no samples",
                        s.prefix, SPLIT_NAMES[split_id], len(s.indexed))
    if not live:
        return None, [], []
    if len(live) == 1:
        return None, live, [num_samples]
    live_weights = [w for w, _ in live]
    blend_cache = IndexCache(cache_dir or live[0][1].cache_dir, f"blend_{SPLIT_NAMES[split_id]}",
                             {"kind": "blend", "weights": live_weights, "num_samples": num_samples})
    if is_builder:
        blend_cache.ensure(lambda: dict(zip(_BLEND_ARRAYS, blend_index(live_weights, num_samples))))
    return blend_cache, live, None


def build_gpt_datasets(
    data_path: str,
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    cache_dir: str | None = None,
    barrier: Callable[[], None] | None = None,
    is_builder: bool = True,
) -> tuple:
    """(train, valid, test) datasets of ``seq_length + 1`` token samples; None for an empty split.

    Args:
        data_path: a prefix, or a blend ``"0.7 prefixA 0.3 prefixB"``; each prefix is split
            by document into contiguous train/valid/test ranges by ``split`` (e.g. "969,30,1").
        num_samples: samples each split must provide (0 -> that split is None).
        cache_dir: where index caches go; default ``index-cache/`` next to each prefix.
        barrier: called once, after the builder rank built the caches and before anyone loads.
        is_builder: True on the one rank per node that builds missing caches.
    """
    blend = parse_data_path(data_path)
    sources = [_Source(prefix, split, cache_dir) for _, prefix in blend]
    weights = [w for w, _ in blend]
    plans = []
    for split_id, wanted in enumerate(num_samples):
        if not wanted:
            plans.append(None)
            continue
        blend_cache, live, counts = _plan_split(sources, weights, split_id, int(wanted), cache_dir,
                                                is_builder)
        plans.append((blend_cache, live, counts, int(wanted)))
        if is_builder and live:
            if counts is None:  # the blend fixes how many samples each source gives
                assert blend_cache is not None
                ids = blend_cache.load(_BLEND_ARRAYS)["dataset_index"]
                counts = np.bincount(ids, minlength=len(live)).tolist()
            for (_, src), count in zip(live, counts):
                if count:
                    src.cache(split_id, seq_length, seed, count).ensure(
                        src.builder(split_id, seq_length, seed, count))
    if barrier is not None:
        barrier()
    return tuple(_load_split(split_id, plan, seq_length, seed) for split_id, plan in
                 enumerate(plans))


def _load_split(split_id: int, plan, seq_length: int, seed: int):
    """Memory-map the cached indices of one split and assemble its dataset (None when empty)."""
    if plan is None or not plan[1]:
        return None
    blend_cache, live, counts, wanted = plan
    blend_arrays = None
    if blend_cache is not None:
        blend_arrays = blend_cache.load(_BLEND_ARRAYS)
        counts = np.bincount(blend_arrays["dataset_index"], minlength=len(live)).tolist()
    datasets = []
    for (_, src), count in zip(live, counts):
        if not count:
            datasets.append(None)
            continue
        arrays = src.cache(split_id, seq_length, seed, count).load(_GPT_ARRAYS)
        datasets.append(GPTDataset(src.indexed, arrays["doc_idx"], arrays["sample_idx"],
                                   arrays["shuffle_idx"], seq_length,
                                   f"{src.label}/{SPLIT_NAMES[split_id]}"))
    if blend_arrays is None:
        return datasets[0]
    return BlendedDataset(datasets, blend_arrays["dataset_index"],
                          blend_arrays["dataset_sample_index"], f"blend/{SPLIT_NAMES[split_id]}")
