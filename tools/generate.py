#!/usr/bin/env python
"""Sample text from a megagpt2 checkpoint or a Hugging Face GPT-2 directory.

    # one prompt, top-k sampling
    python tools/generate.py --load checkpoints/run --prompt "The meaning of life is" --top-k 40
    # prompts from a file (one per line, or jsonl {"prompt": ...}), batched, greedy, to jsonl
    python tools/generate.py --load hf_gpt2 --prompt-file prompts.txt --greedy --batch-size 8 --output out.jsonl
    # chat with a dialogue fine-tuned model (keeps the last 6 utterances as context)
    python tools/generate.py --load checkpoints/chat --interactive --history-turns 6 --top-p 0.9
    # tensor parallel: one rank per shard
    torchrun --nproc_per_node 2 tools/generate.py --load checkpoints/run --tp 2 --prompt "Hello"

Decoding uses a KV cache; prompts of a batch are left-padded (a row's output does not depend on
the batch: row i of the whole prompt list samples with seed --seed + i). Generation stops at the
end-of-document token (unless --no-stop-at-eod), at a --stop string (cut from the output), or
after --max-new-tokens. The chat prompt is the fine-tuning layout of docs/finetuning.md.
The tokenizer's unknown token ([UNK]) is never generated (unless --allow-unk), nor its padding
token, nor its document-start token while generation stops at the end of the document; special
tokens are left out of the printed text. When the tokenizer has a document-start token (--bos-token, or the
checkpoint's tokenizer.bos_token) every prompt starts with it; a prompt may also name special
tokens itself ("[CLS]床前明月光" with a BERT vocabulary).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

from megagpt2.distributed import finish_distributed  # noqa: E402
from megagpt2.eval.loading import ModelLoadError, add_model_args, model_from_args  # noqa: E402
from megagpt2.generation import SamplingConfig, generate, never_generated  # noqa: E402


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p)
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompt-file", default=None, help='one prompt per line, or jsonl with {"prompt": ...}')
    g.add_argument("--interactive", action="store_true", help="chat loop on stdin (empty line or /quit ends)")
    g.add_argument("--history-turns", type=int, default=6, help="chat: previous utterances kept as context")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0, help="0 = off")
    s.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off; 1.2 is typical")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable); cut from the output")
    s.add_argument("--no-stop-at-eod", action="store_true", help="keep going past the end-of-document token")
    s.add_argument("--allow-unk", action="store_true", help="let the unknown token ([UNK]) be generated")
    s.add_argument("--ban-token", action="append", default=[], help="a token never to generate (repeatable)")
    o = p.add_argument_group("output")
    o.add_argument("--batch-size", type=int, default=8)
    o.add_argument("--output", default=None, help="write {prompt, completion, tokens} per line (jsonl)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.history_turns < 0:
        p.error("--batch-size must be >= 1 and --history-turns >= 0")
    if not args.interactive and not args.prompt and not args.prompt_file:
        p.error("give --prompt, --prompt-file or --interactive")
    return args


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    prompts.append(str(json.loads(line)["prompt"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f'{path}:{n}: expected a JSON object with a "prompt" field') from None
            else:
                prompts.append(line)
    for i, text in enumerate(prompts):
        if not text:
            raise ValueError(f"prompt {i} is empty: give some text to continue")
    return prompts


def banned_tokens(tokenizer, args) -> tuple[int, ...]:
    """Ids never generated: --ban-token tokens and megagpt2.generation.never_generated's specials."""
    banned = [tokenizer.token_id(t, "--ban-token") for t in getattr(args, "ban_token", [])]
    specials = never_generated(tokenizer, getattr(args, "allow_unk", False), not args.no_stop_at_eod)
    return tuple(sorted({*banned, *specials}))


def sampling_config(args, tokenizer, max_new: Optional[int] = None) -> SamplingConfig:
    cfg = SamplingConfig(
        max_new_tokens=max_new or args.max_new_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop_token=None if args.no_stop_at_eod else tokenizer.eod,
        seed=args.seed,
        banned_tokens=banned_tokens(tokenizer, args),
    )
    cfg.validate()
    return cfg


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Ids of a prompt, starting with the document-start token when the tokenizer has one."""
    ids = tokenizer.encode(text)
    if tokenizer.bos is not None and ids[:1] != [tokenizer.bos]:
        ids = [tokenizer.bos] + ids
    return ids


def complete(
    model, tokenizer, ids: list[list[int]], args, first_index: int, stops: list[str]
) -> tuple[list[str], list[list[int]]]:
    """Texts (cut at a stop string or the end-of-document token) and raw tokens of one batch."""
    n_ctx = model.cfg.n_positions
    longest = max(len(x) for x in ids)
    if longest >= n_ctx:
        raise ValueError(f"a prompt has {longest} tokens; the model's context is {n_ctx}: shorten it")
    cfg = sampling_config(args, tokenizer, min(args.max_new_tokens, n_ctx - longest))

    def stop_fn(row: int, toks: list[int]) -> bool:
        text = tokenizer.decode(toks[-64:], skip_special_tokens=True)  # a stop string ends within the last tokens
        return any(s in text for s in stops)

    rows = generate(
        model,
        ids,
        cfg,
        pad_id=tokenizer.eod,
        seeds=[args.seed + first_index + r for r in range(len(ids))],
        stop_fn=stop_fn if stops else None,
    )
    texts = []
    for r in rows:
        body = r[:-1] if (cfg.stop_token is not None and r and r[-1] == cfg.stop_token) else r
        text = tokenizer.decode(body, skip_special_tokens=True)
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        texts.append(text[:cut] if cut >= 0 else text)
    return texts, rows


def run_prompts(model, tokenizer, args, rank0: bool) -> None:
    prompts = read_prompts(args)
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    for i, x in enumerate(ids):
        if not x:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) encodes to no tokens")
    out = open(args.output, "w", encoding="utf-8") if (args.output and rank0) else None
    n_new, t0 = 0, time.time()
    try:
        for start in range(0, len(ids), args.batch_size):
            texts, rows = complete(model, tokenizer, ids[start : start + args.batch_size], args, start, args.stop)
            n_new += sum(len(r) for r in rows)
            for j, (text, row) in enumerate(zip(texts, rows)):
                prompt = prompts[start + j]
                if rank0:
                    print(f"=== [{start + j}] {prompt}{text}", flush=True)
                if out is not None:
                    out.write(json.dumps({"prompt": prompt, "completion": text, "tokens": row}) + "\n")
    finally:
        if out is not None:
            out.close()
    dt = time.time() - t0
    if rank0:
        print(
            f"generated {n_new} tokens for {len(ids)} prompts in {dt:.2f} s ({n_new / max(dt, 1e-9):.1f} tokens/s)",
            file=sys.stderr,
            flush=True,
        )


def _read_line(rank0: bool) -> Optional[str]:
    """Rank 0 reads the user's line; with TP every rank gets it."""
    line = [None]
    if rank0:
        try:
            line[0] = input("user> ")
        except EOFError:
            line[0] = None
    if dist.is_initialized():
        dist.broadcast_object_list(line, src=0)
    return line[0]


def chat(model, tokenizer, args, rank0: bool) -> None:
    """GPT2-chitchat style loop: the last --history-turns utterances plus the new one as context."""
    from megagpt2.data.finetune import chat_prompt

    history: list[list[int]] = []
    turn = 0
    while True:
        line = _read_line(rank0)
        if line is None or line.strip() in ("", "/quit", "/exit"):
            return
        user = tokenizer.encode(line)
        window = (history[-args.history_turns :] if args.history_turns else []) + [user]
        if len(window) % 2 == 0:
            window = window[1:]  # start with a user turn, as in training
        budget = model.cfg.n_positions - args.max_new_tokens
        if budget < 2:
            raise ValueError(
                f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the "
                f"model's context of {model.cfg.n_positions} tokens"
            )
        try:
            prompt = chat_prompt(window, tokenizer.eod, budget, tokenizer.bos)
        except ValueError as e:
            if rank0:
                print(f"error: {e}; say something shorter", file=sys.stderr, flush=True)
            continue
        t0 = time.time()
        texts, rows = complete(model, tokenizer, [prompt], args, turn, args.stop)
        if rank0:
            print(f"bot> {texts[0].strip()}", flush=True)
            print(
                f"({len(rows[0])} tokens, {len(rows[0]) / max(time.time() - t0, 1e-9):.1f} tokens/s)",
                file=sys.stderr,
                flush=True,
            )
        bot = rows[0][:-1] if rows[0] and rows[0][-1] == tokenizer.eod else rows[0]
        history += [user, tokenizer.encode(texts[0]) if args.stop else bot]
        turn += 1


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        model, tokenizer, _, groups = model_from_args(args)
        rank0 = groups.layout.rank == 0
        if args.interactive:
            chat(model, tokenizer, args, rank0)
        else:
            run_prompts(model, tokenizer, args, rank0)
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finish_distributed()  # with --tp under torchrun: every rank done, then the groups end
    return 0


if __name__ == "__main__":
    sys.exit(main())
