"""Run a benchmark function on N spawned CPU (gloo) ranks and return rank 0's result.

Shared by bench_checkpoint.py, bench_pipeline.py and profile_step.py. `target(rank, world, args)`
runs inside a process group that is already initialised; rank 0's return value travels back over
a queue.

Each rank ends with `os._exit` once its work is done and its process group destroyed. A normal
interpreter exit is not safe here: a gloo worker thread may still be releasing its last
collective's work object, whose tensors hold Python references, when the interpreter finalises;
the thread then cannot take the GIL and the process aborts ("terminate called without an active
exception", exit -6) after its results were already delivered. Seen in about one run in ten under
pytest; skipping finalisation keeps a rank's exit code the truth about its work.
"""

from __future__ import annotations

import os
import queue as queue_mod
import socket
import sys
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional


def _rank(target: Callable[[int, int, Any], Any], rank: int, world: int, port: int, timeout_s: float, args, queue):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch.distributed as dist

    code = 1
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        result = target(rank, world, args)
        if rank == 0:
            queue.put((result,))  # a tuple: None is a result too
        code = 0
    except BaseException:  # noqa: BLE001 - printed here, the parent reports the exit code
        traceback.print_exc()
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            queue.close()
            queue.join_thread()  # rank 0's result is in the pipe before the process goes
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def run_ranks(target: Callable[[int, int, Any], Any], world: int, args: Any, timeout_s: float = 1800) -> Optional[Any]:
    """Rank 0's result, or None (after killing the others) as soon as any rank has failed.
    `target` must be importable by name in a fresh interpreter (a module-level function)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(target, r, world, port, timeout_s, args, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    got = None
    try:
        while got is None:
            try:
                got = queue.get(timeout=2)
            except queue_mod.Empty:
                if any(proc.exitcode not in (None, 0) for proc in procs):
                    return None
                if all(proc.exitcode == 0 for proc in procs):  # every rank done, no result sent
                    return None
        for proc in procs:
            proc.join()
        return got[0] if all(proc.exitcode == 0 for proc in procs) else None
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
