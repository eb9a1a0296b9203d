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
    """A second random stream per TP rank (CPU and, when present, the current CUDA device),
    swapped in and out of the default generators."""

    OFFSET = 2718

    def __init__(self, seed: int, tp_rank: int):
        saved = self._get()
        torch.manual_seed(seed + self.OFFSET + tp_rank)
        self.state = self._get()
        self._set(saved)

    @staticmethod
    def _get() -> torch.Tensor:
        cpu = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cat([cpu, torch.cuda.get_rng_state()])
        return cpu

    @staticmethod
    def _set(state: torch.Tensor) -> None:
        n = torch.get_rng_state().numel()
        torch.set_rng_state(state[:n])
        if state.numel() > n and torch.cuda.is_available():
            torch.cuda.set_rng_state(state[n:])

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
