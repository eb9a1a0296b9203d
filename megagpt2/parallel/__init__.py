"""Model parallelism: process groups, communication, tensor-parallel layers and loss."""

from .comm import (
    copy_to_tp_region,
    gather_from_sequence_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
    scatter_to_sequence_region,
    scatter_to_tp_region,
)
from .cross_entropy import vocab_parallel_cross_entropy
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, init_parameter, shard, unshard
from .random import RNGTracker
from .state import ParallelState

__all__ = [
    "ParallelState", "RNGTracker", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy", "init_parameter", "shard", "unshard", "copy_to_tp_region",
    "reduce_from_tp_region", "scatter_to_tp_region", "gather_from_tp_region",
    "scatter_to_sequence_region", "gather_from_sequence_region", "reduce_scatter_to_sequence_region",
]
