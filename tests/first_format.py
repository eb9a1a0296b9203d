"""Write checkpoints in the first format (DeepSpeed's .pt files, megagpt2.json format_version 1, an
empty COMPLETE), as megagpt2 did before the layout-free format, so that tests can check that such
checkpoints still resume, verify, convert and refuse malicious pickles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from megagpt2.checkpoint import store
from megagpt2.checkpoint.tags import complete_tags, tag_for


def save_first_format(engine, ps, ckpt_dir: str, step: int, state: dict[str, Any], keep_last: int, tracker=None) -> str:
    """Collective, with store.save's signature."""
    from safetensors.torch import save_file

    tag = tag_for(step)
    path = Path(ckpt_dir) / tag
    rank = store._rank()
    if rank == 0 and path.exists():
        shutil.rmtree(path)
    store._barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={}, save_latest=False)
    (path / "rng").mkdir(parents=True, exist_ok=True)
    save_file(store.rng_state(tracker), str(path / "rng" / f"rank_{rank:05d}.safetensors"))
    sharding = {
        n: [getattr(p, "tp_dim", None), getattr(p, "tp_stride", 1)] for n, p in engine.module.named_parameters()
    }
    sharding = {k: v for m in store._all_gather(sharding) for k, v in m.items()}
    if rank == 0:
        layout = {k: state["layout"][k] for k in ("tp", "pp", "dp")}
        doc = {
            "format_version": 1,
            "step": step,
            **{k: v for k, v in state.items() if k != "config_yaml"},
            "layout": layout,
            "sharding": sharding,
        }
        (path / store.STATE_FILE).write_text(json.dumps(doc, indent=1))
    store._barrier()
    if rank == 0:
        store._write_atomic(path / "COMPLETE", "")
        store._write_atomic(Path(ckpt_dir) / "latest", tag + "\n")
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(Path(ckpt_dir) / old, ignore_errors=True)
    store._barrier()
    return tag
