"""Cross-entropy over logits whose vocabulary is split across TP ranks.

Never gathers the full-vocabulary logits: each rank holds (B, T, V/tp) and the softmax
normaliser, the maximum and the target logit are combined with three all-reduces of (B, T)
tensors. Columns at or beyond the real vocabulary size (padding) are excluded, so padded
logits never contribute to the loss or its gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import Group, group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """fwd: per-token loss (B, T) from vocabulary shards; bwd: softmax - one_hot, on the shard."""

    @staticmethod
    def forward(ctx, logits, target, group, real_vocab, ignore_index):
        per_rank = logits.shape[-1]
        start = group_rank(group) * per_rank
        x = logits.float()
        n_valid = min(max(real_vocab - start, 0), per_rank)
        if n_valid < per_rank:  # padded vocabulary columns never take part
            x = x.clone()
            x[..., n_valid:] = float("-inf")
        x_max = x.max(dim=-1).values  # (B, T)
        if group_size(group) > 1:
            dist.all_reduce(x_max, op=dist.ReduceOp.MAX, group=group)
        x = x - x_max.unsqueeze(-1)
        ignored = target == ignore_index
        local_t = target - start
        mine = (local_t >= 0) & (local_t < per_rank) & ~ignored
        local_t = local_t.masked_fill(~mine, 0)
        t_logit = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        exp = x.exp_()  # x is no longer needed: reuse its storage for exp
        sum_exp = exp.sum(dim=-1)
        if group_size(group) > 1:
            dist.all_reduce(t_logit, group=group)
            dist.all_reduce(sum_exp, group=group)
        loss = (sum_exp.log() - t_logit).masked_fill(ignored, 0.0)
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, saved for backward
        ctx.save_for_backward(exp, local_t, mine, ignored)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local_t, mine, ignored = ctx.saved_tensors
        grad = softmax.clone()
        one_hot = torch.zeros_like(grad).scatter_(-1, local_t.unsqueeze(-1), 1.0)
        grad -= one_hot * mine.unsqueeze(-1)
        grad *= (g * ~ignored).unsqueeze(-1)
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: Group,
                                 real_vocab: int, ignore_index: int = -100) -> torch.Tensor:
    """Per-token losses (B, T); 0 where target == ignore_index.

    logits: (B, T, V_padded / tp), this rank's contiguous vocabulary shard.
    target: (B, T) global token ids (or ignore_index).
    """
    return _VocabParallelCrossEntropy.apply(logits, target, group, real_vocab, ignore_index)
