"""Token datasets for training: the MMIDIDX format, GPT samples, splits, blending, the sampler.

    indexed.py       .bin/.idx reader and writer (Megatron's MMIDIDX byte format)
    sample_index.py  document / sample / shuffle indices, vectorised and cached on disk
    blending.py      data.path and data.split parsing, weighted blends
    sampler.py       the resumable batch sampler and its DataLoader
    gpt_dataset.py   GPT samples of seq_length + 1 tokens; build_gpt_datasets (imports torch)
    finetune.py      dialogue / instruction samples with a loss mask

The names below need no torch (preprocessing and the run plan import them); import the rest
from their modules.
"""

from .blending import BlendedDataset, parse_data_path, parse_split, split_ranges
from .indexed import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError, dtype_for_vocab
from .sampler import PretrainingSampler, build_pretraining_data_loader

__all__ = ["BlendedDataset", "IndexedDataset", "IndexedDatasetBuilder", "IndexedDatasetError", "PretrainingSampler",
           "build_pretraining_data_loader", "dtype_for_vocab", "parse_data_path", "parse_split", "split_ranges"]
