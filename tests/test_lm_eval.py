"""lm-evaluation-harness backend: the same numbers as lm-eval's own `hf` model on the exported
tiny trained model, for lambada-, hellaswag-, wikitext- (rolling) and generate_until-style tasks
from local task YAMLs; tp=2 equals tp=1; unknown tasks are named with the known ones."""

from __future__ import annotations

import json
import random

import pytest

from tests.dist_utils import run_distributed
from tests.eval_fixtures import WORDS
from tools import evaluate as evaluate_tool

TASKS = ("tiny_lambada", "tiny_hellaswag", "tiny_wikitext", "tiny_qa")
REL = 1e-5

YAML = {
    "tiny_lambada": """output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "tiny_hellaswag": """output_type: multiple_choice
doc_to_text: "{{ctx}}"
doc_to_target: "{{label}}"
doc_to_choice: "{{endings}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "tiny_wikitext": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{page}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "tiny_qa": """output_type: generate_until
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 10
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
}


def _docs(task: str, rng: random.Random) -> list[dict]:
    def words(a: int, b: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(a, b)))

    if task == "tiny_lambada":
        return [{"text": f"The {words(3, 9)} was {rng.choice(WORDS)}"} for _ in range(10)]
    if task == "tiny_hellaswag":
        return [
            {"ctx": f"It was {words(2, 6)}.", "endings": [words(1, 4) for _ in range(4)], "label": rng.randrange(4)}
            for _ in range(8)
        ]
    if task == "tiny_wikitext":  # the long pages need several 128-token windows
        return [{"page": " ".join(f"The {words(3, 8)} was {rng.choice(WORDS)}." for _ in range(n))} for n in (2, 9, 30)]
    return [{"question": f"what is the {rng.choice(WORDS)}?", "answer": f"the {rng.choice(WORDS)}"} for _ in range(8)]


def write_tasks(folder, seed: int = 0) -> None:
    """One YAML + jsonl per task (the layout docs/evaluation.md shows)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for task in TASKS:
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in _docs(task, rng)))
        head = f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (folder / f"{task}.yaml").write_text(head + YAML[task])


@pytest.fixture(scope="module")
def runs(trained, tmp_path_factory):
    """lm-eval results (with samples) for our backend through the tool, and for lm-eval's hf model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from megagpt2.eval.harness import task_manager

    tmp = tmp_path_factory.mktemp("lm_eval")
    write_tasks(tmp / "tasks")
    out = tmp / "ours.json"
    argv = [
        "lm_eval",
        "--load",
        trained["ckpt"],
        "--tasks",
        ",".join(TASKS),
        "--include-path",
        str(tmp / "tasks"),
        "--batch-size",
        "3",
        "--log-samples",
        "--no-progress",
        "--output",
        str(out),
    ]
    assert evaluate_tool.main(argv) == 0
    hf = HFLM(pretrained=trained["hf"], device="cpu", dtype="float32", batch_size=3)
    theirs = lm_eval.simple_evaluate(
        model=hf,
        tasks=list(TASKS),
        task_manager=task_manager(str(tmp / "tasks"), TASKS),
        log_samples=True,
        bootstrap_iters=0,
    )
    return {"ours": json.loads(out.read_text()), "theirs": theirs, "tmp": tmp, "argv": argv}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * abs(b)


def _responses(samples: list[dict]) -> list:
    return [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("task", TASKS)
def test_same_numbers_as_lm_eval_hf_model(runs, task):
    ours, theirs = runs["ours"]["results"][task], runs["theirs"]["results"][task]
    metrics = [k for k in theirs if "," in k and "stderr" not in k]
    assert metrics and set(metrics) <= set(ours)
    for key in metrics:
        if key.startswith(("acc", "exact_match")):
            assert ours[key] == theirs[key], key
        else:
            assert _close(ours[key], theirs[key]), (key, ours[key], theirs[key])
    # request by request: log-likelihoods within 1e-5 relative, greedy flags and texts equal
    mine, ref = _responses(runs["ours"]["samples"][task]), _responses(runs["theirs"]["samples"][task])
    assert len(mine) == len(ref) > 0
    for a, b in zip(mine, ref):
        for x, y in zip(a, b):
            if isinstance(y, (list, tuple)):  # (loglikelihood, is_greedy)
                assert _close(float(x[0]), float(y[0])) and bool(x[1]) == bool(y[1])
            elif isinstance(y, str):
                assert x == y
            else:
                assert _close(float(x), float(y))


def test_generations_are_not_trivial(runs):
    texts = [r[0] for r in _responses(runs["ours"]["samples"]["tiny_qa"])]
    assert any(t.strip() for t in texts) and all("\n" not in t for t in texts)


def test_results_file_is_lm_evals_own(runs):
    res = runs["ours"]
    assert {"results", "configs", "versions", "n-shot"} <= set(res)
    assert res["config"]["model_args"].startswith("load=")
    assert 0.0 <= res["results"]["tiny_lambada"]["acc,none"] <= 1.0


def _tp_worker(rank, world, argv, out):
    import torch.distributed as dist

    argv = [*argv[:-1], out, "--tp", str(world)]
    return evaluate_tool.main(argv), dist.is_initialized()  # the caller's group is left running


def test_tp2_equals_tp1(runs, tmp_path):
    out = str(tmp_path / "tp2.json")
    assert run_distributed(_tp_worker, 2, args=(runs["argv"], out), timeout=600) == [(0, True), (0, True)]
    tp2, tp1 = json.loads(open(out).read()), runs["ours"]
    for task in TASKS:
        for key, value in tp1["results"][task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert _close(tp2["results"][task][key], value), (task, key)
        assert _responses(tp2["samples"]["tiny_qa"]) == _responses(tp1["samples"]["tiny_qa"])


def test_unknown_task_lists_the_known_ones(runs, trained, capsys):
    argv = [
        "lm_eval",
        "--load",
        trained["hf"],
        "--tasks",
        "tiny_lambda",
        "--include-path",
        str(runs["tmp"] / "tasks"),
        "--no-default-tasks",
    ]
    assert evaluate_tool.main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task(s) tiny_lambda" in err and "tiny_hellaswag" in err and "tiny_lambada" in err
    missing = str(runs["tmp"] / "no_such_folder")
    assert evaluate_tool.main(["lm_eval", "--load", trained["hf"], "--tasks", "x", "--include-path", missing]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_model_by_name_from_arg_string(trained):
    import lm_eval.api.registry as registry

    from megagpt2.eval.lm_eval import MegaGPT2LM

    assert registry.get_model("megagpt2") is MegaGPT2LM
    lm = MegaGPT2LM.create_from_arg_string(f"load={trained['ckpt']},max_gen_toks=16", {"batch_size": 2, "device": None})
    assert lm.batch_size == 2 and lm.max_gen_toks == 16 and lm.max_length == 128
    assert lm.eot_token_id == trained["tok"].eod
    with pytest.raises(ValueError, match="load="):
        MegaGPT2LM.create_from_arg_string("tp=1")
