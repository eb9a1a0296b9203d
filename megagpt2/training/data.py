"""The training loop's view of the data: this rank's micro-batches and the exact data position."""

from __future__ import annotations

import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..config import DataConfig
from ..parallel import ParallelLayout

Batch = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # inputs, targets, loss mask


class DataState:
    """Train and validation loaders; `consumed` (global samples read) is all resume needs."""

    def __init__(
        self,
        train,
        valid,
        layout: ParallelLayout,
        micro: int,
        global_batch: int,
        total: int,
        eval_steps: int,
        num_workers: int,
    ):
        self.train, self.valid, self.layout = train, valid, layout
        self.micro, self.global_batch, self.total = micro, global_batch, total
        self.eval_steps, self.num_workers = eval_steps, num_workers
        self.consumed = 0
        self._it: Optional[Iterator] = None

    def _loader(self, dataset, consumed: int, total: int):
        from ..data.sampler import build_pretraining_data_loader

        return build_pretraining_data_loader(
            dataset,
            consumed,
            self.micro,
            self.layout.dp_rank,
            self.layout.dp,
            num_workers=self.num_workers,
            total_samples=total,
        )

    def seek(self, consumed: int) -> None:
        """Continue from `consumed` global samples (a resumed run reads what an unbroken one would)."""
        self.consumed, self._it = consumed, None

    def next_train(self, device: torch.device) -> Batch:
        if self._it is None:
            self._it = iter(self._loader(self.train, self.consumed, self.total))
        try:
            batch = next(self._it)
        except StopIteration:
            raise RuntimeError(f"training data exhausted after {self.consumed} samples") from None
        self.consumed += self.micro * self.layout.dp
        return split_batch(batch, device)

    def valid_batches(self, device: torch.device) -> Iterator[Batch]:
        n = min(self.eval_steps * self.global_batch, len(self.valid))
        n -= n % (self.micro * self.layout.dp)
        for batch in self._loader(self.valid, 0, n):
            yield split_batch(batch, device)


def split_batch(batch: dict, device: torch.device) -> Batch:
    """{"tokens": (B, T+1)[, "loss_mask": (B, T+1)]} -> inputs (B, T), targets (B, T), mask."""
    tokens = batch["tokens"].to(device, dtype=torch.long, non_blocking=True)
    mask = batch.get("loss_mask")
    if mask is not None:
        mask = mask[:, 1:].to(device, non_blocking=True)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask


def _barrier() -> None:
    dist.barrier()


def build_data(
    data: DataConfig,
    layout: ParallelLayout,
    micro: int,
    global_batch: int,
    tokenizer,
    *,
    seed: int,
    train_samples: int,
    valid_samples: int,
    eval_steps: int,
) -> DataState:
    """Train and validation datasets of `data` (checked by the run plan) for this rank's replica."""
    barrier = _barrier if dist.is_initialized() else None
    is_builder = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if data.format == "pretrain":
        from ..data.gpt_dataset import build_gpt_datasets

        train, valid, _ = build_gpt_datasets(
            data.path,
            data.split,
            data.seq_length,
            seed,
            (train_samples, valid_samples, 0),
            data.cache_dir,
            barrier,
            is_builder,
        )
    else:
        from ..data.finetune import build_finetune_datasets

        train, valid = build_finetune_datasets(
            data.path,
            data.format,
            tokenizer,
            data.seq_length,
            data.split,
            seed,
            train_samples,
            valid_samples,
            data.clean,
        )
    if train is None:
        raise ValueError(f"data.path={data.path!r} with split {data.split!r} has no training documents")
    return DataState(train, valid, layout, micro, global_batch, train_samples, eval_steps, data.num_workers)
