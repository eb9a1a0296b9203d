"""The input/output embedding shared by the first and the last pipeline stage.

Only the first stage owns the tied weight (`wte.weight`, a parameter in its optimizer). The last
stage computes the logits with a plain tensor copy (`head_weight`, no parameter, in no
checkpoint). ZeRO-2 reduces and partitions gradients inside every backward, so the two halves of
the tied gradient cannot be summed after the backward passes as Megatron does; instead, per step:

  1. the last stage accumulates its head gradient over its micro-batches, in fp32, outside the
     optimizer (`head_weight.grad` is moved into the accumulator after each backward);
  2. after its last backward of the chunk holding the head, it sends the sum to the first stage
     (asynchronous broadcast in the embedding group: the first stage may still be far behind);
  3. the first stage receives it right before its own last backward of the step and adds it to
     wte's gradient in a tensor hook: tensor hooks run before the gradient is accumulated, hence
     before ZeRO's post-accumulate hook reduces it over data parallelism, and the grad norm sees
     the tied weight exactly once;
  4. after the optimizer step the first stage broadcasts the updated weight to the last stage.

Each TP rank's vocabulary shard pairs with the same TP rank on the other stage (the embedding
group is built per (dp, tp) pair). Both ends' gradients carry the same 1/m and loss scale, as
both come from engine.backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..parallel import ProcessGroups
from ..parallel.collectives import comm_device


class TiedEmbedding:
    """Steps 1-4 above for one rank (a no-op without pipelining and on stages that hold neither end)."""

    def __init__(self, groups: ProcessGroups, model):
        layout = groups.layout
        self.layout, self.model = layout, model
        self.group = groups.embedding
        self.owner = layout.pp > 1 and layout.is_first_stage  # holds wte.weight
        self.copy = layout.pp > 1 and layout.is_last_stage  # holds head_weight
        self._acc: Optional[torch.Tensor] = None  # last stage: fp32 sum of head gradients
        self._send = None  # last stage: pending asynchronous send of _acc
        self._pending: Optional[torch.Tensor] = None  # first stage: gradient to add in the hook
        self._hook = None

    def attach(self) -> None:
        """After deepspeed.initialize (which may cast or move the module's tensors)."""
        if self.copy:
            w = self.model.head_weight  # DeepSpeed casts parameters (bf16/fp16) but not buffers
            dtype = next(self.model.parameters()).dtype
            if w.dtype != dtype:
                w.data = w.data.to(dtype)
            w.requires_grad_(True)
        if self.owner and self._hook is None:
            self._hook = self.model.wte.weight.register_hook(self._add_head_grad)

    def _add_head_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self._pending is None:
            return grad
        return grad + self._pending.to(device=grad.device, dtype=grad.dtype)

    # -- last stage ---------------------------------------------------------------------------
    def collect(self) -> None:
        """After each backward of the chunk holding the head: move its gradient aside."""
        if not self.copy:
            return
        w = self.model.head_weight
        if w.grad is None:
            return
        if self._acc is None:
            self._acc = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        self._acc.add_(w.grad.float())
        w.grad = None

    def send_grad(self) -> None:
        """After the last backward of the head chunk in the step: post the sum to the first stage."""
        if not self.copy:
            return
        if self._acc is None:  # every head gradient was skipped (non-finite losses)
            self._acc = torch.zeros(
                self.model.head_weight.shape, dtype=torch.float32, device=self.model.head_weight.device
            )
        self._send = dist.broadcast(self._acc, src=self.layout.last_stage_rank, group=self.group, async_op=True)

    # -- first stage --------------------------------------------------------------------------
    def receive_grad(self) -> None:
        """Before the first stage's last backward of the step: fetch the head gradient."""
        if not self.owner:
            return
        w = self.model.wte.weight
        buf = torch.empty(w.shape, dtype=torch.float32, device=w.device)
        dist.broadcast(buf, src=self.layout.last_stage_rank, group=self.group)
        self._pending = buf

    def clear_pending(self) -> None:
        self._pending = None

    # -- both ---------------------------------------------------------------------------------
    def finish_step(self) -> None:
        """After the optimizer step: complete the gradient send, then share the new weight."""
        if self.copy and self._send is not None:
            self._send.wait()
            self._send, self._acc = None, None
        self.broadcast_weight()

    @torch.no_grad()
    def broadcast_weight(self) -> None:
        """First stage's wte.weight -> last stage's head_weight (collective in the pair)."""
        if self.group is None or not (self.owner or self.copy):
            return
        t = self.model.wte.weight if self.owner else self.model.head_weight
        dev = comm_device(self.group)
        buf = t.detach() if dev is None or t.device == dev else t.detach().to(dev)
        if not buf.is_contiguous():
            buf = buf.contiguous()
        dist.broadcast(buf, src=self.layout.first_stage_rank, group=self.group)
        if self.copy and buf.data_ptr() != t.data_ptr():
            t.copy_(buf)
