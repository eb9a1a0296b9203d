"""The tokenizer travels with the data: preprocessing writes a self-contained sidecar, and the
trainer, inspect_dataset.py, evaluate.py and merge_datasets.py use it when given no tokenizer and
refuse a mismatching one, naming both."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megagpt2.config import DataConfig, TokenizerConfig
from megagpt2.data.indexed import IndexedDataset
from megagpt2.data.run_tokenizer import ResolvedTokenizer, check_model_vocab, resolve_tokenizer
from megagpt2.data.sidecar import INFO_FILE, read_dataset_tokenizer, sidecar_dir
from megagpt2.tokenizer import TokenizerError, build_tokenizer
from tests.test_preprocess import make_doc, write_jsonl
from tests.tokenizer_files import CHINESE, byte_level_tokenizer_json
from tools import evaluate, inspect_dataset, merge_datasets, preprocess_data

TEXTS = [CHINESE[i % len(CHINESE)] + "\n" + make_doc(i, words=20) for i in range(60)]


def preprocess(directory: Path, name: str, *flags: str) -> str:
    write_jsonl(str(directory / f"{name}.jsonl"), TEXTS)
    prefix = str(directory / name)
    assert (
        preprocess_data.main(
            [
                "--input",
                str(directory / f"{name}.jsonl"),
                "--output-prefix",
                prefix,
                "--append-eod",
                "--no-progress",
                *flags,
            ]
        )
        == 0
    )
    return prefix + "_text_document"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sidecar")
    tok_json = byte_level_tokenizer_json(root / "tok" / "tokenizer.json")
    return {
        "root": root,
        "tokenizer.json": tok_json,
        "hf": preprocess(root, "zh", "--tokenizer-type", "HFTokenizer", "--tokenizer-model", tok_json),
        "gpt2": preprocess(root, "en"),
    }


def hf_tokenizer(data) -> object:
    return build_tokenizer("HFTokenizer", tokenizer_model=data["tokenizer.json"])


def test_sidecar_is_self_contained(data, tmp_path):
    side = Path(sidecar_dir(data["hf"]))
    info = json.loads((side / INFO_FILE).read_text())
    tok = hf_tokenizer(data)
    assert (side / "tokenizer.json").read_bytes() == Path(data["tokenizer.json"]).read_bytes()
    assert info["built_with"]["append_eod"] is True and info["built_with"]["cleaning"]["dedup"] is False
    assert read_dataset_tokenizer(data["hf"]).identity == tok.identity()
    # `cp prefix.*` elsewhere, original tokenizer file gone: the copy is enough.
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in Path(data["hf"]).parent.glob(Path(data["hf"]).name + ".*"):
        (shutil.copytree if path.is_dir() else shutil.copy)(path, moved / path.name)
    source = tmp_path / "src" / "tokenizer.json"
    source.parent.mkdir()
    shutil.copy(data["tokenizer.json"], source)
    sidecar = read_dataset_tokenizer(str(moved / Path(data["hf"]).name))
    assert sidecar.build().identity() == tok.identity()
    assert sidecar.config()["tokenizer_model"] == str(moved / (Path(data["hf"]).name + ".tokenizer") / "tokenizer.json")
    # Copy missing: the recorded source is used when it still has the same bytes, else a clear error.
    (Path(sidecar.directory) / "tokenizer.json").unlink()
    sidecar.info["files"]["tokenizer_model"]["source"] = str(source)
    assert sidecar.build().identity() == tok.identity()
    source.write_text("{}")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is missing .* Copy the whole"):
        sidecar.build()


def test_gpt2_sidecar_records_the_default_without_paths(data):
    sidecar = read_dataset_tokenizer(data["gpt2"])
    assert sidecar.config() == {
        "tokenizer_type": "GPT2BPETokenizer",
        "vocab_file": None,
        "merge_file": None,
        "tokenizer_model": None,
        "eod_token": None,
    }
    assert sorted(p.name for p in Path(sidecar.directory).iterdir()) == sorted([INFO_FILE, "encoder.json", "vocab.bpe"])


def test_resolve_uses_the_dataset_tokenizer_and_refuses_another(data):
    hf_id = hf_tokenizer(data).identity()
    r = resolve_tokenizer(TokenizerConfig(), DataConfig(path=data["hf"]))
    assert r.tokenizer.identity() == hf_id and r.config.tokenizer_type == "HFTokenizer"
    assert f"dataset {data['hf']}" in r.summary() and not r.notes
    same = resolve_tokenizer(
        TokenizerConfig("HFTokenizer", tokenizer_model=data["tokenizer.json"]), DataConfig(path=data["hf"])
    )
    assert same.tokenizer.identity() == hf_id
    with pytest.raises(TokenizerError) as err:
        resolve_tokenizer(TokenizerConfig("GPT2BPETokenizer"), DataConfig(path=data["hf"]))
    msg = str(err.value)
    assert data["hf"] in msg and "HFTokenizer, 400 ids" in msg and "GPT2BPETokenizer, 50,257 ids" in msg
    with pytest.raises(TokenizerError, match="blends datasets built with different tokenizers"):
        resolve_tokenizer(TokenizerConfig(), DataConfig(path=f"0.5 {data['hf']} 0.5 {data['gpt2']}"))


def test_dataset_without_sidecar_keeps_working_with_a_note(data, tmp_path):
    bare = tmp_path / "megatron_text_document"
    for ext in (".bin", ".idx"):
        shutil.copy(data["gpt2"] + ext, str(bare) + ext)
    r = resolve_tokenizer(TokenizerConfig(), DataConfig(path=str(bare)))
    assert r.config == TokenizerConfig("GPT2BPETokenizer") and len(r.notes) == 1
    assert f"{bare} has no tokenizer sidecar" in r.notes[0]
    blend = resolve_tokenizer(TokenizerConfig(), DataConfig(path=f"1 {data['hf']} 1 {bare}"))
    assert blend.config.tokenizer_type == "HFTokenizer" and "assuming HFTokenizer" in blend.notes[0]
    explicit = resolve_tokenizer(
        TokenizerConfig("HFTokenizer", tokenizer_model=data["tokenizer.json"]), DataConfig(path=str(bare))
    )
    assert explicit.config.tokenizer_model == data["tokenizer.json"]


def test_vocab_error_blames_the_tokenizer_not_the_model(data):
    r = ResolvedTokenizer(build_tokenizer(), TokenizerConfig("GPT2BPETokenizer"), "the default (GPT-2 BPE)")
    with pytest.raises(TokenizerError) as err:
        check_model_vocab(r, 400, init_from="ckpt/zh")
    assert "train.init_from ckpt/zh fixes the model's vocabulary, so the tokenizer is the wrong one" in str(err.value)
    check_model_vocab(r, 50257)


def test_inspect_dataset_decodes_with_the_sidecar(data, capsys):
    assert inspect_dataset.main(["--prefix", data["hf"], "--doc", "0"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer   HFTokenizer, 400 ids" in out and TEXTS[0] + "\n" in out and "<|endoftext|>" not in out
    assert inspect_dataset.main(["--prefix", data["hf"], "--doc", "0", "--show-special"]) == 0
    assert TEXTS[0] + "<|endoftext|>" in capsys.readouterr().out
    assert inspect_dataset.main(["--prefix", data["hf"], "--doc", "0", "--tokenizer-type", "GPT2BPETokenizer"]) == 1
    err = capsys.readouterr().err
    assert "the tokenizer from the --tokenizer-* flags is GPT2BPETokenizer" in err and "built with HFTokenizer" in err


def test_merge_keeps_the_sidecar_and_refuses_mixed_tokenizers(data, tmp_path, capsys):
    out = str(tmp_path / "zh2_text_document")
    assert merge_datasets.main(["--input", data["hf"], data["hf"], "--output-prefix", out]) == 0
    assert read_dataset_tokenizer(out).identity == read_dataset_tokenizer(data["hf"]).identity
    assert IndexedDataset(out).num_documents == 2 * IndexedDataset(data["hf"]).num_documents
    bad = str(tmp_path / "mixed_text_document")
    assert merge_datasets.main(["--input", data["hf"], data["gpt2"], "--output-prefix", bad]) == 1
    assert "cannot be merged" in capsys.readouterr().err and not list(tmp_path.glob("mixed*"))


@pytest.fixture(scope="module")
def trained(data) -> str:
    """Two steps of the real Trainer on the tokenizer.json dataset with no tokenizer settings."""
    from tests.dist_utils import run_distributed
    from tests.train_utils import ds_config, tiny_config, train_worker

    ckpt = data["root"] / "ckpt"
    cfg = tiny_config(data["hf"], ckpt, steps=2)
    assert cfg.tokenizer == TokenizerConfig()  # nothing set
    run_distributed(train_worker, 1, args=(cfg.to_dict(), ds_config(stage=2, micro=4), {"tp": 1}, False))
    return str(ckpt)


def test_trainer_uses_the_dataset_tokenizer(data, trained):
    from megagpt2.checkpoint.store import STATE_FILE
    from megagpt2.eval import load_model

    tag = (Path(trained) / "latest").read_text().strip()
    state = json.loads((Path(trained) / tag / STATE_FILE).read_text())
    assert state["tokenizer"] == hf_tokenizer(data).identity()
    assert state["config"]["tokenizer"]["tokenizer_type"] == "HFTokenizer"
    _, tokenizer, _ = load_model(trained)  # the inference tools get the same tokenizer back
    assert tokenizer.identity() == hf_tokenizer(data).identity()


def test_init_from_supplies_the_tokenizer_and_refuses_another(data, trained, tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(["你好", "你好！"]) + "\n")
    finetune = DataConfig(path=str(chat), format="dialogue")
    r = resolve_tokenizer(TokenizerConfig(), finetune, trained)
    assert r.tokenizer.identity() == hf_tokenizer(data).identity() and "train.init_from" in r.source
    with pytest.raises(TokenizerError) as err:
        resolve_tokenizer(TokenizerConfig("GPT2BPETokenizer"), finetune, trained)
    assert f"train.init_from {trained} was trained with HFTokenizer" in str(err.value)
    assert "the tokenizer from the tokenizer.* settings is GPT2BPETokenizer, 50,257 ids" in str(err.value)
    with pytest.raises(TokenizerError, match="was trained with HFTokenizer"):
        resolve_tokenizer(TokenizerConfig(), DataConfig(path=data["gpt2"]), trained)
    # The same vocabulary in another document layout (pretrain, then fine-tune in a chat format):
    # accepted, with a note saying which tokens changed.
    eod_id = hf_tokenizer(data).eod
    other = next(t for t in (1, 2, 3) if t != eod_id)
    other_token = hf_tokenizer(data).decode([other])
    relaid = TokenizerConfig("HFTokenizer", tokenizer_model=data["tokenizer.json"], eod_token=other_token)
    r = resolve_tokenizer(relaid, finetune, trained)
    assert r.tokenizer.eod == other
    assert any(f"another document layout (eod {eod_id} -> {other})" in n for n in r.notes), r.notes


def test_evaluate_ppl_on_a_dataset_checks_its_tokenizer(data, trained, capsys):
    common = ["ppl", "--load", trained, "--window", "16", "--max-tokens", "64", "--no-progress"]
    assert evaluate.main(common + ["--data-path", data["hf"]]) == 0
    assert evaluate.main(common + ["--data-path", data["gpt2"]]) == 2
    err = capsys.readouterr().err
    assert f"dataset {data['gpt2']} was built with GPT2BPETokenizer" in err
    assert f"the tokenizer from the model {trained} is HFTokenizer" in err
