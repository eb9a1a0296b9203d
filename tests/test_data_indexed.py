"""Byte-level and round-trip tests of the MMIDIDX .bin/.idx format."""

import os
import struct

import numpy as np
import pytest

from megagpt2.data.indexed import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    dtype_for_vocab,
)

DOCS = [[1, 2, 3], [40000, 5], [], [7, 8, 9, 10]]


def _write(prefix, docs, dtype=np.uint16):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for doc in docs:
        builder.add_document(doc)
    builder.finalize(prefix + ".idx")


def test_exact_bytes_of_idx_and_bin(tmp_path):
    prefix = str(tmp_path / "d")
    _write(prefix, DOCS)
    expected_idx = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)
        + struct.pack("<B", 8)  # uint16
        + struct.pack("<Q", 4)  # sequences
        + struct.pack("<Q", 5)  # doc_idx entries (documents + 1)
        + np.array([3, 2, 0, 4], dtype="<i4").tobytes()
        + np.array([0, 6, 10, 10], dtype="<i8").tobytes()  # byte pointers
        + np.array([0, 1, 2, 3, 4], dtype="<i8").tobytes()
    )
    assert open(prefix + ".idx", "rb").read() == expected_idx
    expected_bin = np.array([1, 2, 3, 40000, 5, 7, 8, 9, 10], dtype="<u2").tobytes()
    assert open(prefix + ".bin", "rb").read() == expected_bin


@pytest.mark.parametrize(
    "dtype,code",
    [
        (np.uint8, 1),
        (np.int8, 2),
        (np.int16, 3),
        (np.int32, 4),
        (np.int64, 5),
        (np.float64, 6),
        (np.float32, 7),
        (np.uint16, 8),
    ],
)
def test_dtype_codes(tmp_path, dtype, code):
    prefix = str(tmp_path / "d")
    _write(prefix, [[1, 2], [3]], dtype)
    raw = open(prefix + ".idx", "rb").read()
    assert raw[17] == code
    ds = IndexedDataset(prefix)
    assert ds.dtype == dtype
    assert ds.get(0).tolist() == [1, 2]
    assert os.path.getsize(prefix + ".bin") == 3 * np.dtype(dtype).itemsize


def test_round_trip(tmp_path):
    prefix = str(tmp_path / "d")
    _write(prefix, DOCS)
    ds = IndexedDataset(prefix)
    assert len(ds) == 4 and ds.num_documents == 4 and ds.num_tokens == 9
    assert [ds[i].tolist() for i in range(4)] == DOCS
    assert ds.sizes.dtype == np.int32 and ds.doc_idx.dtype == np.int64
    assert ds.get(3, 1, 2).tolist() == [8, 9]
    assert ds.get(3, 2).tolist() == [9, 10]
    assert ds[-1].tolist() == DOCS[-1]
    with pytest.raises(IndexError):
        ds[4]


def test_multi_sequence_documents_and_flat_add(tmp_path):
    prefix = str(tmp_path / "d")
    builder = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    builder.add_item([1, 2])
    builder.add_item([3])
    builder.end_document()
    builder.add_documents(np.array([4, 5, 6, 7]), [1, 3])
    builder.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    assert ds.doc_idx.tolist() == [0, 2, 3, 4]
    assert ds.document(0).tolist() == [1, 2, 3]
    assert ds.document(2).tolist() == [5, 6, 7]


def test_merge_with_add_index(tmp_path):
    a, b, out = (str(tmp_path / n) for n in "abo")
    _write(a, DOCS[:2])
    _write(b, DOCS[2:])
    builder = IndexedDatasetBuilder(out + ".bin", np.uint16)
    builder.add_index(a)
    builder.add_index(b)
    builder.finalize(out + ".idx")
    merged = IndexedDataset(out)
    assert [merged[i].tolist() for i in range(len(merged))] == DOCS
    assert merged.doc_idx.tolist() == [0, 1, 2, 3, 4]
    _write(str(tmp_path / "whole"), DOCS)
    assert open(out + ".idx", "rb").read() == open(str(tmp_path / "whole.idx"), "rb").read()


def test_dtype_for_vocab():
    assert dtype_for_vocab(50257) == np.uint16
    assert dtype_for_vocab(65499) == np.uint16
    assert dtype_for_vocab(65500) == np.int32
    assert dtype_for_vocab(250000) == np.int32


def test_interrupted_write_leaves_no_complete_pair(tmp_path):
    prefix = str(tmp_path / "d")
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as builder:
            builder.add_document([1, 2])
            assert not os.path.exists(prefix + ".bin")  # written under a temporary name
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def _corrupt(tmp_path, mutate):
    prefix = str(tmp_path / "d")
    _write(prefix, DOCS)
    mutate(prefix)
    with pytest.raises(IndexedDatasetError) as info:
        IndexedDataset(prefix)
    return str(info.value)


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_bad_magic(tmp_path):
    msg = _corrupt(tmp_path, lambda p: _patch(p + ".idx", 0, b"XXXXXXX"))
    assert "d.idx" in msg and "magic" in msg


def test_bad_version(tmp_path):
    msg = _corrupt(tmp_path, lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 2)))
    assert "d.idx" in msg and "version 2" in msg


def test_bad_dtype_code(tmp_path):
    msg = _corrupt(tmp_path, lambda p: _patch(p + ".idx", 17, b"\x09"))
    assert "dtype code 9" in msg


def test_truncated_idx(tmp_path):
    msg = _corrupt(tmp_path, lambda p: os.truncate(p + ".idx", os.path.getsize(p + ".idx") - 8))
    assert "d.idx" in msg and "truncated" in msg


def test_short_header(tmp_path):
    msg = _corrupt(tmp_path, lambda p: os.truncate(p + ".idx", 20))
    assert "header" in msg


def test_truncated_bin(tmp_path):
    msg = _corrupt(tmp_path, lambda p: os.truncate(p + ".bin", 4))
    assert "d.bin" in msg and "18 bytes" in msg


def test_inconsistent_pointers(tmp_path):
    msg = _corrupt(tmp_path, lambda p: _patch(p + ".idx", 34 + 16 + 8, struct.pack("<q", 99)))
    assert "pointers" in msg


def test_bad_doc_idx(tmp_path):
    msg = _corrupt(tmp_path, lambda p: _patch(p + ".idx", os.path.getsize(p + ".idx") - 8, struct.pack("<q", 3)))
    assert "document index" in msg


def test_missing_file(tmp_path):
    msg = _corrupt(tmp_path, lambda p: os.remove(p + ".bin"))
    assert "d.bin" in msg and "not found" in msg


def test_pickles_by_prefix(tmp_path):
    import pickle

    prefix = str(tmp_path / "d")
    _write(prefix, DOCS)
    blob = pickle.dumps(IndexedDataset(prefix))
    assert len(blob) < 200  # the prefix, not the data
    assert pickle.loads(blob)[3].tolist() == DOCS[3]
