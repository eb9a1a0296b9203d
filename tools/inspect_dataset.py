"""Print the counts of a .bin/.idx dataset and, optionally, decode some of its documents.

    python tools/inspect_dataset.py --prefix data/webtext_text_document --doc 0 --doc 17

Documents are decoded with the tokenizer the dataset was built with (its sidecar,
``PREFIX.tokenizer/``), else GPT-2 BPE; tokenizer flags choose one explicitly and are refused
when the sidecar records another. ``--ids`` prints token ids instead of text.
Special tokens are left out of the text unless ``--show-special`` (readable Chinese with a BERT
vocabulary, its ``--newline-token`` shown as line breaks).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt2.config import DataConfig  # noqa: E402
from megagpt2.data.indexed import IndexedDataset  # noqa: E402
from megagpt2.data.run_tokenizer import resolve_tokenizer, tokenizer_from_flags  # noqa: E402
from megagpt2.data.sidecar import read_dataset_tokenizer, sidecar_dir  # noqa: E402
from megagpt2.tokenizer import add_tokenizer_args  # noqa: E402


def summary(ds: IndexedDataset) -> str:
    """Counts and length statistics, one per line."""
    cumulative = np.concatenate([[0], np.cumsum(ds.sizes, dtype=np.int64)])
    doc_tokens = cumulative[ds.doc_idx[1:]] - cumulative[ds.doc_idx[:-1]]  # (documents,)
    lines = [
        f"prefix      {ds.prefix}",
        f"dtype       {np.dtype(ds.dtype).name}",
        f"documents   {ds.num_documents:,}",
        f"sequences   {len(ds):,}",
        f"tokens      {ds.num_tokens:,}",
    ]
    if ds.num_documents:
        lines.append(f"doc tokens  min {doc_tokens.min():,}  mean {doc_tokens.mean():,.1f}  max {doc_tokens.max():,}")
    sidecar = read_dataset_tokenizer(ds.prefix)
    lines.append(
        f"tokenizer   {sidecar.describe()} ({sidecar_dir(ds.prefix)}/)"
        if sidecar
        else f"tokenizer   not recorded (no {sidecar_dir(ds.prefix)}/)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefix", required=True, help="dataset prefix (no .bin/.idx)")
    p.add_argument(
        "--doc",
        type=int,
        action="append",
        default=[],
        help="document number to print (repeatable; negative counts from the end)",
    )
    p.add_argument("--ids", action="store_true", help="print token ids instead of decoded text")
    p.add_argument(
        "--show-special", action="store_true", help="keep special tokens ([CLS], <|endoftext|> ...) in the decoded text"
    )
    add_tokenizer_args(p)
    p.set_defaults(tokenizer_type=None)  # None: the dataset's own tokenizer
    args = p.parse_args(argv)
    try:
        ds = IndexedDataset(args.prefix)
        print(summary(ds))
        tokenizer = None
        if args.doc and not args.ids:
            resolved = resolve_tokenizer(
                tokenizer_from_flags(args), DataConfig(path=args.prefix), explicit="the --tokenizer-* flags"
            )
            print(resolved.summary())
            tokenizer = resolved.tokenizer
    except ValueError as err:  # TokenizerError and IndexedDatasetError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 1
    for n in args.doc:
        d = n + ds.num_documents if n < 0 else n
        if not 0 <= d < ds.num_documents:
            print(f"error: document {n} out of range (0..{ds.num_documents - 1})", file=sys.stderr)
            return 1
        tokens = ds.document(d)
        print(f"--- document {d} ({len(tokens)} tokens) ---")
        if tokenizer is None:
            print(tokens.tolist())
        else:
            print(tokenizer.decode(tokens.tolist(), skip_special_tokens=not args.show_special))
    return 0


if __name__ == "__main__":
    sys.exit(main())
