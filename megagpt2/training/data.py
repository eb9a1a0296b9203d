"""The training loop's view of the data: this rank's micro-batches and the exact data position."""

from __future__ import annotations

import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..config import Config
from ..parallel import ParallelState

Batch = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # inputs, targets, loss mask


class DataState:
    """Train and validation loaders; `consumed` (global samples read) is all resume needs."""

    def __init__(self, train, valid, ps: ParallelState, micro: int, global_batch: int, total: int,
                 eval_steps: int, num_workers: int):
        self.train, self.valid, self.ps = train, valid, ps
        self.micro, self.global_batch, self.total = micro, global_batch, total
        self.eval_steps, self.num_workers = eval_steps, num_workers
        self.consumed = 0
        self._it: Optional[Iterator] = None

    def _loader(self, dataset, consumed: int, total: int):
        from ..data import build_pretraining_data_loader

        return build_pretraining_data_loader(dataset, consumed, self.micro, self.ps.dp_rank, self.ps.dp_size,
                                             num_workers=self.num_workers, total_samples=total)

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
        self.consumed += self.micro * self.ps.dp_size
        return split_batch(batch, device)

    def valid_batches(self, device: torch.device) -> Iterator[Batch]:
        n = min(self.eval_steps * self.global_batch, len(self.valid))
        n -= n % (self.micro * self.ps.dp_size)
        for batch in self._loader(self.valid, 0, n):
            yield split_batch(batch, device)


def split_batch(batch: dict, device: torch.device) -> Batch:
    """{"tokens": (B, T+1)[, "loss_mask": (B, T+1)]} -> inputs (B, T), targets (B, T), mask."""
    tokens = batch["tokens"].to(device, dtype=torch.long, non_blocking=True)
    mask = batch.get("loss_mask")
    if mask is not None:
        mask = mask[:, 1:].to(device, non_blocking=True)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask


def build_data(cfg: Config, ps: ParallelState, micro: int, global_batch: int, tokenizer) -> DataState:
    if not cfg.data.path:
        raise ValueError("data.path is empty: point it at a preprocessed prefix (tools/preprocess_data.py) "
                         "or a blend \"0.7 prefixA 0.3 prefixB\"")
    total = cfg.train.steps * global_batch
    valid_n = cfg.train.eval_steps * global_batch if cfg.train.eval_interval else 0
    barrier = dist.barrier if dist.is_initialized() else None
    is_builder = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if cfg.data.format == "pretrain":
        from ..data import build_gpt_datasets

        train, valid, _ = build_gpt_datasets(cfg.data.path, cfg.data.split, cfg.data.seq_length, cfg.train.seed,
                                             (total, valid_n, 0), cfg.data.cache_dir, barrier, is_builder)
    else:
        from ..data.finetune import build_finetune_datasets

        train, valid = build_finetune_datasets(cfg.data.path, cfg.data.format, tokenizer, cfg.data.seq_length,
                                               cfg.data.split, cfg.train.seed, total, valid_n, cfg.data.clean)
    if train is None:
        raise ValueError(f"data.path={cfg.data.path!r} with split {cfg.data.split!r} has no training documents")
    return DataState(train, valid, ps, micro, global_batch, total, cfg.train.eval_steps, cfg.data.num_workers)
