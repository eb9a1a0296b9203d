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
        n_valid = min(max(real_vocab - start, 0), per_rank)  # padded vocabulary columns never take part
        x = logits.float()  # (B, T, V/tp); a fresh copy unless the logits already are fp32
        if n_valid:
            x_max = x[..., :n_valid].max(dim=-1).values  # (B, T)
        else:
            x_max = torch.full(x.shape[:-1], float("-inf"), device=x.device)
        if group_size(group) > 1:
            dist.all_reduce(x_max, op=dist.ReduceOp.MAX, group=group)
        # One fp32 (B, T, V/tp) buffer from here on: shifted logits, then exp, then the softmax
        # that backward turns into the gradient in place.
        x = x.sub_(x_max.unsqueeze(-1)) if x is not logits else x - x_max.unsqueeze(-1)
        if n_valid < per_rank:
            x[..., n_valid:] = float("-inf")
        ignored = target == ignore_index
        local_t = target - start
        mine = (local_t >= 0) & (local_t < per_rank) & ~ignored
        local_t = local_t.masked_fill(~mine, 0)
        t_logit = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        exp = x.exp_()
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
        # softmax - one_hot(target), scaled by the incoming gradient, written over the saved
        # softmax: no (B, T, V/tp) copies (as Megatron does; this backward runs once, so
        # retain_graph / double backward through the loss are not supported).
        grad, local_t, mine, ignored = ctx.saved_tensors
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -mine.unsqueeze(-1).to(grad.dtype))
        grad.mul_((g * ~ignored).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group: Group, real_vocab: int, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token losses (B, T); 0 where target == ignore_index.

    logits: (B, T, V_padded / tp), this rank's contiguous vocabulary shard.
    target: (B, T) global token ids (or ignore_index).
    """
    return _VocabParallelCrossEntropy.apply(logits, target, group, real_vocab, ignore_index)
