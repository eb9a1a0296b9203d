"""Measure a training step's memory on CPU, for comparison with megagpt2.memory.estimate.

Three measurements of one optimizer step (the second, so that lazily built state exists):
  static       bytes of every live tensor storage at the start of the step (gc walk, storages
               counted once): weights, optimizer state, whatever DeepSpeed keeps between steps;
  peak         static + the highest point of the allocation curve during the step (the
               profiler's per-allocation memory events, allocations minus frees, in time order);
  activations  the most bytes held by autograd's saved tensors at any moment of the step
               (saved_tensors_hooks; parameters excluded), i.e. the activations.
"""

from __future__ import annotations

import gc

import torch


def live_tensor_bytes() -> int:
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                s = obj.untyped_storage()
                storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage
            pass
    return sum(storages.values())


class SavedTensorTracker:
    """pack/unpack hooks that follow the bytes autograd keeps for backward (storages once)."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.live, self.now, self.peak = exclude, {}, 0, 0

    def pack(self, t: torch.Tensor):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr in self.exclude:
            return t
        entry = self.live.get(ptr)
        if entry is None:
            self.live[ptr] = [1, s.nbytes()]
            self.now += s.nbytes()
            self.peak = max(self.peak, self.now)
        else:
            entry[0] += 1
        return _Held(t, self, ptr)

    @staticmethod
    def unpack(held):
        return held.t if isinstance(held, _Held) else held

    def release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.live[ptr]


class _Held:
    """A saved tensor; when autograd drops it (after its backward) the tracker hears of it."""

    def __init__(self, t: torch.Tensor, tracker: SavedTensorTracker, ptr: int):
        self.t, self.tracker, self.ptr = t, tracker, ptr

    def __del__(self):
        self.tracker.release(self.ptr)


def allocation_peak(prof) -> int:
    """Highest point of (allocated - freed) bytes over the profiled region, from its memory events."""
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak


def measure_second_step(trainer) -> None:
    """Trainer patch (for tests.train_utils.train_worker): measure step 2, add it to every record."""
    from torch.profiler import ProfilerActivity, profile

    inner_step, inner_record, found = trainer.train_step, trainer._record, {}

    def step():
        if trainer.step != 1:
            return inner_step()
        static = live_tensor_bytes()
        weights = list(trainer.model.parameters()) + list(trainer.model.buffers())  # buffers: the tied head copy
        tracker = SavedTensorTracker({t.untyped_storage().data_ptr() for t in weights})
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
                result = inner_step()
        found.update(static=static, peak=static + allocation_peak(prof), activations=tracker.peak)
        return result

    def record(**values):
        inner_record(**values, **found)

    trainer.train_step, trainer._record = step, record
