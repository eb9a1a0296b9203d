"""Checkpoints: the layout-free format (write, verify, resume under any layout) and moving weights
between layouts, for training, evaluation and the tools alike. See docs/checkpoints.md."""

from .files import CheckpointError
from .legacy import safe_torch_load
from .reshard import full_state_dict, load_pretrained, read_weights, shard_for, write_converted
from .store import read_state
from .tags import complete_tags, find_latest, is_complete
from .verify import verify

__all__ = [
    "CheckpointError",
    "complete_tags",
    "find_latest",
    "is_complete",
    "read_state",
    "safe_torch_load",
    "verify",
    "full_state_dict",
    "load_pretrained",
    "read_weights",
    "shard_for",
    "write_converted",
]
