"""The optimizer state a rank owns, per parameter, read from and written into DeepSpeed's engine.

Three kinds of engine optimizer reach the trainer (pinned by tests/test_deepspeed_contract.py):

  ZeRO 1/2 (DeepSpeedZeroOptimizer, any precision; BF16_Optimizer, which DeepSpeed picks for bf16
      ZeRO-1 with fp32 gradient accumulation): each parameter that overlaps this rank's
      flat partition carries `_hp_mapping` (deepspeed.utils.tensor_fragment): the range of the
      flattened parameter it covers (`lp_fragment_address`) and views of that range in the fp32
      master partition and in every optimizer-state tensor (`get_hp_fragment(key)`). A load
      reads each slice straight into the master partition and into new flat moment tensors,
      links the fragments to them (`lazy_init_hp_params_optimizer_state`) and refreshes the
      model's weights (`update_lp_params`, a DP all-gather), as DeepSpeed's own loaders do.
  ZeRO-0 fp32: the engine steps the torch optimizer directly; the parameter is the master and
      `optimizer.state[p]` holds the moments. Every DP rank holds all of it, so DP rank r writes
      the r-th flat range of each parameter (the writing is spread like ZeRO's).
  ZeRO-0 bf16/fp16 (FP16_UnfusedOptimizer): one fp32 master per parameter (`fp32_groups`), the
      moments keyed by it; the low-precision parameter is refreshed from the master after loading.

TP-replicated parameters (LayerNorms, row-parallel biases, wpe) are written by TP rank 0 only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .files import CheckpointError

MASTER = "master"


@dataclass
class Slice:
    """Elements [start, start + numel) of the flattened TP shard `tp` of parameter `name`."""

    name: str
    shape: tuple[int, ...]  # global shape
    dim: Optional[int]  # TP split dimension (None: replicated)
    stride: int
    tp: tuple[int, int]  # (rank, size) of the shard; (0, 1) for replicated parameters
    start: int
    numel: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> 1-D tensor of numel
    step: int = 0

    def meta(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dim": self.dim,
            "stride": self.stride,
            "tp": list(self.tp),
            "start": self.start,
            "numel": self.numel,
            "step": self.step,
            "keys": list(self.tensors),
            "dtype": {k: str(t.dtype).replace("torch.", "") for k, t in self.tensors.items()},
        }


def split_of(p: torch.Tensor, tp_rank: int, tp_size: int) -> tuple[tuple[int, ...], Optional[int], int, tuple]:
    """(global shape, dim, stride, (tp_rank, tp_size) of the shard) of a model parameter."""
    dim = getattr(p, "tp_dim", None)
    shape = list(p.shape)
    if dim is None:
        return tuple(shape), None, 1, (0, 1)
    shape[dim] *= tp_size
    return tuple(shape), dim, getattr(p, "tp_stride", 1), (tp_rank, tp_size)


def _moment_keys(state: dict, numel: int) -> list[str]:
    """Optimizer-state entries shaped like the parameter (exp_avg, exp_avg_sq, ...), DeepSpeed's rule."""
    return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.numel() == numel and v.dim() > 0)


def _step(state: dict) -> int:
    s = state.get("step", 0)
    return int(s.item()) if torch.is_tensor(s) else int(s)


def _step_tensor(step: int, like=None) -> torch.Tensor:
    t = torch.tensor(float(step), dtype=torch.float32)
    return t.to(like.device) if torch.is_tensor(like) else t


class EngineState:
    """What a rank writes (`slices`) and where what it reads goes (`targets`, then `finish`)."""

    def __init__(self, engine, tp_rank: int, tp_size: int, dp_rank: int, dp_size: int):
        self.engine, self.optimizer = engine, engine.optimizer
        self.tp_rank, self.tp_size, self.dp_rank, self.dp_size = tp_rank, tp_size, dp_rank, dp_size
        self.params = list(engine.module.named_parameters())

    def _writes(self, p: torch.Tensor) -> bool:
        """One copy of each TP-replicated parameter is enough: TP rank 0 writes it."""
        return getattr(p, "tp_dim", None) is not None or self.tp_rank == 0

    def _slice(self, name: str, p: torch.Tensor, start: int, numel: int) -> Slice:
        shape, dim, stride, tp = split_of(p, self.tp_rank, self.tp_size)
        return Slice(name, shape, dim, stride, tp, start, numel)

    def slices(self) -> list[Slice]:
        raise NotImplementedError

    def targets(self, keys: list[str]) -> list[Slice]:
        """Slices to fill: `tensors[key]` are 1-D destinations of `numel` elements."""
        raise NotImplementedError

    def finish(self, targets: list[Slice], keys: list[str], default_step: int) -> None:
        """After every target is filled: install moments and steps, refresh the model's weights."""
        raise NotImplementedError


class ZeroState(EngineState):
    """ZeRO stage 1/2: per-parameter fragments of this rank's flat partitions."""

    def __init__(self, *args):
        super().__init__(*args)
        opt = self.optimizer
        self.inner = opt.optimizer
        self.groups = opt.bit16_groups if hasattr(opt, "bit16_groups") else opt.bf16_groups
        self.flats = [g["params"][0] for g in self.inner.param_groups]
        self._moments: list[dict[str, torch.Tensor]] = []  # set by targets(), installed by finish()

    def slices(self) -> list[Slice]:
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        for lps, flat in zip(self.groups, self.flats):
            if self.inner.state.get(flat):  # (re)link the fragments to the current state tensors
                lazy_init_hp_params_optimizer_state(lps, flat, self.inner.state)
        out = []
        for name, p in self.params:
            hm = getattr(p, "_hp_mapping", None)
            if hm is None or not self._writes(p):
                continue
            addr = hm.lp_fragment_address
            s = self._slice(name, p, addr.start, addr.numel)
            s.tensors[MASTER] = hm.get_hp_fragment()
            state = self.inner.state.get(self.flats[hm.param_group_index]) or {}
            for key in _moment_keys(state, self.flats[hm.param_group_index].numel()):
                s.tensors[key] = hm.get_hp_fragment(key)
            s.step = _step(state)
            out.append(s)
        return out

    def targets(self, keys: list[str]) -> list[Slice]:
        """Views into the master partition and into new flat moment tensors (zero where only
        alignment padding lies), so that every slice is read straight to where it belongs."""
        moments = [{k: self._moment_buffer(i, flat) for k in keys} for i, flat in enumerate(self.flats)]
        self._moments = moments
        out = []
        for name, p in self.params:
            hm = getattr(p, "_hp_mapping", None)
            if hm is None:
                continue
            addr, at = hm.lp_fragment_address, hm.hp_fragment_address
            s = self._slice(name, p, addr.start, addr.numel)
            s.tensors[MASTER] = hm.get_hp_fragment()
            for key in keys:
                s.tensors[key] = moments[hm.param_group_index][key].narrow(0, at.start, at.numel)
            out.append(s)
        return out

    def _moment_buffer(self, group: int, flat: torch.Tensor) -> torch.Tensor:
        """A tensor like the flat partition, zero where no parameter fragment lies (the alignment
        padding); the rest is filled by the load (no pass zeroing memory it overwrites)."""
        out = torch.empty_like(flat, requires_grad=False)
        spans = sorted(
            (p._hp_mapping.hp_fragment_address.start, p._hp_mapping.hp_fragment_address.numel)
            for p in self.groups[group]
            if getattr(p, "_hp_mapping", None) is not None
        )
        pos = 0
        for start, numel in spans + [(flat.numel(), 0)]:
            if start > pos:
                out[pos:start].zero_()
            pos = max(pos, start + numel)
        return out

    def finish(self, targets: list[Slice], keys: list[str], default_step: int) -> None:
        """Install the moments as the optimizer's state of each flat partition, link every
        parameter's fragment to them (DeepSpeed's lazy_init_hp_params_optimizer_state) and
        refresh the model's weights from the masters (update_lp_params: a DP all-gather)."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        by_name = {t.name: t for t in targets}
        for group, (lps, flat) in enumerate(zip(self.groups, self.flats)):
            steps = {
                by_name[n].step for n, p in self.params if n in by_name and p._hp_mapping.param_group_index == group
            }
            if len(steps) > 1:
                raise CheckpointError(f"parameters of optimizer group {group} have different steps {sorted(steps)}")
            if not keys:  # saved before the first step: the optimizer starts fresh, as then
                continue
            state = self.inner.state[flat]
            state.update(self._moments[group])
            state["step"] = _step_tensor(steps.pop() if steps else default_step, flat)
            lazy_init_hp_params_optimizer_state(lps, flat, self.inner.state)
        self.optimizer.update_lp_params()


class TorchState(EngineState):
    """ZeRO-0 fp32: the torch optimizer on the model's own parameters."""

    def _master(self, p: torch.Tensor) -> torch.Tensor:
        return p

    def _state_of(self, p: torch.Tensor) -> dict:
        return self.optimizer.state.get(self._master(p)) or {}

    def slices(self) -> list[Slice]:
        out = []
        for name, p in self.params:
            if not self._writes(p):
                continue
            n = p.numel()
            a, b = self.dp_rank * n // self.dp_size, (self.dp_rank + 1) * n // self.dp_size
            if a == b:
                continue
            s = self._slice(name, p, a, b - a)
            master, state = self._master(p), self._state_of(p)
            s.tensors[MASTER] = master.detach().reshape(-1)[a:b]
            for key in _moment_keys(state, n):
                s.tensors[key] = state[key].reshape(-1)[a:b]
            s.step = _step(state)
            out.append(s)
        return out

    def targets(self, keys: list[str]) -> list[Slice]:
        out = []
        for name, p in self.params:
            master = self._master(p)
            s = self._slice(name, p, 0, p.numel())
            s.tensors[MASTER] = master.data.reshape(-1)  # contiguous parameters: a view
            for key in keys:
                s.tensors[key] = torch.zeros(p.numel(), dtype=master.dtype, device=master.device)
            out.append(s)
        return out

    def finish(self, targets: list[Slice], keys: list[str], default_step: int) -> None:
        params = dict(self.params)
        for t in targets:
            master = self._master(params[t.name])
            state = {k: t.tensors[k].view_as(master) for k in keys}
            if keys:
                state["step"] = _step_tensor(t.step, master)
            self.optimizer.state[master] = state
            self._refresh(params[t.name], master)

    def _refresh(self, p: torch.Tensor, master: torch.Tensor) -> None:
        pass  # the parameter is the master


class UnfusedState(TorchState):
    """ZeRO-0 with bf16/fp16: FP16_UnfusedOptimizer's per-parameter fp32 masters."""

    def __init__(self, *args):
        super().__init__(*args)
        self._masters = {
            id(lp): hp
            for lps, hps in zip(self.optimizer.fp16_groups, self.optimizer.fp32_groups)
            for lp, hp in zip(lps, hps)
        }
        self.optimizer = self.optimizer.optimizer  # the torch optimizer holding the moments

    def _master(self, p: torch.Tensor) -> torch.Tensor:
        return self._masters[id(p)]

    @torch.no_grad()
    def _refresh(self, p: torch.Tensor, master: torch.Tensor) -> None:
        p.data.copy_(master.data)


def engine_state(engine, tp_rank: int = 0, tp_size: int = 1, dp_rank: int = 0, dp_size: int = 1) -> EngineState:
    """The EngineState for this engine's optimizer, or a CheckpointError naming what is unsupported."""
    opt = engine.optimizer
    kinds: list[tuple[Callable, type]] = [
        (
            lambda o: (hasattr(o, "bit16_groups") or hasattr(o, "bf16_groups")) and hasattr(o, "update_lp_params"),
            ZeroState,
        ),
        (lambda o: hasattr(o, "fp16_groups") and hasattr(o, "fp32_groups"), UnfusedState),
        (lambda o: isinstance(o, torch.optim.Optimizer), TorchState),
    ]
    for test, cls in kinds:
        if test(opt):
            return cls(engine, tp_rank, tp_size, dp_rank, dp_size)
    raise CheckpointError(
        f"cannot checkpoint the optimizer state of {type(opt).__name__}: megagpt2 checkpoints "
        f"support ZeRO stages 0-2 with torch's AdamW (see docs/checkpoints.md)"
    )
