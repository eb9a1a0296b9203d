"""Sample-index, split, blending, cache and resume tests of the GPT dataset."""

import os
from collections import Counter, defaultdict

import numpy as np
import pytest

from megagpt2.data.blending import parse_data_path, split_ranges
from megagpt2.data.gpt_dataset import GPTDataset, build_gpt_datasets
from megagpt2.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megagpt2.data.sample_index import blend_index, build_sample_index
from megagpt2.data.sampler import PretrainingSampler, build_pretraining_data_loader


def _make(prefix, num_docs, base=0, seed=0, max_len=40):
    """Documents whose tokens are unique: token = base + 1000 * doc + position."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, size=num_docs)
    lengths[0] = max(lengths[0], 1)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    docs = []
    for d, n in enumerate(lengths):
        docs.append(base + 1000 * d + np.arange(n))
        builder.add_document(docs[-1])
    builder.finalize(prefix + ".idx")
    return docs


def _dataset(prefix, seq_length, seed, num_samples, docs=None):
    indexed = IndexedDataset(prefix)
    docs = np.arange(len(indexed)) if docs is None else docs
    ix = build_sample_index(indexed.sizes, docs, seq_length, seed, num_samples)
    return GPTDataset(indexed, ix.doc_idx, ix.sample_idx, ix.shuffle_idx, seq_length)


@pytest.mark.parametrize("seq_length", [1, 7, 16, 64])
def test_every_token_in_exactly_the_expected_samples(tmp_path, seq_length):
    prefix = str(tmp_path / "d")
    docs = _make(prefix, 30)
    total = sum(len(d) for d in docs)
    ds = _dataset(prefix, seq_length, seed=3, num_samples=(total - 1) // seq_length)
    num_built = len(ds.sample_idx) - 1
    assert num_built == -(-total // seq_length)  # one epoch: every sample starting in it
    # The token stream in the order the index reads documents (epoch 0, then the tail).
    stream = np.concatenate([docs[d] for d in ds.doc_idx])
    expected, seen = defaultdict(set), defaultdict(set)
    for p in range(num_built * seq_length + 1):
        owners = {p // seq_length} - {num_built}
        if p % seq_length == 0 and p > 0:
            owners.add(p // seq_length - 1)  # also the previous sample's last token (its target)
        expected[int(stream[p])] |= owners
    for s in range(num_built):
        sample = ds.sample(s)
        assert sample.tolist() == stream[s * seq_length : s * seq_length + seq_length + 1].tolist()
        for token in sample:
            seen[int(token)].add(s)
    assert seen == expected
    assert set(np.concatenate(docs).tolist()) <= set(seen)  # every token of every document
    # Served samples are distinct samples of the first epoch, each the right window.
    assert len(set(ds.shuffle_idx.tolist())) == len(ds) and ds.shuffle_idx.max() < num_built
    for i in range(len(ds)):
        s = int(ds.shuffle_idx[i])
        window = stream[s * seq_length : s * seq_length + seq_length + 1]
        assert ds[i]["tokens"].tolist() == window.tolist()


def test_epochs_are_permutations_and_shuffled_within_epoch(tmp_path):
    prefix = str(tmp_path / "d")
    docs = _make(prefix, 20)
    total = sum(len(d) for d in docs)
    seq = 8
    ds = _dataset(prefix, seq, seed=1, num_samples=3 * total // seq)
    per_epoch = ds.doc_idx[: (len(ds.doc_idx) // 20) * 20].reshape(-1, 20)
    assert len(per_epoch) >= 3
    for row in per_epoch:
        assert sorted(row.tolist()) == list(range(20))
    assert not all((row == per_epoch[0]).all() for row in per_epoch[1:])
    epoch_of = (ds.shuffle_idx * seq) // total
    assert (np.diff(epoch_of) >= 0).all()  # every sample of epoch e before any of epoch e+1
    assert not (np.diff(ds.shuffle_idx) == 1).all()  # but shuffled inside the epoch


def test_same_seed_same_order_and_prefix_stable(tmp_path):
    prefix = str(tmp_path / "d")
    _make(prefix, 25)
    a = _dataset(prefix, 16, seed=5, num_samples=200)
    b = _dataset(prefix, 16, seed=5, num_samples=200)
    c = _dataset(prefix, 16, seed=6, num_samples=200)
    longer = _dataset(prefix, 16, seed=5, num_samples=1000)
    items = [a[i]["tokens"].tolist() for i in range(200)]
    assert items == [b[i]["tokens"].tolist() for i in range(200)]
    assert items != [c[i]["tokens"].tolist() for i in range(200)]
    assert items == [longer[i]["tokens"].tolist() for i in range(200)]


def test_split_ranges_and_disjoint_splits(tmp_path):
    assert split_ranges(100, "969,30,1") == [(0, 97), (97, 100), (100, 100)]
    assert split_ranges(10, "8,1,1") == [(0, 8), (8, 9), (9, 10)]
    assert split_ranges(10, "1") == [(0, 10), (10, 10), (10, 10)]
    prefix = str(tmp_path / "d")
    _make(prefix, 60)
    train, valid, test = build_gpt_datasets(prefix, "8,1,1", 8, 0, (300, 40, 40), cache_dir=str(tmp_path / "cache"))
    docs_of = []
    for ds in (train, valid, test):
        docs_of.append({int(t) // 1000 for i in range(len(ds)) for t in ds[i]["tokens"]})
    assert docs_of[0] <= set(range(48)) and docs_of[1] <= set(range(48, 54))
    assert docs_of[2] <= set(range(54, 60))
    assert len(train) == 300 and len(valid) == 40 and len(test) == 40
    empty = build_gpt_datasets(prefix, "1", 8, 0, (10, 10, 0), cache_dir=str(tmp_path / "c2"))
    assert empty[1] is None and empty[2] is None and len(empty[0]) == 10


def test_blend_index_ratios():
    weights = [0.5, 0.3, 0.2]
    ids, ranks = blend_index(weights, 10_000)
    counts = np.bincount(ids, minlength=3)
    assert np.abs(counts / 10_000 - weights).max() < 0.01
    for m in (10, 100, 1000, 7777):  # every prefix within one sample per dataset
        assert np.abs(np.bincount(ids[:m], minlength=3) - np.array(weights) * m).max() <= 1
    for d in range(3):  # each dataset's samples are taken in order 0, 1, 2, ...
        assert ranks[ids == d].tolist() == list(range(counts[d]))
    ids2, _ = blend_index(weights, 20_000)
    assert (ids2[:10_000] == ids).all()


def test_blended_datasets_ratio_and_determinism(tmp_path):
    prefixes = [str(tmp_path / f"p{i}") for i in range(3)]
    for i, p in enumerate(prefixes):
        _make(p, 40, base=100_000 * i, seed=i)
    path = f"0.7 {prefixes[0]} 0.2 {prefixes[1]} 0.1 {prefixes[2]}"
    assert parse_data_path(path)[1] == (0.2, prefixes[1])
    train, _, _ = build_gpt_datasets(path, "1", 16, 0, (10_000, 0, 0), str(tmp_path / "cache"))
    assert len(train) == 10_000
    source = [int(train[i]["tokens"][0]) // 100_000 for i in range(10_000)]
    counts = Counter(source)
    for d, w in enumerate((0.7, 0.2, 0.1)):
        assert abs(counts[d] / 10_000 - w) < 0.01
    again, _, _ = build_gpt_datasets(path, "1", 16, 0, (10_000, 0, 0), str(tmp_path / "cache2"))
    assert all((train[i]["tokens"] == again[i]["tokens"]).all() for i in range(0, 10_000, 97))


def test_cache_reused_and_keyed_by_inputs(tmp_path):
    prefix, cache = str(tmp_path / "d"), str(tmp_path / "cache")
    _make(prefix, 30)
    build_gpt_datasets(prefix, "1", 8, 0, (50, 0, 0), cache)
    markers = sorted(f for f in os.listdir(cache) if f.endswith(".json"))
    assert len(markers) == 1 and not [f for f in os.listdir(cache) if ".tmp" in f]
    build_gpt_datasets(prefix, "1", 8, 0, (50, 0, 0), cache)  # hit: nothing new
    assert sorted(f for f in os.listdir(cache) if f.endswith(".json")) == markers
    for args in [(9, 0, (50, 0, 0)), (8, 1, (50, 0, 0)), (8, 0, (51, 0, 0))]:
        build_gpt_datasets(prefix, "1", args[0], args[1], args[2], cache)
    assert len([f for f in os.listdir(cache) if f.endswith(".json")]) == 4
    _make(prefix, 31)  # new data under the same name -> new key
    build_gpt_datasets(prefix, "1", 8, 0, (50, 0, 0), cache)
    assert len([f for f in os.listdir(cache) if f.endswith(".json")]) == 5
    default, _, _ = build_gpt_datasets(prefix, "1", 8, 0, (5, 0, 0))  # next to the data
    assert os.path.isdir(tmp_path / "index-cache") and len(default) == 5


def test_builder_and_followers(tmp_path):
    prefix, cache = str(tmp_path / "d"), str(tmp_path / "cache")
    _make(prefix, 30)
    calls = []
    with pytest.raises(FileNotFoundError, match="missing after the barrier"):
        build_gpt_datasets(prefix, "1", 8, 0, (40, 0, 0), cache, lambda: calls.append(1), False)
    built, _, _ = build_gpt_datasets(prefix, "1", 8, 0, (40, 0, 0), cache, lambda: calls.append(2), True)
    follower, _, _ = build_gpt_datasets(prefix, "1", 8, 0, (40, 0, 0), cache, lambda: calls.append(3), False)
    assert calls == [1, 2, 3]
    assert isinstance(follower.shuffle_idx, np.memmap)
    assert all((built[i]["tokens"] == follower[i]["tokens"]).all() for i in range(40))


@pytest.mark.parametrize("dp_size,mbs", [(1, 4), (2, 3), (4, 1)])
def test_sampler_exact_resume(dp_size, mbs):
    total = 100

    def global_order(consumed):
        per_rank = [list(PretrainingSampler(total, consumed, mbs, r, dp_size)) for r in range(dp_size)]
        assert len({len(b) for b in per_rank}) == 1
        order = []
        for step in zip(*per_rank):
            for batch in step:
                order.extend(batch)
        return order

    full = global_order(0)
    assert full == list(range(len(full))) and len(full) == total - total % (mbs * dp_size)
    for k in (mbs * dp_size, 5 * mbs * dp_size, 7):
        resumed = global_order(k)
        assert resumed[0] == k and max(resumed) < total
        common = min(len(resumed), len(full) - k)  # a partial last batch is dropped
        assert common > len(full) - k - mbs * dp_size
        assert resumed[:common] == full[k : k + common]


def test_loader_resume_reads_the_uninterrupted_samples(tmp_path):
    prefix = str(tmp_path / "d")
    _make(prefix, 30)
    ds = _dataset(prefix, 8, seed=0, num_samples=48)
    full = [b["tokens"] for b in build_pretraining_data_loader(ds, 0, 4, 0, 1)]
    resumed = [b["tokens"] for b in build_pretraining_data_loader(ds, 16, 4, 0, 1)]
    assert full[0].shape == (4, 9) and str(full[0].dtype) == "torch.int64"
    assert len(resumed) == len(full) - 4
    assert all((a == b).all() for a, b in zip(full[4:], resumed))


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="consumed_samples"):
        PretrainingSampler(10, 11, 1, 0, 1)
    with pytest.raises(ValueError, match="dp_rank"):
        PretrainingSampler(10, 0, 1, 2, 2)
