"""Point-to-point transfers between neighbouring pipeline ranks.

Activations travel forward (to the next rank in the ring: rank pp-1 feeds rank 0's next chunk
when interleaving) and their gradients travel backward. Every message has the same, known
shape (micro_batch, seq_length or seq_length / tp with sequence parallelism, n_embd) and dtype,
so receivers allocate their buffers up front and no per-message shape handshake is needed.

Two channels, each its own process group per pipeline (one for activations, one for gradients;
build_process_groups makes them with the other groups), so that each channel is
first-in-first-out per pair of ranks on any backend: with pp=2 and interleaving the same pair
carries both kinds in the same direction, and NCCL ignores tags.

Sends are asynchronous (isend): a blocking send deadlocks 1F1B on gloo (it waits for the
matching receive). Their buffers stay referenced until they complete; the end of a step waits for
all of them. Receives are posted early and waited for right before their data is used. Every wait
has the configured timeout, so a dead, failed or stuck stage turns into an error, not a hang.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from ..parallel import ProcessGroups


class Link:
    """Posts this rank's isend/irecv in batches and hands out received tensors by key."""

    def __init__(
        self,
        groups: ProcessGroups,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        timeout_seconds: float,
    ):
        self.groups, self.layout = groups, groups.layout
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.timeout = timedelta(seconds=timeout_seconds)
        self._sends: list[tuple[list[dist.Work], torch.Tensor]] = []  # kept alive until waited for
        self._recvs: dict[tuple, tuple[list[dist.Work], torch.Tensor]] = {}

    def post(self, sends: list[tuple[str, torch.Tensor]], recvs: list[tuple[str, tuple]]) -> None:
        """Post sends ("forward" / "backward", tensor) and receives ("forward" / "backward", key).

        A forward message goes to the next rank and is received from the previous one; a
        backward message the other way round. Ops of one channel go out as one batch.
        """
        self._release_completed_sends()
        by_group: dict[str, list[dist.P2POp]] = {"forward": [], "backward": []}
        for kind, t in sends:
            peer = self.layout.next_stage_rank if kind == "forward" else self.layout.prev_stage_rank
            t = t.detach().contiguous()
            by_group[kind].append(dist.P2POp(dist.isend, t, peer, self._group(kind)))
        new_recvs = []
        for kind, key in recvs:
            if (kind, key) in self._recvs:
                continue
            peer = self.layout.prev_stage_rank if kind == "forward" else self.layout.next_stage_rank
            op = dist.P2POp(
                dist.irecv, torch.empty(self.shape, dtype=self.dtype, device=self.device), peer, self._group(kind)
            )
            by_group[kind].append(op)
            new_recvs.append((kind, key, op))
        op_works: dict[int, list[dist.Work]] = {}
        for ops in by_group.values():
            if ops:
                ws = dist.batch_isend_irecv(ops)
                for i, op in enumerate(ops):  # one work per op (gloo) or one for the batch (NCCL)
                    op_works[id(op)] = [ws[i]] if len(ws) == len(ops) else list(ws)
                    if op.op is dist.isend:
                        self._sends.append((op_works[id(op)], op.tensor))
        for kind, key, op in new_recvs:
            self._recvs[(kind, key)] = (op_works[id(op)], op.tensor)

    def take(self, kind: str, key: tuple, where: str) -> torch.Tensor:
        """Wait for the receive posted under (kind, key) and return its tensor."""
        if (kind, key) not in self._recvs:
            self.post([], [(kind, key)])
        works, buf = self._recvs.pop((kind, key))
        for w in works:
            peer = self.layout.prev_stage_rank if kind == "forward" else self.layout.next_stage_rank
            self._wait(w, f"receiving the {kind} message of {where} from rank {peer}")
        return buf

    def _release_completed_sends(self) -> None:
        """Drop finished sends (their buffers are free); wait() returns at once or raises."""
        pending = []
        for works, t in self._sends:
            if all(w.is_completed() for w in works):
                for w in works:
                    self._wait(w, "sending to a neighbouring pipeline stage")
            else:
                pending.append((works, t))
        self._sends = pending

    def finish(self) -> None:
        """Wait for every send of this step (their buffers are free afterwards)."""
        sends, self._sends = self._sends, []
        for works, _ in sends:
            for w in works:
                self._wait(w, "sending to a neighbouring pipeline stage")
        if self._recvs:
            raise RuntimeError(f"pipeline schedule bug: receives posted but never used: {sorted(self._recvs)}")

    def _group(self, kind: str):
        return self.groups.pipe_forward if kind == "forward" else self.groups.pipe_backward

    def _wait(self, work: dist.Work, what: str) -> None:
        try:
            work.wait(self.timeout)
        except Exception as e:
            limit = self.timeout.total_seconds()
            raise RuntimeError(
                f"pipeline rank {self.layout.rank} (stage {self.layout.pp_rank}): {what} failed: {e}. "
                f"Another stage probably failed, died or hangs: see its log (a silent neighbour "
                f"fails this rank after parallel.timeout_seconds={limit:.0f})"
            ) from e
