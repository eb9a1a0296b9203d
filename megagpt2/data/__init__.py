"""Token datasets for training: the MMIDIDX format, GPT samples, splits, blending, the sampler.

    indexed.py       .bin/.idx reader and writer (Megatron's MMIDIDX byte format)
    sample_index.py  document / sample / shuffle indices, vectorised and cached on disk
    blending.py      data.path and data.split parsing, weighted blends
    sampler.py       the resumable batch sampler and its DataLoader
    gpt_dataset.py   GPT samples of seq_length + 1 tokens; build_gpt_datasets (imports torch)
    finetune.py      dialogue / instruction / chitchat samples with a loss mask
    sidecar.py       the tokenizer a dataset was built with, next to its .bin/.idx
    run_tokenizer.py which tokenizer a run uses: explicit, else the dataset's, else init_from's
    preprocess.py    tools/preprocess_data.py's multiprocess pipeline: read, clean, tokenize, write

The names below need no torch (preprocessing and the run plan import them); import the rest
from their modules.
"""

from .blending import BlendedDataset, parse_data_path, parse_split, split_ranges
from .indexed import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError, dtype_for_vocab
from .sampler import PretrainingSampler, build_pretraining_data_loader

__all__ = ["BlendedDataset", "IndexedDataset", "IndexedDatasetBuilder", "IndexedDatasetError", "PretrainingSampler",
           "build_pretraining_data_loader", "dtype_for_vocab", "parse_data_path", "parse_split", "split_ranges"]
