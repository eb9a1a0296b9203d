#!/usr/bin/env python
"""Convert megagpt2 weights between layouts, or to / from Hugging Face GPT-2.

    # a training checkpoint (any tp x pp) -> weights pre-sharded for tp=4 (any pp loads them)
    python tools/convert_checkpoint.py --input checkpoints/run/step_00001000 --output ckpt_tp4 --tp 4
    # -> Hugging Face directory: weights, config, generation_config.json and the tokenizer files
    #    (AutoTokenizer + AutoModelForCausalLM.from_pretrained read it with nothing else)
    python tools/convert_checkpoint.py --input checkpoints/run --output hf_gpt2 --to hf
    # Hugging Face GPT-2 -> megagpt2 weights for tp=2
    python tools/convert_checkpoint.py --input hf_gpt2 --output ckpt_tp2 --tp 2

The input may be a training checkpoint of any layout and either format (the layout-free one gives
its fp32 master weights, so a bf16 run converts without rounding), a converted directory or a
Hugging Face directory. Start fine-tuning or a new run from the result with
--train.init_from=<output> (weights only, a fresh optimizer). To continue the same run under
another layout no conversion is needed: it resumes directly, optimizer state included
(docs/checkpoints.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # torch dtype names (torch loads after --help)


def export_hf(args, meta: dict, full: dict, cfg) -> int:
    """Weights, config, generation_config.json and tokenizer files; 2 when the tokenizer is wrong."""
    from megagpt2.eval.loading import ModelLoadError, check_tokenizer, default_tokenizer, tokenizer_from_flags
    from megagpt2.interop import save_hf_dir
    from megagpt2.interop.hf_tokenizer import check_tokenizer_export

    try:
        tokenizer = tokenizer_from_flags(args) or default_tokenizer(meta, args.input)
        check_tokenizer(meta, tokenizer, cfg.vocab_size, args.input)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    written = save_hf_dir({k: (v.to(dtype) if dtype else v) for k, v in full.items()}, cfg, args.output, tokenizer)
    print(f"wrote {', '.join(written)}")
    problem = check_tokenizer_export(tokenizer, args.output)
    if problem:
        print(f"warning: the exported tokenizer does not encode as megagpt2 does: {problem}", file=sys.stderr)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--input", required=True, help="checkpoint dir, step_* tag, converted dir or HF dir")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--to", choices=("megagpt2", "hf"), default="megagpt2", help="output format")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the output (megagpt2 format)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    from megagpt2.tokenizer import add_tokenizer_args

    add_tokenizer_args(p)  # --to hf: the tokenizer to export (default: the one the checkpoint records)
    p.set_defaults(tokenizer_type=None)
    args = p.parse_args(argv)
    if args.tp < 1:
        p.error("--tp must be >= 1")
    import torch

    from megagpt2.checkpoint.reshard import default_sharding, read_weights, write_converted

    t0 = time.time()
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    try:
        meta, full = read_weights(args.input)
    except (FileNotFoundError, RuntimeError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megagpt2.config import config_from_dict

    cfg = config_from_dict({"model": meta["config"]["model"]}).model
    n = sum(t.numel() for t in full.values())
    print(f"read {len(full)} tensors ({n / 1e6:.1f}M parameters) from {args.input}")
    if args.to == "hf":
        code = export_hf(args, meta, full, cfg)
        if code:
            return code
    else:
        sharding = meta.get("sharding") or default_sharding(full)
        for name, (dim, stride) in sharding.items():
            if dim is not None and full[name].shape[dim] % (args.tp * stride):
                print(
                    f"error: {name} of shape {tuple(full[name].shape)} cannot be split over tp={args.tp}",
                    file=sys.stderr,
                )
                return 2
        write_converted(full, sharding, meta, args.output, args.tp, dtype)
    print(f"wrote {args.output} ({args.to}{'' if args.to == 'hf' else f', tp={args.tp}'}) in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
