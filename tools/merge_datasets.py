"""Concatenate several .bin/.idx datasets into one (same token dtype required).

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \
        --output-prefix data/ab_text_document

Documents keep their order: all of the first input, then the second, and so on. The output is
written under temporary names and renamed when complete, like tools/preprocess_data.py. The
inputs' tokenizer sidecars (``PREFIX.tokenizer/``) must agree; the output gets the same one.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt2.data.indexed import (  # noqa: E402
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
)
from megagpt2.data.sidecar import (  # noqa: E402
    commit_sidecar,
    discard_sidecar,
    read_dataset_tokenizer,
    same_identity,
    stage_sidecar,
)
from megagpt2.tokenizer import TokenizerError  # noqa: E402


def _merged_sidecar(prefixes: list[str], output_prefix: str):
    """Stage the output's sidecar: the inputs' common tokenizer (None when none has one)."""
    found = [(p, read_dataset_tokenizer(p)) for p in prefixes]
    sidecars = [s for _, s in found if s is not None]
    if not sidecars:
        return None
    for other in sidecars[1:]:
        if not same_identity(sidecars[0].identity, other.identity):
            raise TokenizerError(
                f"{sidecars[0].prefix} was built with {sidecars[0].describe()} but "
                f"{other.prefix} with {other.describe()}; datasets from different "
                "tokenizers cannot be merged"
            )
    for prefix, sidecar in found:
        if sidecar is None:
            print(
                f"note: {prefix} has no tokenizer sidecar; assuming it was built with "
                f"{sidecars[0].describe()} like {sidecars[0].prefix}",
                file=sys.stderr,
            )
    first = sidecars[0]
    return stage_sidecar(
        output_prefix,
        first.build(),
        first.info.get("eod_token"),
        {"merged_from": list(prefixes)},
        first.info.get("bos_token"),
        first.info.get("newline_token"),
    )


def merge(prefixes: list[str], output_prefix: str) -> IndexedDataset:
    """Write the concatenation of ``prefixes`` at ``output_prefix`` and open it."""
    if output_prefix in prefixes:
        raise ValueError(f"--output-prefix {output_prefix!r} is also an input; choose a new name")
    dtypes = {p: IndexedDataset(p).dtype for p in prefixes}  # validates every input first
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{p}: {t.__name__}" for p, t in dtypes.items())
        raise IndexedDatasetError(
            f"inputs have different token dtypes ({listing}); datasets from different tokenizers cannot be merged"
        )
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    staged = _merged_sidecar(prefixes, output_prefix)
    try:
        with IndexedDatasetBuilder(output_prefix + ".bin", dtypes[prefixes[0]]) as builder:
            for prefix in prefixes:
                builder.add_index(prefix)
            builder.finalize(output_prefix + ".idx", lambda: commit_sidecar(staged, output_prefix))
    except BaseException:
        discard_sidecar(staged)
        raise
    return IndexedDataset(output_prefix)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes (no .bin/.idx)")
    p.add_argument("--output-prefix", required=True, help="prefix of the merged dataset")
    args = p.parse_args(argv)
    try:
        merged = merge(args.input, args.output_prefix)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.output_prefix}.bin/.idx: {merged.num_documents:,} documents, "
        f"{merged.num_tokens:,} tokens from {len(args.input)} inputs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
