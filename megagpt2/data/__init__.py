"""Token datasets: the MMIDIDX format, GPT samples, splits, blending and the resumable sampler.

``indexed`` and ``sample_index`` need only numpy (preprocessing imports them without torch);
the torch-facing names below are imported on first use.
"""

from megagpt2.data.indexed import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    dtype_for_vocab,
)

_LAZY = {
    "GPTDataset": "megagpt2.data.gpt_dataset",
    "build_gpt_datasets": "megagpt2.data.gpt_dataset",
    "BlendedDataset": "megagpt2.data.blending",
    "PretrainingSampler": "megagpt2.data.sampler",
    "build_pretraining_data_loader": "megagpt2.data.sampler",
}

__all__ = ["IndexedDataset", "IndexedDatasetBuilder", "IndexedDatasetError", "dtype_for_vocab",
           *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megagpt2.data' has no attribute {name!r}")
