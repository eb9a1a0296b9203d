"""Parsing of data paths and split strings, and the weighted blend of several datasets (no torch)."""

from __future__ import annotations

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")


def parse_data_path(data_path: str) -> list[tuple[float, str]]:
    """``"prefix"`` -> ``[(1.0, prefix)]``; ``"0.7 A 0.3 B"`` -> ``[(0.7, "A"), (0.3, "B")]``.

    Weights are relative (they need not sum to 1). Prefixes are paths without ``.bin``/``.idx``.
    """
    parts = data_path.split()
    if not parts:
        raise ValueError("data path is empty: give a prefix or a blend like '0.7 prefixA 0.3 prefixB'")
    if len(parts) == 1:
        return [(1.0, parts[0])]
    if len(parts) % 2:
        raise ValueError(
            f"data path {data_path!r} has {len(parts)} words: a blend alternates weight and prefix, "
            "e.g. '0.7 prefixA 0.3 prefixB' (prefixes may not contain spaces)"
        )
    blend = []
    for weight, prefix in zip(parts[::2], parts[1::2]):
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(
                f"data path {data_path!r}: {weight!r} is not a weight; a blend alternates weight "
                "and prefix, e.g. '0.7 prefixA 0.3 prefixB'"
            ) from None
        if not value >= 0:
            raise ValueError(f"data path {data_path!r}: weight {weight} must be >= 0")
        blend.append((value, prefix))
    if sum(w for w, _ in blend) <= 0:
        raise ValueError(f"data path {data_path!r}: weights must not all be zero")
    return blend


def parse_split(split: str) -> np.ndarray:
    """``"969,30,1"`` -> normalised (train, valid, test) fractions; missing entries are 0."""
    try:
        values = [float(x) for x in split.replace("/", ",").split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"split {split!r} must be comma-separated numbers like '969,30,1'") from None
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"split {split!r} needs 1 to 3 non-negative weights with a positive sum")
    values += [0.0] * (3 - len(values))
    weights = np.asarray(values, dtype=np.float64)
    return weights / weights.sum()


def split_ranges(num_documents: int, split: str) -> list[tuple[int, int]]:
    """Contiguous, disjoint [start, end) document ranges of train, valid and test."""
    bounds = np.round(np.cumsum(parse_split(split)) * num_documents).astype(np.int64)
    bounds[-1] = num_documents
    starts = np.concatenate([[0], bounds[:-1]])
    return [(int(a), int(b)) for a, b in zip(starts, bounds)]


class BlendedDataset:
    """Sample i is ``datasets[dataset_index[i]][dataset_sample_index[i]]`` (a map-style dataset).

    The two arrays come from ``sample_index.blend_index`` (deterministic, prefix-stable).
    """

    def __init__(self, datasets: list, dataset_index: np.ndarray, dataset_sample_index: np.ndarray,
                 name: str = "blend") -> None:
        self.datasets = datasets
        self.dataset_index = dataset_index  # (N,) uint8
        self.dataset_sample_index = dataset_sample_index  # (N,) int64
        self.name = name
        counts = np.bincount(np.asarray(dataset_index), minlength=len(datasets))
        for d, (count, dataset) in enumerate(zip(counts, datasets)):
            if dataset is None and count:
                raise ValueError(f"{name}: blend draws {count} samples from empty dataset {d}")
            if dataset is not None and count > len(dataset):
                raise ValueError(
                    f"{name}: blend needs {count} samples of dataset {d} but it has {len(dataset)}"
                )

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict:
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
