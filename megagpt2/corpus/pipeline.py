"""The preprocessing engine behind tools/preprocess_data.py: read -> clean -> dedup -> tokenize -> write.

Process layout (deterministic for any number of workers):

    main process     reads and parses inputs in order, cuts them into chunks of ~chunk_bytes,
                     decides duplicates in input order (DuplicateIndex), writes .bin/.idx
    worker processes per-document stages (repair, filters, dedup fingerprints, MinHash) and
                     tokenization of each chunk; results come back in submission order

Workers tokenize documents that may turn out to be duplicates (the decision needs the order);
the main process drops their tokens. That wastes a little work on duplicates but keeps every
expensive per-document stage parallel.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
from tqdm import tqdm

from megagpt2.corpus.cleaning import (
    DROP_REASONS,
    CleaningConfig,
    DocumentStages,
    DuplicateIndex,
    Processed,
)
from megagpt2.data.indexed import IndexedDatasetBuilder, dtype_for_vocab
from megagpt2.corpus.readers import expand_inputs, iter_records

log = logging.getLogger("preprocess_data")


@dataclass
class PipelineOptions:
    inputs: list[str]
    output_prefix: str
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    workers: int = 1
    chunk_bytes: int = 1 << 19
    progress: bool | None = None  # None: when stderr is a terminal
    log_errors: int = 100
    tokenizer_kwargs: dict = field(default_factory=dict)  # build_tokenizer(**tokenizer_kwargs)
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    prepend_bos: bool = False  # the tokenizer's document-start id before every document


# --- worker side ---------------------------------------------------------------------------

_WORKER: dict = {}  # per process: settings, tokenizer, DocumentStages


def _init_worker(settings: tuple, tokenizer=None) -> None:
    """Set up a worker; a no-op when the state was inherited through fork with equal settings."""
    if _WORKER.get("settings") == settings:
        return
    from megagpt2.tokenizer import build_tokenizer

    tokenizer_kwargs, append_eod, dtype, cleaning, prepend_bos = settings
    _WORKER.update(settings=settings, append_eod=append_eod, prepend_bos=prepend_bos, dtype=np.dtype(dtype),
                   tokenizer=tokenizer or build_tokenizer(**tokenizer_kwargs),
                   stages=DocumentStages(cleaning))


def _tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(all tokens back to back, tokens per document), BOS / EOD added when configured."""
    tokenizer = _WORKER["tokenizer"]
    ids = tokenizer.encode_batch(texts)
    if _WORKER["prepend_bos"]:
        ids = [[tokenizer.bos] + doc for doc in ids]
    if _WORKER["append_eod"]:
        for doc in ids:
            doc.append(tokenizer.eod)
    lengths = np.fromiter((len(doc) for doc in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=_WORKER["dtype"], count=int(lengths.sum()))
    return flat, lengths


def process_chunk(chunk: list[dict[str, str]]) -> dict:
    """Per-document stages and tokenization of one chunk (runs in a worker).

    Returns the drop reason of every document (None = passed), the dedup fingerprints of those
    that passed, their tokens per output key, and the CPU seconds each stage took.
    """
    stages: DocumentStages = _WORKER["stages"]
    before = dict(stages.seconds)
    docs = [stages.process(fields) for fields in chunk]
    passed = [d for d in docs if d.fields is not None]
    start = time.process_time()
    tokens = {k: _tokenize([d.fields[k] for d in passed]) for k in chunk[0]} if chunk else {}
    seconds = {k: v - before[k] for k, v in stages.seconds.items()}
    seconds["tokenize"] = time.process_time() - start
    return {"reasons": [d.reason for d in docs], "keys": [d.key for d in passed],
            "signatures": [d.signature for d in passed], "tokens": tokens, "seconds": seconds}


# --- main side -----------------------------------------------------------------------------


class _Progress:
    """Counts for the report and the progress bar (documents/s, MB/s of input)."""

    def __init__(self, enabled: bool | None) -> None:
        self.read, self.kept, self.bytes = 0, 0, 0
        self.dropped: Counter = Counter({reason: 0 for reason in DROP_REASONS})
        self.seconds: Counter = Counter()
        self.start = time.perf_counter()
        self._bar = tqdm(unit=" docs", disable=None if enabled is None else not enabled,
                         mininterval=1.0, dynamic_ncols=True)
        self._last = 0.0

    def tick(self) -> None:
        self._bar.update(self.read - self._bar.n)
        now = time.perf_counter()
        if now - self._last > 1.0:
            self._last = now
            mb_s = self.bytes / 1e6 / max(now - self.start, 1e-9)
            self._bar.set_postfix_str(f"{mb_s:.1f} MB/s, kept {self.kept:,}", refresh=False)

    def close(self) -> None:
        self._bar.close()


def _chunks(opts: PipelineOptions, progress: _Progress):
    """Readable records, as lists of field dicts of about ``chunk_bytes`` of primary text."""
    records = iter_records(expand_inputs(opts.inputs), opts.json_keys)
    chunk, size, logged = [], 0, 0
    while True:
        start = time.process_time()
        record = next(records, None)
        progress.seconds["read"] += time.process_time() - start
        if record is None:
            break
        progress.read += 1
        progress.bytes += record.nbytes
        if record.error:
            progress.dropped["malformed"] += 1
            if logged < opts.log_errors:
                log.warning("%s: %s (skipped)", record.where, record.error)
                logged += 1
                if logged == opts.log_errors:
                    log.warning("further bad records are counted but not logged")
            continue
        chunk.append(record.fields)
        size += len(record.fields[opts.json_keys[0]])
        if size >= opts.chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _ordered_results(chunks, workers: int, settings: tuple, tokenizer):
    """process_chunk results in input order; at most 4 chunks per worker in flight."""
    _init_worker(settings, tokenizer)  # workers forked below inherit this state
    if workers <= 1:
        yield from map(process_chunk, chunks)
        return
    context = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    with context.Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(process_chunk, (chunk,)))
            while len(pending) >= 4 * workers or (pending and pending[0].ready()):
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _write_result(result: dict, duplicates: DuplicateIndex, builders: dict, progress: _Progress,
                  tokens: Counter) -> None:
    """Decide duplicates in order and append the surviving documents' tokens."""
    for reason in result["reasons"]:
        if reason:
            progress.dropped[reason] += 1
    keep = np.ones(len(result["keys"]), dtype=bool)
    for i, (key, sig) in enumerate(zip(result["keys"], result["signatures"])):
        reason = duplicates.check(Processed(None, None, key, sig))
        if reason:
            progress.dropped[reason] += 1
            keep[i] = False
    progress.kept += int(keep.sum())
    start = time.process_time()
    for key, (flat, lengths) in result["tokens"].items():
        if not keep.all():
            flat, lengths = flat[np.repeat(keep, lengths)], lengths[keep]
        builders[key].add_documents(flat, lengths)
        tokens[key] += int(flat.size)
    progress.seconds["write"] += time.process_time() - start
    progress.seconds.update(result["seconds"])


def run_pipeline(opts: PipelineOptions, tokenizer) -> dict:
    """Preprocess ``opts.inputs`` into ``{output_prefix}_{key}_document.bin/.idx``; returns counts.

    ``tokenizer`` must be ``build_tokenizer(**opts.tokenizer_kwargs)`` (workers rebuild it from
    those arguments). Outputs appear under their final names only if the whole run succeeds.
    """
    dtype = np.dtype(dtype_for_vocab(tokenizer.vocab_size))
    expand_inputs(opts.inputs)  # fail on a missing input before creating outputs
    os.makedirs(os.path.dirname(os.path.abspath(opts.output_prefix)), exist_ok=True)
    paths = {k: f"{opts.output_prefix}_{k}_document" for k in opts.json_keys}
    builders = {k: IndexedDatasetBuilder(p + ".bin", dtype) for k, p in paths.items()}
    duplicates = DuplicateIndex(opts.cleaning)
    progress = _Progress(opts.progress)
    tokens: Counter = Counter({k: 0 for k in opts.json_keys})
    settings = (opts.tokenizer_kwargs, opts.append_eod, dtype.str, opts.cleaning, opts.prepend_bos)
    try:
        for result in _ordered_results(_chunks(opts, progress), opts.workers, settings, tokenizer):
            _write_result(result, duplicates, builders, progress, tokens)
            progress.tick()
        for key, builder in builders.items():
            builder.finalize(paths[key] + ".idx")
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    finally:
        progress.close()
    seconds = time.perf_counter() - progress.start
    progress.seconds.update(duplicates.seconds)
    return {
        "outputs": paths,
        "documents_read": progress.read,
        "documents_kept": progress.kept,
        "dropped": dict(progress.dropped),
        "tokens_written": dict(tokens),
        "input_bytes": progress.bytes,
        "wall_seconds": round(seconds, 3),
        "mb_per_second": round(progress.bytes / 1e6 / max(seconds, 1e-9), 3),
        "tokens_per_second": round(sum(tokens.values()) / max(seconds, 1e-9), 1),
        "stage_cpu_seconds": {k: round(v, 6) for k, v in progress.seconds.items()},
    }
