"""Batch sampler with exact resume, and the data loader built on it.

The global order of samples is 0, 1, 2, ... (the dataset itself is shuffled). Each global
micro-batch takes the next ``micro_batch_size * dp_size`` indices; data-parallel rank r gets the
r-th slice of ``micro_batch_size``. The only state is ``consumed_samples`` (saved in checkpoints),
so a run resumed at k consumed samples reads samples k, k+1, ... exactly as an uninterrupted one.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class PretrainingSampler:
    """Yields this rank's micro-batches (lists of dataset indices) from ``consumed_samples`` on.

    A last global micro-batch with fewer than ``micro_batch_size * dp_size`` samples is dropped,
    so every rank yields the same number of micro-batches.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int) -> None:
        if total_samples <= 0:
            raise ValueError(f"total_samples must be positive, got {total_samples}")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(
                f"consumed_samples {consumed_samples} is outside [0, total_samples={total_samples}]"
                " (was the checkpoint made with a larger dataset or more iterations?)"
            )
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"need micro_batch_size > 0 and 0 <= dp_rank < dp_size, got "
                f"micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.global_micro_batch

    def __iter__(self) -> Iterator[list[int]]:
        step = self.global_micro_batch
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        for start in range(first, first + len(self) * step, step):
            yield list(range(start, start + self.micro_batch_size))


def collate_tokens(items: list[dict]):
    """Stack ``{"tokens": (L+1,)[, "loss_mask": (L+1,)]}`` items into (B, L+1) tensors."""
    import torch

    keys = ("tokens", "loss_mask") if "loss_mask" in items[0] else ("tokens",)
    return {k: torch.from_numpy(np.stack([item[k] for item in items])) for k in keys}


def build_pretraining_data_loader(dataset, consumed_samples: int, micro_batch_size: int,
                                  dp_rank: int, dp_size: int, num_workers: int = 0,
                                  total_samples: int | None = None):
    """A DataLoader over ``dataset`` that starts at ``consumed_samples`` (see PretrainingSampler)."""
    from torch.utils.data import DataLoader

    total_samples = len(dataset) if total_samples is None else total_samples
    if total_samples > len(dataset):
        raise ValueError(f"total_samples {total_samples} exceeds the dataset's {len(dataset)}")
    sampler = PretrainingSampler(total_samples, consumed_samples,
                                 micro_batch_size, dp_rank, dp_size)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_tokens, pin_memory=False,
                      persistent_workers=num_workers > 0, worker_init_fn=_ignore_stop_signals)


def _ignore_stop_signals(worker_id: int) -> None:
    """Slurm signals every process of a job step and a terminal's Ctrl-C reaches its whole process
    group; the trainer (not its loader workers) handles SIGTERM/SIGUSR1/SIGINT by checkpointing, so
    workers must not die of them first."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
