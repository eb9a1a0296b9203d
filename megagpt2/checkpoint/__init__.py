"""Checkpoints: writing, finding and loading training checkpoints, and moving weights between
layouts (used by training, evaluation and the tools alike)."""

from .reshard import full_state_dict, load_pretrained, read_weights, shard_for, write_converted
from .store import CheckpointError, complete_tags, find_latest, is_complete, read_state, safe_torch_load

__all__ = ["CheckpointError", "complete_tags", "find_latest", "is_complete", "read_state", "safe_torch_load",
           "full_state_dict", "load_pretrained", "read_weights", "shard_for", "write_converted"]
