"""Turn WebText-style scrapes into Megatron MMIDIDX token files for pretraining.

    python tools/preprocess_data.py --input 'scrape/*.jsonl.zst' owt.tar docs/ \\
        --output-prefix data/webtext --append-eod --workers 2 --clean web

reads every input (jsonl/json with --json-keys, optionally .gz/.zst/.xz/.bz2; directories of .txt
documents; OpenWebText-style tar archives of .xz members; globs), cleans (by default losslessly:
see --clean) and tokenizes in ``--workers`` processes, deduplicates (when asked) in input order in
this process (so the output is identical for any worker count) and writes
``{prefix}_{key}_document.bin/.idx``, the tokenizer sidecar ``{prefix}_{key}_document.tokenizer/``
(which the trainer, inspect_dataset.py and evaluate.py use when given no tokenizer) and
``{prefix}_report.json``. Bad input (malformed JSON, corrupt archive members) is counted, logged
with its location and skipped; invalid UTF-8 is repaired (U+FFFD) and counted. Outputs are written
under temporary names and renamed only when the run completes; a run that would write no tokens
(no input records, every document dropped) writes nothing and exits 1 saying why. See docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt2.corpus.cleaning import add_cleaning_args, cleaning_from_args  # noqa: E402
from megagpt2.corpus.readers import expand_inputs  # noqa: E402
from megagpt2.data.preprocess import EmptyOutputError, PipelineOptions, run_pipeline  # noqa: E402
from megagpt2.data.sidecar import sidecar_dir  # noqa: E402
from megagpt2.tokenizer import TOKENIZER_FLAGS, add_tokenizer_args, build_tokenizer  # noqa: E402

log = logging.getLogger("preprocess_data")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    io = p.add_argument_group("input / output")
    io.add_argument(
        "--input", nargs="+", required=True, help="files, directories or globs (quote globs); any mix of formats"
    )
    io.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="JSON fields to tokenize, one output per key; the first drives the filters",
    )
    io.add_argument(
        "--output-prefix", required=True, help="outputs are {prefix}_{key}_document.bin/.idx and {prefix}_report.json"
    )
    io.add_argument(
        "--append-eod", action="store_true", help="append the tokenizer's end-of-document id after every document"
    )
    io.add_argument(
        "--prepend-bos",
        action="store_true",
        help="put the document-start token (--bos-token) before every document "
        "(GPT2-Chinese: --bos-token [MASK] --eod-token [CLS] --append-eod)",
    )
    io.add_argument(
        "--workers", type=int, default=1, help="processes that clean and tokenize (1 = all in this process)"
    )
    io.add_argument(
        "--chunk-bytes", type=int, default=1 << 19, help="text per work unit sent to a worker (default 512 KiB)"
    )
    io.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    io.add_argument(
        "--log-errors", type=int, default=100, help="log at most this many bad records individually (all are counted)"
    )
    add_tokenizer_args(p)
    add_cleaning_args(p)
    return p


def prepare(args: argparse.Namespace):
    """(PipelineOptions, tokenizer) for parsed arguments.

    Bad flags or inputs raise ValueError (TokenizerError is one) before any output is created.
    """
    tokenizer_kwargs = {flag: getattr(args, flag) for flag in TOKENIZER_FLAGS}
    tokenizer = build_tokenizer(**tokenizer_kwargs)
    if args.prepend_bos and tokenizer.bos is None:
        raise ValueError(
            "--prepend-bos needs a document-start token: pass --bos-token (for example "
            "[MASK] or [CLS] with a BERT vocabulary)"
        )
    expand_inputs(args.input)  # a missing or unsupported input fails here
    opts = PipelineOptions(
        args.input,
        args.output_prefix,
        args.json_keys,
        args.append_eod,
        args.workers,
        args.chunk_bytes,
        args.progress,
        args.log_errors,
        tokenizer_kwargs,
        cleaning_from_args(args),
        args.prepend_bos,
    )
    return opts, tokenizer


def preprocess(args: argparse.Namespace) -> dict:
    """Run the pipeline for parsed arguments; returns the report that is also printed and saved."""
    return _run(args, *prepare(args))


def _run(args: argparse.Namespace, opts: PipelineOptions, tokenizer) -> dict:
    report = run_pipeline(opts, tokenizer)
    report.update(
        inputs=list(args.input),
        workers=args.workers,
        append_eod=args.append_eod,
        prepend_bos=args.prepend_bos,
        clean=args.clean,
        cleaning=vars(opts.cleaning),
        tokenizer=tokenizer.identity(),
    )
    _write_json(f"{args.output_prefix}_report.json", report)
    return report


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def format_report(report: dict) -> str:
    rows = [("documents read", f"{report['documents_read']:,}"), ("documents kept", f"{report['documents_kept']:,}")]
    rows += [(f"  dropped {reason}", f"{n:,}") for reason, n in report["dropped"].items()]
    rep = report["repairs"]
    rows.append(
        (
            "repaired invalid UTF-8",
            f"{rep['invalid_utf8_documents']:,}",
            f"  (documents; {rep['invalid_utf8_sequences']:,} sequences -> U+FFFD)",
        )
    )
    rows.append(("removed NUL", f"{rep['nul_documents']:,}", f"  (documents; {rep['nul_characters']:,} characters)"))
    rows += [(f"tokens written ({k})", f"{n:,}") for k, n in report["tokens_written"].items()]
    rows.append(("wall time", f"{report['wall_seconds']:.2f} s"))
    lines = [f"{label:<26}{value:>14}{note[0] if note else ''}" for label, value, *note in rows]
    lines[-1] += (
        f"  ({report['mb_per_second']:.2f} MB/s, {report['tokens_per_second']:,.0f} "
        f"tokens/s, {report['workers']} workers)"
    )
    stages = ", ".join(f"{k} {v:.2f}" for k, v in report["stage_cpu_seconds"].items() if v)
    lines.append(f"{'stage CPU seconds':<26}{stages}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        build_parser().error(f"--workers must be >= 1, got {args.workers}")
    try:  # validation only: errors during the run itself keep their traceback
        opts, tokenizer = prepare(args)
    except ValueError as err:  # bad flags or inputs: one clear line
        log.error("%s", err)
        return 1
    try:
        report = _run(args, opts, tokenizer)
    except EmptyOutputError as err:  # a dataset with nothing to train on is a failure, not an empty success
        log.error("%s", err)
        return 1
    print(format_report(report))
    for _key, path in report["outputs"].items():
        print(f"wrote {path}.bin/.idx and {sidecar_dir(path)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
