"""Small collectives outside autograd: scalars and flags every rank must agree on.

The autograd communication of tensor and sequence parallelism is in comm.py; these are the
plain helpers the training step, checkpoints and the pipeline use for losses, norms and flags.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


def comm_device(group: Any) -> Optional[torch.device]:
    """Device a collective on `group` needs (NCCL: the current GPU), None for any."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def all_reduce_small(t: torch.Tensor, op: Any = None, group: Any = None) -> torch.Tensor:
    """All-reduce a small tensor wherever the backend needs it (GPU for NCCL), return it on CPU.

    Without torch.distributed (one process) it is the identity."""
    if not dist.is_initialized():
        return t
    x = t.to(comm_device(group) or t.device)
    dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)
    return x.cpu()
