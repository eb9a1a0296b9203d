"""Model parallelism: the rank layout and its process groups, communication, TP layers and loss.

    state.py          ParallelLayout, ProcessGroups, build_process_groups (no torch at import)
    comm.py           every communication autograd function of tensor / sequence parallelism
    collectives.py    small all-reduces of losses, norms and flags
    layers.py         column / row-parallel linears, vocab-parallel embedding, sharding helpers
    cross_entropy.py  vocab-parallel cross-entropy
    random.py         the per-TP-rank dropout stream

Only the layout is imported here, so the run plan can check a layout without loading torch;
import the torch-facing names from their modules.
"""

from .state import ParallelLayout, ParallelLayoutError, ProcessGroups, build_process_groups

__all__ = ["ParallelLayoutError", "ParallelLayout", "ProcessGroups", "build_process_groups"]
