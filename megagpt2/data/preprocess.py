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

import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from megagpt2.corpus.cleaning import CleaningConfig, DocumentStages, DuplicateIndex, Processed
from megagpt2.corpus.progress import Progress
from megagpt2.corpus.readers import InputPosition, expand_inputs, iter_records
from megagpt2.data.indexed import IndexedDatasetBuilder, dtype_for_vocab
from megagpt2.data.sidecar import commit_sidecar, discard_sidecar, stage_sidecar

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


def _start_pool_worker(settings: tuple) -> None:
    """A pool worker's first step: die on SIGTERM, whatever handler it inherited through fork
    (the pool ends its workers with SIGTERM; a caller's handler that does not exit, such as a
    trainer's stop request, left the pool waiting for its workers forever), then `_init_worker`."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(settings)


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
    before, repairs_before = dict(stages.seconds), Counter(stages.repairs)
    docs = [stages.process(fields) for fields in chunk]
    passed = [d for d in docs if d.fields is not None]
    start = time.process_time()
    texts = [d.fields for d in passed if d.fields is not None]  # all of them: passed means kept
    tokens = {k: _tokenize([f[k] for f in texts]) for k in chunk[0]} if chunk else {}
    seconds = {k: v - before[k] for k, v in stages.seconds.items()}
    seconds["tokenize"] = time.process_time() - start
    return {"reasons": [d.reason for d in docs], "keys": [d.key for d in passed],
            "signatures": [d.signature for d in passed], "tokens": tokens, "seconds": seconds,
            "repairs": stages.repairs - repairs_before}


# --- main side -----------------------------------------------------------------------------


def _log_limited(opts: PipelineOptions, logged: int, msg: str, *args) -> int:
    """Log the first ``opts.log_errors`` problems individually; returns the new count."""
    if logged < opts.log_errors:
        log.warning(msg, *args)
        logged += 1
        if logged == opts.log_errors:
            log.warning("further bad or repaired records are counted but not logged")
    return logged


def _chunks(opts: PipelineOptions, progress: Progress):
    """Readable records, as lists of field dicts of about ``chunk_bytes`` of primary text."""
    records = iter_records(expand_inputs(opts.inputs), opts.json_keys, progress.position)
    chunk, size, logged = [], 0, 0
    while True:
        start = time.process_time()
        record = next(records, None)
        progress.seconds["read"] += time.process_time() - start  # pyright: ignore[reportArgumentType]  (a Counter of floats)
        if record is None:
            break
        progress.read += 1
        progress.bytes += record.nbytes
        if record.error:
            progress.dropped["malformed"] += 1
            logged = _log_limited(opts, logged, "%s: %s (skipped)", record.where, record.error)
            continue
        if record.repaired:
            progress.repairs.update(invalid_utf8_documents=1, invalid_utf8_sequences=record.repaired)
            logged = _log_limited(opts, logged, "%s: %d invalid UTF-8 sequence(s) replaced by U+FFFD",
                                  record.where, record.repaired)
        fields = record.fields
        assert fields is not None  # a record without an error has fields
        chunk.append(fields)
        size += len(fields[opts.json_keys[0]])
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
    with context.Pool(workers, initializer=_start_pool_worker, initargs=(settings,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(process_chunk, (chunk,)))
            while len(pending) >= 4 * workers or (pending and pending[0].ready()):
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _write_result(result: dict, duplicates: DuplicateIndex, builders: dict, progress: Progress,
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
    progress.tokens = sum(tokens.values())
    progress.seconds["write"] += time.process_time() - start  # pyright: ignore[reportArgumentType]
    progress.seconds.update(result["seconds"])
    progress.repairs.update(result["repairs"])


class EmptyOutputError(ValueError):
    """Preprocessing would write a dataset with nothing to train on; no output is written."""


def _empty_output(opts: PipelineOptions, progress: Progress, tokens: Counter) -> str | None:
    """Why the output would be empty, or None when every output has tokens."""
    if progress.read == 0:
        return (f"no input records: {' '.join(opts.inputs)} hold(s) no documents (empty files, or no "
                f"supported files in the directories or archives); nothing was written")
    if progress.kept == 0:
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in progress.dropped.most_common() if n)
        return (f"every document was dropped ({progress.read:,} read: {reasons}; the warnings above say where); "
                f"nothing was written. Check --json-keys and the input format, or the --clean filters")
    empty = [k for k in opts.json_keys if tokens[k] == 0]
    if empty:
        return (f"the {progress.kept:,} documents kept tokenize to no tokens in {', '.join(map(repr, empty))} "
                f"(all empty text; --append-eod would at least mark them); nothing was written")
    return None


def run_pipeline(opts: PipelineOptions, tokenizer) -> dict:
    """Preprocess ``opts.inputs`` into ``{output_prefix}_{key}_document.bin/.idx``; returns counts.

    Each output gets its tokenizer sidecar (``{dataset}.tokenizer/``, megagpt2.data.sidecar).
    ``tokenizer`` must be ``build_tokenizer(**opts.tokenizer_kwargs)`` (workers rebuild it from
    those arguments). Outputs appear under their final names only if the whole run succeeds, and
    only if every output has tokens (else EmptyOutputError says why: no input records, every
    document dropped, or nothing left after tokenizing).
    """
    dtype = np.dtype(dtype_for_vocab(tokenizer.vocab_size))
    inputs = expand_inputs(opts.inputs)  # fail on a missing input before creating outputs
    os.makedirs(os.path.dirname(os.path.abspath(opts.output_prefix)), exist_ok=True)
    paths = {k: f"{opts.output_prefix}_{k}_document" for k in opts.json_keys}
    builders = {k: IndexedDatasetBuilder(p + ".bin", dtype) for k, p in paths.items()}
    duplicates = DuplicateIndex(opts.cleaning)
    progress = Progress(InputPosition(inputs), opts.progress)
    tokens: Counter = Counter({k: 0 for k in opts.json_keys})
    settings = (opts.tokenizer_kwargs, opts.append_eod, dtype.str, opts.cleaning, opts.prepend_bos)
    staged: dict[str, str] = {}
    try:
        for result in _ordered_results(_chunks(opts, progress), opts.workers, settings, tokenizer):
            _write_result(result, duplicates, builders, progress, tokens)
            progress.tick()
        why = _empty_output(opts, progress, tokens)
        if why:
            raise EmptyOutputError(why)
        built_with = {"append_eod": opts.append_eod, "prepend_bos": opts.prepend_bos,
                      "cleaning": dataclasses.asdict(opts.cleaning)}
        kw = opts.tokenizer_kwargs
        for key in builders:
            staged[key] = stage_sidecar(paths[key], tokenizer, kw.get("eod_token"), built_with,
                                        kw.get("bos_token"), kw.get("newline_token"))
        for key, builder in builders.items():
            builder.finalize(paths[key] + ".idx", lambda k=key: commit_sidecar(staged.pop(k), paths[k]))
    except BaseException:
        for builder in builders.values():
            builder.abort()
        for tmp in staged.values():
            discard_sidecar(tmp)
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
        "repairs": dict(progress.repairs),
        "tokens_written": dict(tokens),
        "input_bytes": progress.bytes,
        "wall_seconds": round(seconds, 3),
        "mb_per_second": round(progress.bytes / 1e6 / max(seconds, 1e-9), 3),
        "tokens_per_second": round(sum(tokens.values()) / max(seconds, 1e-9), 1),
        "stage_cpu_seconds": {k: round(v, 6) for k, v in progress.seconds.items()},
    }
