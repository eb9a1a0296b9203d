"""Turn WebText-style scrapes into Megatron MMIDIDX token files for pretraining.

    python tools/preprocess_data.py --input 'scrape/*.jsonl.zst' owt.tar docs/ \\
        --output-prefix data/webtext --append-eod --workers 2 --near-dedup

reads every input (jsonl/json with --json-keys, optionally .gz/.zst/.xz/.bz2; directories of .txt
documents; OpenWebText-style tar archives of .xz members; globs), cleans and deduplicates in input
order in this process, tokenizes in ``--workers`` processes (ordered, so the output is identical
for any worker count) and writes ``{prefix}_{key}_document.bin/.idx`` plus
``{prefix}_report.json``. Bad input (malformed JSON, bad UTF-8, corrupt archive members) is counted,
logged with its location and skipped. Outputs are written under temporary names and renamed only
when the run completes.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from itertools import chain

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt2.data.cleaning import DROP_REASONS, Cleaner, CleaningConfig  # noqa: E402
from megagpt2.data.indexed import IndexedDatasetBuilder, dtype_for_vocab  # noqa: E402
from megagpt2.data.readers import expand_inputs, iter_records  # noqa: E402
from megagpt2.tokenizer import add_tokenizer_args, build_tokenizer  # noqa: E402

log = logging.getLogger("preprocess_data")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input / output")
    io.add_argument("--input", nargs="+", required=True,
                    help="files, directories or globs (quote globs); any mix of formats")
    io.add_argument("--json-keys", nargs="+", default=["text"],
                    help="JSON fields to tokenize, one output per key; the first drives the filters")
    io.add_argument("--output-prefix", required=True,
                    help="outputs are {prefix}_{key}_document.bin/.idx and {prefix}_report.json")
    io.add_argument("--append-eod", action="store_true",
                    help="append the tokenizer's end-of-document id after every document")
    io.add_argument("--workers", type=int, default=1,
                    help="tokenizer processes (1 = tokenize in this process)")
    io.add_argument("--chunk-bytes", type=int, default=1 << 19,
                    help="text per work unit sent to a worker (default 512 KiB)")
    io.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar (default: when stderr is a terminal)")
    io.add_argument("--log-errors", type=int, default=100,
                    help="log at most this many bad records individually (all are counted)")
    add_tokenizer_args(p)
    c = p.add_argument_group("cleaning (each stage switchable)")
    c.add_argument("--no-clean", action="store_true", help="turn every cleaning stage off")
    c.add_argument("--fix-unicode", action=argparse.BooleanOptionalAction, default=True,
                   help="repair mojibake with ftfy (default on)")
    c.add_argument("--normalize-whitespace", action=argparse.BooleanOptionalAction, default=True,
                   help="unify line ends, trim, collapse spaces and blank lines (default on)")
    c.add_argument("--min-chars", type=int, default=0,
                   help="drop documents shorter than this many characters (default 0 = off)")
    c.add_argument("--max-non-alpha", type=float, default=1.0,
                   help="drop documents whose non-space characters are more than this fraction "
                        "non-letters (default 1.0 = off; 0.5 is a reasonable web-text value)")
    c.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True,
                   help="drop exact repeats (after case/whitespace normalisation; default on)")
    c.add_argument("--near-dedup", action=argparse.BooleanOptionalAction, default=False,
                   help="drop near-duplicates with MinHash LSH (default off)")
    c.add_argument("--near-dedup-threshold", type=float, default=0.8,
                   help="Jaccard similarity at which a document is a near-duplicate (default 0.8)")
    c.add_argument("--shingle", choices=("word", "char"), default="word",
                   help="near-dedup shingles: word n-grams or character k-grams (default word)")
    c.add_argument("--shingle-size", type=int, default=5, help="n of the n-grams (default 5)")
    c.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    return p


def cleaning_config(args: argparse.Namespace) -> CleaningConfig:
    if args.no_clean:
        return CleaningConfig(False, False, 0, 1.0, False, False)
    return CleaningConfig(args.fix_unicode, args.normalize_whitespace, args.min_chars,
                          args.max_non_alpha, args.dedup, args.near_dedup,
                          args.near_dedup_threshold, args.shingle, args.shingle_size,
                          args.num_perm)


# --- tokenization (runs in worker processes, or inline with --workers 1) ----------------------

_worker_state: dict = {}  # per worker process: the tokenizer and output settings


def _init_worker(tokenizer_kwargs: dict, append_eod: bool, dtype: str) -> None:
    _worker_state.update(tokenizer=build_tokenizer(**tokenizer_kwargs), append_eod=append_eod,
                         dtype=np.dtype(dtype))


def tokenize_chunk(chunk: dict[str, list[str]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (all tokens of the chunk's documents back to back, tokens per document)."""
    tokenizer, eod = _worker_state["tokenizer"], _worker_state["tokenizer"].eod
    out = {}
    for key, texts in chunk.items():
        ids = tokenizer.encode_batch(texts)
        if _worker_state["append_eod"]:
            for doc in ids:
                doc.append(eod)
        lengths = np.fromiter((len(doc) for doc in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=_worker_state["dtype"],
                           count=int(lengths.sum()))
        out[key] = (flat, lengths)
    return out


# --- the run -----------------------------------------------------------------------------------


class _Progress:
    """Counts for the report and the progress bar (documents/s, MB/s of input text)."""

    def __init__(self, enabled: bool | None) -> None:
        self.read, self.kept, self.bytes = 0, 0, 0
        self.dropped: Counter = Counter({reason: 0 for reason in DROP_REASONS})
        self.start = time.perf_counter()
        self._bar = tqdm(unit=" docs", disable=None if enabled is None else not enabled,
                         mininterval=1.0, dynamic_ncols=True)
        self._last = 0.0

    def tick(self, documents: int) -> None:
        self._bar.update(documents)
        now = time.perf_counter()
        if now - self._last > 1.0:
            self._last = now
            mb_s = self.bytes / 1e6 / max(now - self.start, 1e-9)
            self._bar.set_postfix_str(f"{mb_s:.1f} MB/s, kept {self.kept}", refresh=False)

    def close(self) -> None:
        self._bar.close()


def _chunks(args, cleaner: Cleaner, progress: _Progress):
    """Cleaned documents grouped into work units of about ``--chunk-bytes`` of text."""
    keys, logged = args.json_keys, 0
    chunk, size = {k: [] for k in keys}, 0
    for record in iter_records(expand_inputs(args.input), keys):
        progress.read += 1
        progress.bytes += record.nbytes
        if record.error:
            progress.dropped["malformed"] += 1
            if logged < args.log_errors:
                log.warning("%s: %s (skipped)", record.where, record.error)
                logged += 1
                if logged == args.log_errors:
                    log.warning("further bad records are counted but not logged")
            continue
        fields, reason = cleaner.clean(record.fields)
        if reason:
            progress.dropped[reason] += 1
            continue
        progress.kept += 1
        for key in keys:
            chunk[key].append(fields[key])
        size += len(fields[keys[0]])
        if size >= args.chunk_bytes:
            yield chunk
            chunk, size = {k: [] for k in keys}, 0
    if chunk[keys[0]]:
        yield chunk


def _ordered_results(chunks, workers: int, init_args: tuple):
    """Tokenized chunks in input order; at most 4 per worker in flight (bounded memory)."""
    if workers <= 1:
        _init_worker(*init_args)
        yield from map(tokenize_chunk, chunks)
        return
    context = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    with context.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(tokenize_chunk, (chunk,)))
            while len(pending) >= 4 * workers or (pending and pending[0].ready()):
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def preprocess(args: argparse.Namespace) -> dict:
    """Run the whole pipeline; returns the report that is also printed and saved."""
    tokenizer_kwargs = dict(tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file,
                            merge_file=args.merge_file, tokenizer_model=args.tokenizer_model,
                            eod_token=args.eod_token)
    tokenizer = build_tokenizer(**tokenizer_kwargs)  # fail on bad flags before reading anything
    dtype = np.dtype(dtype_for_vocab(tokenizer.vocab_size))
    expand_inputs(args.input)  # fail on a missing input before creating outputs
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: f"{args.output_prefix}_{k}_document" for k in args.json_keys}
    builders = {k: IndexedDatasetBuilder(p + ".bin", dtype) for k, p in paths.items()}
    cleaner = Cleaner(cleaning_config(args))
    progress = _Progress(args.progress)
    tokens = Counter({k: 0 for k in args.json_keys})
    try:
        results = _ordered_results(_chunks(args, cleaner, progress), args.workers,
                                   (tokenizer_kwargs, args.append_eod, dtype.str))
        for result in results:
            for key, (flat, lengths) in result.items():
                builders[key].add_documents(flat, lengths)
                tokens[key] += int(flat.size)
            progress.tick(len(lengths))
        for key, builder in builders.items():
            builder.finalize(paths[key] + ".idx")
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    finally:
        progress.close()
    report = _report(args, progress, tokens, cleaner, tokenizer, paths)
    _write_json(f"{args.output_prefix}_report.json", report)
    return report


def _report(args, progress: _Progress, tokens: Counter, cleaner: Cleaner, tokenizer,
            paths: dict) -> dict:
    seconds = time.perf_counter() - progress.start
    return {
        "inputs": list(args.input),
        "outputs": {k: p for k, p in paths.items()},
        "documents_read": progress.read,
        "documents_kept": progress.kept,
        "dropped": dict(progress.dropped),
        "tokens_written": dict(tokens),
        "input_bytes": progress.bytes,
        "wall_seconds": round(seconds, 3),
        "mb_per_second": round(progress.bytes / 1e6 / max(seconds, 1e-9), 3),
        "tokens_per_second": round(sum(tokens.values()) / max(seconds, 1e-9), 1),
        "stage_seconds": {k: round(v, 3) for k, v in cleaner.seconds.items()},
        "workers": args.workers,
        "append_eod": args.append_eod,
        "cleaning": vars(cleaner.config),
        "tokenizer": tokenizer.identity(),
    }


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def format_report(report: dict) -> str:
    lines = [
        f"documents read     {report['documents_read']:>12,}",
        f"documents kept     {report['documents_kept']:>12,}",
    ]
    lines += [f"  dropped {reason:<10} {n:>12,}" for reason, n in report["dropped"].items()]
    lines += [f"tokens written     {n:>12,}  ({k})" for k, n in report["tokens_written"].items()]
    lines.append(f"wall time          {report['wall_seconds']:>12.1f} s  "
                 f"({report['mb_per_second']:.2f} MB/s, "
                 f"{report['tokens_per_second']:,.0f} tokens/s, {report['workers']} workers)")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in report["stage_seconds"].items() if v)
    lines.append(f"cleaning time      {stages or 'none'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        build_parser().error(f"--workers must be >= 1, got {args.workers}")
    try:
        report = preprocess(args)
    except (ValueError, OSError) as err:  # bad flags or inputs: one clear line, no traceback
        log.error("%s", err)
        return 1
    print(format_report(report))
    for key, path in report["outputs"].items():
        print(f"wrote {path}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
