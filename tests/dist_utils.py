"""Run a function on N gloo ranks for a test: free port, env vars, teardown, errors, timeout.

    results = run_distributed(fn, world_size=4, args=(...))

`fn(rank, world_size, *args)` runs in a fresh process (forkserver, with torch and deepspeed
preloaded so ranks start fast) after torch.distributed is initialised on gloo with a short
timeout. Its return value comes back in rank order. A rank's exception is re-raised in the test
with the rank's traceback; a rank that hangs or dies fails the test after `timeout` seconds.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

_CTX = None


def _context():
    global _CTX  # the forkserver context is process-wide by nature; created once per test run
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "deepspeed", "megagpt2.model", "tests.dist_utils"])
    return _CTX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_groups(tp: int = 1, pp: int = 1, virtual_stages: int = 1, timeout: float = 60.0):
    """ProcessGroups of (tp, pp, the rest data-parallel) over the running torch.distributed world."""
    import torch.distributed as dist

    from megagpt2.parallel import ParallelLayout, build_process_groups

    layout = ParallelLayout.for_world(dist.get_world_size(), tp, pp, virtual_stages, dist.get_rank())
    return build_process_groups(layout, timeout)


def dist_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def quiet_deepspeed() -> None:
    """Keep DeepSpeed from JIT-building its shared-memory op (tens of seconds) and from chatter."""
    import logging

    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def _worker(fn, rank, world_size, port, args, out_path, pg_timeout):
    os.environ.update(dist_env(rank, world_size, port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    result: dict[str, Any]
    try:
        quiet_deepspeed()
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout))
        result = {"ok": fn(rank, world_size, *args)}
    except BaseException as e:  # report everything, including SystemExit from the code under test
        result = {"error": f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"}
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
    with open(out_path, "wb") as f:
        torch.save(result, f)


def run_distributed(
    fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), timeout: float = 180.0, pg_timeout: float = 60.0
) -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; return results by rank."""
    import torch

    ctx = _context()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"rank{r}.pt") for r in range(world_size)]
        procs = [
            ctx.Process(target=_worker, args=(fn, r, world_size, port, tuple(args), outs[r], pg_timeout))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout:.0f} s (deadlock or hang)")
        results, errors = [], []
        for r, path in enumerate(outs):
            if not os.path.exists(path):
                errors.append(f"rank {r} died without a result (exit code {procs[r].exitcode})")
                results.append(None)
                continue
            res = torch.load(path, weights_only=False)  # written by our own worker above
            if "error" in res:
                errors.append(res["error"])
            results.append(res.get("ok"))
        if errors:
            raise RuntimeError("distributed test failed:\n" + "\n".join(errors))
        return results
