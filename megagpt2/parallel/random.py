"""Dropout random streams for tensor parallelism.

Where activations are replicated over TP ranks (residual stream without sequence parallelism),
dropout must draw the same mask on every TP rank: that is the default generator, seeded the same
on all of them. Where activations are sharded (attention heads; the residual stream with sequence
parallelism), each TP rank needs its own stream, or the shards would share one mask pattern:
`RNGTracker.fork()` swaps in a stream seeded by (seed, tp_rank) for the duration of a block.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class RNGTracker:
    """A second random stream per TP rank, swapped in and out of the default generator."""

    OFFSET = 2718

    def __init__(self, seed: int, tp_rank: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        saved = self._get()
        torch.manual_seed(seed + self.OFFSET + tp_rank)
        self.state = self._get()
        self._set(saved)

    def _get(self):
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set(self, state) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def get_state(self) -> torch.Tensor:
        return self.state.clone()

    def set_state(self, state: torch.Tensor) -> None:
        self.state = state.clone()

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        """Run the block on this rank's own stream; the default stream is left untouched."""
        saved = self._get()
        self._set(self.state)
        try:
            yield
        finally:
            self.state = self._get()
            self._set(saved)
