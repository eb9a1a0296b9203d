"""Pipeline schedules: the order in which one rank runs forward and backward passes in a step.

A schedule is a plain function (m micro-batches, pp ranks, this rank, virtual chunks) -> list of
Op("F" or "B", micro_batch, chunk). The executor (executor.py) walks the list: a forward receives
its input from the previous virtual stage and sends its output on; a backward receives the
gradient of its output and sends the gradient of its input back. Sends are asynchronous, so the
order alone defines the schedule; `simulate` checks every order for deadlocks in the tests.

  none         one micro-batch at a time through all stages, forward then backward: the
               gradient-accumulation loop, no overlap between stages (bubble (p-1)/p).
  gpipe        all forwards, then all backwards (stores m micro-batches of activations).
  1f1b         p - rank - 1 warm-up forwards, then one forward / one backward, then the
               remaining backwards: bubble (p-1)/(m+p-1) as GPipe, at most p micro-batches of
               activations in flight.
  interleaved  1F1B over v model chunks per rank (virtual stages s = chunk x p + rank): the
               bubble shrinks by v, to (p-1)/(v m + p-1) in units of a full-stage pass.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from ..config import ConfigError


class Op(NamedTuple):
    kind: str  # "F" forward, "B" backward
    mb: int  # micro-batch
    chunk: int  # model chunk on this rank (0 without interleaving)


def no_pipelining(m: int, p: int, rank: int, v: int = 1) -> list[Op]:
    """Forward and backward of each micro-batch before the next one starts."""
    ops: list[Op] = []
    for i in range(m):
        ops += [Op("F", i, c) for c in range(v)] + [Op("B", i, c) for c in reversed(range(v))]
    return ops


def gpipe(m: int, p: int, rank: int, v: int = 1) -> list[Op]:
    """All forward passes, then all backward passes (in the same micro-batch order)."""
    return [Op("F", i, c) for i in range(m) for c in range(v)] + [
        Op("B", i, c) for i in range(m) for c in reversed(range(v))
    ]


def one_f_one_b(m: int, p: int, rank: int, v: int = 1) -> list[Op]:
    """Warm-up forwards, then alternate one forward and one backward, then drain."""
    if v != 1:
        raise ValueError("1f1b runs one chunk per rank; use the interleaved schedule for virtual stages")
    warmup = min(p - rank - 1, m)
    ops = [Op("F", i, 0) for i in range(warmup)]
    for i in range(m - warmup):
        ops += [Op("F", warmup + i, 0), Op("B", i, 0)]
    return ops + [Op("B", i, 0) for i in range(m - warmup, m)]


def interleaved_1f1b(m: int, p: int, rank: int, v: int) -> list[Op]:
    """1F1B over virtual stages (Narayanan et al. 2021). Micro-batches go in groups of p; within
    a group every chunk runs before the next group starts, backward chunks in reverse order."""
    total = m * v

    def op(kind: str, k: int) -> Op:
        group, within = divmod(k, p * v)
        chunk = within // p
        return Op(kind, group * p + within % p, chunk if kind == "F" else v - 1 - chunk)

    warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
    ops = [op("F", k) for k in range(warmup)]
    for k in range(total - warmup):
        ops += [op("F", warmup + k), op("B", k)]
    return ops + [op("B", k) for k in range(total - warmup, total)]


SCHEDULES: dict[str, Callable[..., list[Op]]] = {
    "none": no_pipelining,
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved": interleaved_1f1b,
}


def check_layout(schedule: str, pp: int, virtual: int, micro_batches: int) -> None:
    """Raise ConfigError for a layout the schedule cannot run; cheap, so callable before any
    process group exists (micro_batches = the DeepSpeed config's gradient_accumulation_steps)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"parallel.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if virtual > 1 and schedule != "interleaved":
        raise ConfigError(f"parallel.virtual_stages={virtual} needs parallel.schedule=interleaved")
    if schedule in ("1f1b", "interleaved") and micro_batches < pp:
        raise ConfigError(
            f"parallel.schedule={schedule} needs at least parallel.pp={pp} micro-batches per step, "
            f"got gradient_accumulation_steps={micro_batches}; raise gradient_accumulation_steps "
            f"(the micro-batches per step) to >= {pp} or use parallel.schedule=gpipe"
        )
    if schedule == "interleaved" and micro_batches % pp:
        raise ConfigError(
            f"parallel.schedule=interleaved needs gradient_accumulation_steps (micro-batches per "
            f"step, {micro_batches}) to be a multiple of parallel.pp={pp}"
        )


def build_schedule(schedule: str, m: int, p: int, rank: int, v: int = 1) -> list[Op]:
    check_layout(schedule, p, v, m)
    return SCHEDULES[schedule](m, p, rank, v)


def simulate(schedule: str, m: int, p: int, v: int = 1, backward_cost: float = 2.0) -> float:
    """Run every rank's op list against the data dependencies with unit-time forwards; return the
    makespan. Raises RuntimeError on a deadlock or on messages that would be matched out of order
    (each directed pair of ranks is a FIFO per kind, as in p2p.Link)."""
    ops = {r: build_schedule(schedule, m, p, r, v) for r in range(p)}
    done: dict[tuple, float] = {}  # (kind, mb, virtual stage) -> finish time
    pos, clock = {r: 0 for r in range(p)}, {r: 0.0 for r in range(p)}
    sent: dict[tuple, list] = {}  # (kind, src, dst) -> [(mb, virtual stage) in send order]
    received: dict[tuple, int] = {}
    last = p * v - 1
    progress = True
    while progress:
        progress = False
        for r in range(p):
            if pos[r] == len(ops[r]):
                continue
            kind, mb, chunk = ops[r][pos[r]]
            s = chunk * p + r
            need = [("F", mb, s - 1)] if kind == "F" and s > 0 else []
            if kind == "B":
                need = [("F", mb, s)] + ([("B", mb, s + 1)] if s < last else [])
            if any(n not in done for n in need):
                continue
            for n in need:  # messages from another virtual stage must arrive in FIFO order
                if n[2] != s:
                    src = n[2] % p
                    key = (n[0], src, r)
                    idx = received.get(key, 0)
                    if sent[key][idx] != (n[1], n[2]):
                        raise RuntimeError(
                            f"{schedule}: rank {r} expects {n} but the next {n[0]} message "
                            f"from rank {src} is {sent[key][idx]}"
                        )
                    received[key] = idx + 1
            start = max([clock[r]] + [done[n] for n in need])
            clock[r] = done[(kind, mb, s)] = start + (1.0 if kind == "F" else backward_cost)
            if (kind == "F" and s < last) or (kind == "B" and s > 0):
                dst = (r + 1) % p if kind == "F" else (r - 1) % p
                sent.setdefault((kind, r, dst), []).append((mb, s))
            pos[r] += 1
            progress = True
    stuck = {r: ops[r][pos[r]] for r in range(p) if pos[r] < len(ops[r])}
    if stuck:
        raise RuntimeError(f"{schedule} (m={m}, p={p}, v={v}) deadlocks; waiting ops: {stuck}")
    return max(clock.values())


def theoretical_bubble(m: int, p: int, v: int = 1) -> float:
    """Idle fraction of 1F1B / GPipe: (p-1)/(m+p-1); interleaving divides the ramp by v."""
    return (p - 1) / (v * m + p - 1)
