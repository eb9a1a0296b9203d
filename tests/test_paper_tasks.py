"""The GPT-2 paper's tasks lm-eval lacks: CBT against an independent transformers computation,
bits per byte / character identities, the generation tasks' exact prompts and library metrics on
the tiny trained model, `paper` over a data folder, and errors that name file, line and field."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from tests.eval_fixtures import FRENCH, WORDS
from tools import evaluate as evaluate_tool

REL = 1e-5


def _run(task: str, out_dir, *args: str) -> dict:
    out = out_dir / f"{task}.json"
    assert evaluate_tool.main([task, "--no-progress", "--output", str(out), *args]) == 0
    return json.loads(out.read_text())["metrics"]


@pytest.fixture(scope="module")
def hf_model(trained):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(trained["hf"]).eval()


def cbt_file(path, n: int = 4, seed: int = 0) -> list[dict]:
    """CBT layout: 20 numbered sentences, the query line with answer and 10 candidates, a blank line."""
    rng = random.Random(seed)
    truth, lines = [], []
    for _ in range(n):
        for i in range(1, 21):
            lines.append(f"{i} {rng.choice(WORDS)} , {rng.choice(WORDS)} .")
        cands = rng.sample(WORDS, 10)
        answer = rng.choice(cands)
        lines.append(f"21 `` The {rng.choice(WORDS)} is XXXXX . ''\t{answer}\t\t{'|'.join(cands)}")
        lines.append("")
        truth.append({"answer": answer, "candidates": cands})
    path.write_text("\n".join(lines) + "\n")
    return truth


@torch.no_grad()
def _hf_text_logprob(hf, ids: list[int]) -> float:
    x = torch.tensor([ids])
    logp = hf(x[:, :-1]).logits[0].log_softmax(-1).double()
    return float(logp.gather(1, x[0, 1:, None]).sum())


def test_cbt_equals_transformers_on_whole_texts(trained, hf_model, tmp_path):
    from megagpt2.eval.cbt import cbt_texts, read_cbt

    truth = cbt_file(tmp_path / "cbt.txt")
    got = _run("cbt", tmp_path, "--load", trained["ckpt"], "--input", str(tmp_path / "cbt.txt"), "--batch-size", "7")
    tok = trained["tok"]
    for ex, pick in zip(read_cbt(str(tmp_path / "cbt.txt")), got["chosen"]):
        context, completions = cbt_texts(ex)
        assert " ," not in context and " ." not in context and completions[0].startswith(' "The ')
        whole = [_hf_text_logprob(hf_model, [tok.eod] + tok.encode(context + c)) for c in completions]
        # our pick is the most probable whole text, up to float32 noise on a ~300-nat sum
        assert max(whole) - whole[ex.candidates.index(pick)] <= REL * abs(max(whole))
        assert len(set(round(w, 1) for w in whole)) > 5  # candidates really differ
    assert got["n"] == 4 and got["truncated"] == 0
    assert got["accuracy"] == sum(c == t["answer"] for c, t in zip(got["chosen"], truth)) / 4


def test_bits_per_byte_and_char_are_the_summed_nll(trained, hf_model, tmp_path):
    text = "Le café naïve. " + " ".join(random.Random(1).choice(WORDS) for _ in range(120)) + "\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    got = _run(
        "ppl", tmp_path, "--load", trained["hf"], "--input", str(tmp_path / "t.txt"), "--window", "64", "--stride", "64"
    )
    tok = trained["tok"]
    stream = [tok.eod] + tok.encode(text)
    nll = -sum(_hf_text_logprob(hf_model, stream[b : b + 65]) for b in range(0, len(stream) - 1, 64))
    assert got["bytes"] == len(text.encode("utf-8")) > got["chars"] == len(text)
    assert abs(got["nll"] - nll) <= REL * nll
    assert abs(got["bits_per_byte"] - nll / math.log(2) / len(text.encode("utf-8"))) <= REL * got["bits_per_byte"]
    assert abs(got["bits_per_char"] - nll / math.log(2) / len(text)) <= REL * got["bits_per_char"]
    assert abs(2 ** (got["bits_per_byte"] * got["bytes"] / got["tokens"]) - got["token_ppl"]) <= 1e-9 * got["token_ppl"]


def test_lm1b_and_cbt_detokenizers():
    from megagpt2.eval import detokenize

    assert detokenize("He said : it 's done .\nWhy ?", "lm1b") == "He said: it's done.\nWhy?"
    assert detokenize("`` Hello , '' said Tom . It is n't .", "cbt") == '"Hello," said Tom. It isn\'t.'


# -- generation tasks ---------------------------------------------------------------------------
def _gen_files(folder) -> None:
    rng = random.Random(2)
    coqa = [
        {
            "story": "The apple was by the river. The stone was quiet.",
            "questions": [{"input_text": "what was by the river?"}, "what was quiet?"],
            "answers": [{"input_text": "the apple"}, "the stone"],
        }
    ]
    (folder / "coqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in coqa))
    summ = [
        {"article": f"The {w} was bright. It was {rng.choice(WORDS)}. Then it was quiet.", "highlights": f"The {w}."}
        for w in WORDS[:3]
    ]
    (folder / "summ.jsonl").write_text("".join(json.dumps(r) + "\n" for r in summ))
    pairs = [(rng.sample(range(len(WORDS)), 3)) for _ in range(4)]
    tr = [{"en": " ".join(WORDS[j] for j in p), "fr": " ".join(FRENCH[j] for j in p)} for p in pairs]
    (folder / "tr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tr))
    qa = [{"question": f"what is the {w}?", "answers": [f"the {w}", w]} for w in WORDS[:4]]
    (folder / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))


@pytest.fixture(scope="module")
def gen_runs(trained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    _gen_files(tmp)
    load = ["--load", trained["ckpt"]]
    return {
        "tmp": tmp,
        "coqa": _run("coqa", tmp, *load, "--input", str(tmp / "coqa.jsonl")),
        "summarize": _run("summarize", tmp, *load, "--input", str(tmp / "summ.jsonl"), "--seed", "3"),
        "translate": _run(
            "translate", tmp, *load, "--input", str(tmp / "tr.jsonl"), "--num-fewshot", "2", "--fewshot-seed", "5"
        ),
        "qa": _run("qa", tmp, *load, "--input", str(tmp / "qa.jsonl"), "--num-fewshot", "1"),
    }


def test_coqa_prompt_and_f1(gen_runs):
    from megagpt2.eval.gen_tasks import f1_score

    ex = gen_runs["coqa"]["examples"]
    assert ex[1]["prompt"] == (
        "The apple was by the river. The stone was quiet.\n\n"
        "Q: what was by the river?\nA: the apple\nQ: what was quiet?\nA:"
    )
    assert all("\n" not in e["output"] for e in ex)
    f1 = [f1_score(e["answer"], e["references"][0]) for e in ex]
    assert abs(gen_runs["coqa"]["f1"] - 100 * sum(f1) / 2) < 1e-9
    assert f1_score("The red apple!", "a red apple tree") == pytest.approx(0.8)  # p = 1, r = 2/3
    assert f1_score("", "") == 1.0 and f1_score("stone", "apple") == 0.0


def test_summarize_prompt_first_three_sentences_and_rouge_from_the_library(gen_runs):
    from rouge_score import rouge_scorer

    from megagpt2.eval.gen_tasks import first_sentences

    res = gen_runs["summarize"]
    assert res["examples"][0]["prompt"] == "The apple was bright. It was " + res["examples"][0]["prompt"][29:]
    assert res["examples"][0]["prompt"].endswith(". Then it was quiet.\nTL;DR:")
    assert first_sentences("One. Two? Three! Four. Five") == "One. Two? Three!"
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        want = sum(
            scorer.score(e["references"][0], first_sentences(e["output"]))[key].fmeasure for e in res["examples"]
        ) / len(res["examples"])
        assert abs(res[key] - 100 * want) < 1e-9
    assert [e["answer"] for e in res["examples"]] == [first_sentences(e["output"]) for e in res["examples"]]


def test_translate_prompt_and_bleu_from_sacrebleu(gen_runs):
    import sacrebleu

    from megagpt2.eval.tasks import fewshot_prefix

    res, tmp = gen_runs["translate"], gen_runs["tmp"]
    rows = [json.loads(x) for x in (tmp / "tr.jsonl").read_text().splitlines()]
    demos = [f"{r['en']} = {r['fr']}\n" for r in rows]
    assert res["examples"][0]["prompt"] == fewshot_prefix(demos, 2, 5, 0, 0, "") + f"{rows[0]['en']} ="
    assert res["examples"][0]["prompt"].count(" = ") == 2 and res["examples"][0]["prompt"].count("\n") == 2
    hyps = [e["answer"] for e in res["examples"]]
    assert res["bleu"] == sacrebleu.corpus_bleu(hyps, [[r["fr"] for r in rows]]).score


def test_qa_prompt_and_exact_match(gen_runs):
    from megagpt2.eval.gen_tasks import exact_match

    res = gen_runs["qa"]
    prompt = res["examples"][2]["prompt"]
    assert prompt.endswith("\nQ: what is the stone?\nA:") and prompt.startswith("Q: what is the ")
    assert prompt.count("Q: ") == 2 and "A: the stone" not in prompt
    em = [exact_match(e["answer"], e["references"]) for e in res["examples"]]
    assert res["exact_match"] == 100 * sum(em) / 4
    assert exact_match("The  Stone.", ["stone"]) == 1.0 and exact_match("stones", ["stone"]) == 0.0


# -- paper ----------------------------------------------------------------------------------------
def test_paper_runs_what_is_present_and_prints_table3(trained, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    cbt_file(data / "cbt_cn.txt", n=2)
    (data / "text8.txt").write_text(" ".join(random.Random(4).choice(WORDS) for _ in range(60)))
    (data / "natural_questions.jsonl").write_text(
        "".join(json.dumps({"question": f"what is the {w}?", "answers": [w]}) + "\n" for w in WORDS[:3])
    )
    out = tmp_path / "paper.json"
    assert (
        evaluate_tool.main(
            [
                "paper",
                "--load",
                trained["ckpt"],
                "--data-dir",
                str(data),
                "--no-progress",
                "--output",
                str(out),
                "--num-fewshot",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "CBT-CN (ACC)" in printed and "GPT-2 1542M" in printed and "NQ (EM %)" in printed
    report = json.loads(out.read_text())["metrics"]
    assert set(report["tasks"]) == {"cbt_cn", "text8", "qa"}
    single = _run("cbt", tmp_path, "--load", trained["ckpt"], "--input", str(data / "cbt_cn.txt"))
    assert report["table3"]["CBT-CN (ACC)"] == 100 * single["accuracy"]
    assert report["table3"]["text8 (BPC)"] == report["tasks"]["text8"]["bits_per_char"]
    assert report["table3"]["PTB (PPL)"] is None and any(m.startswith("ptb") for m in report["missing"])


def test_bad_task_files_name_file_line_and_field(trained, tmp_path, capsys):
    load = ["--load", trained["hf"]]

    def fails(argv, *messages):
        assert evaluate_tool.main(argv) == 2
        err = capsys.readouterr().err
        assert all(m in err for m in messages), err

    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "q?", "answers": ["a"]}\n\n{"query_text": "q?", "answers": ["a"]}\n')
    fails(["qa", *load, "--input", str(bad)], f"{bad}:3: missing field 'question'")
    bad.write_text('{"article": "text"}\n')
    fails(["summarize", *load, "--input", str(bad)], f"{bad}:1: missing field 'highlights'")
    bad.write_text('{"story": "s", "questions": ["q"], "answers": []}\n')
    fails(["coqa", *load, "--input", str(bad)], f"{bad}:1: field 'answers' must be a non-empty list")
    bad.write_text('{"en": "hello", "de": "hallo"}\n')
    fails(["translate", *load, "--input", str(bad), "--num-fewshot", "0"], f"{bad}:1: missing field 'fr'")
    cbt = tmp_path / "cbt.txt"
    cbt.write_text("1 a sentence .\n2 The XXXXX sat .\tcat\n")
    fails(["cbt", *load, "--input", str(cbt)], f"{cbt}:2:", "candidates")
    fails(
        ["paper", *load, "--data-dir", str(tmp_path), "--tasks", "cbt_cn,squad"],
        "unknown paper task(s) squad",
        "lambada",
        "wikitext103",
    )
    fails(["paper", *load, "--data-dir", str(tmp_path / "empty_dir_missing")], "is not a directory")
