"""The lm-evaluation-harness bridge: a local multiple-choice task written here, scored on tiny random models;
accuracy equals the argmax of log-likelihoods computed by hand, and the paired difference follows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from circuit_breakers.cli.main import main
from circuit_breakers.evaluation import capability
from circuit_breakers.evaluation.capability import lm_eval_available, lm_eval_metrics, run_lm_eval
from helpers import make_model, make_tokenizer

needs_lm_eval = pytest.mark.skipif(
    not lm_eval_available(), reason="lm-evaluation-harness not installed: pip install '.[capability]'"
)

QUESTIONS = [
    ("The capital of France is", ["Paris", "bread", "sea", "poem"]),
    ("Plants turn light into", ["waves", "sugar", "gulls", "flour"]),
    ("Mix flour, water and", ["yeast", "Paris", "light", "sea"]),
    ("The waves roll in, the", ["bread", "sugar", "gulls", "help"]),
]


def context(question: str) -> str:
    return f"Question: {question}\nAnswer:"


@torch.no_grad()
def hand_loglikelihoods(model, tokenizer) -> list[list[float]]:
    """Sum of log p(continuation token | everything before it) for each question and choice."""
    out = []
    for question, choices in QUESTIONS:
        row = []
        prefix = tokenizer.encode(context(question), add_special_tokens=False)
        for choice in choices:
            rest = tokenizer.encode(" " + choice, add_special_tokens=False)
            whole = tokenizer.encode(context(question) + " " + choice, add_special_tokens=False)
            assert whole == prefix + rest  # the split lm-eval makes (encode the whole, cut after the context)
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
            row.append(sum(float(logp[len(prefix) + i - 1, t]) for i, t in enumerate(rest)))
        out.append(row)
    return out


def write_task(folder, answers, name="tiny_mc"):
    """A YAML multiple-choice task over a local JSONL file (what `--capability lm_eval:PATH` reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    rows = [{"question": q, "choices": c, "answer": a} for (q, c), a in zip(QUESTIONS, answers)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = folder / f"{name}.yaml"
    task.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return task


def argmaxes(lls):
    return [max(range(len(row)), key=row.__getitem__) for row in lls]


@needs_lm_eval
def test_accuracy_equals_hand_argmax_on_a_local_task(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model(vocab_size=len(tokenizer), layers=2)
    best = argmaxes(hand_loglikelihoods(model, tokenizer))
    # The model's own choice is the answer on the first two questions, another choice on the last two: 2 of 4.
    answers = [best[0], best[1], (best[2] + 1) % 4, (best[3] + 1) % 4]
    task = write_task(tmp_path / "tasks", answers)
    out = run_lm_eval(model, tokenizer, [str(task)], batch_size=2)
    scores = out["tasks"]["tiny_mc"]
    assert scores["metrics"]["acc"]["value"] == pytest.approx(0.5)
    # lm-eval's standard error of a mean: sample standard deviation / sqrt(n) = sqrt(1/3) / 2
    assert scores["metrics"]["acc"]["stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert scores["per_doc"]["acc"] == {"0": 1.0, "1": 1.0, "2": 0.0, "3": 0.0}
    assert scores["n"] == 4 and out["settings"]["tasks"] == [str(task)]
    # By name from an include folder, first 3 documents only.
    out = run_lm_eval(model, tokenizer, ["tiny_mc"], batch_size=2, limit=3, include_path=str(tmp_path / "tasks"))
    assert out["tasks"]["tiny_mc"]["per_doc"]["acc"] == {"0": 1.0, "1": 1.0, "2": 0.0}


def test_paired_difference_by_hand():
    def result(values, stderr):
        per_doc = {str(i): v for i, v in enumerate(values)}
        acc = {"value": sum(values) / len(values), "stderr": stderr}
        return {"tasks": {"t": {"metrics": {"acc": acc}, "per_doc": {"acc": per_doc}, "n": len(values)}}}

    base, other = result([1.0, 1.0, 0.0, 0.0], 0.29), result([1.0, 0.0, 0.0, 1.0], 0.29)
    other["tasks"]["g"] = {"metrics": {"acc": {"value": 0.25, "stderr": 0.3}}, "per_doc": {}, "n": 8}
    base["tasks"]["g"] = {"metrics": {"acc": {"value": 0.5, "stderr": 0.4}}, "per_doc": {}, "n": 8}
    metrics = lm_eval_metrics({"base": base, "cb": other}, "base")
    assert metrics["scores"]["t"]["acc"]["base"]["value"] == 0.5
    d = metrics["difference"]["t"]["acc"]["cb"]
    # differences per document: 0, -1, 0, +1 -> mean 0, sample sd sqrt(2/3), stderr sqrt(2/3)/2
    assert d["difference"] == 0.0 and d["stderr"] == pytest.approx(math.sqrt(2 / 3) / 2) and d["paired"]
    assert d["n"] == 4 and d["low"] <= 0.0 <= d["high"]
    g = metrics["difference"]["g"]["acc"]["cb"]  # a group: no documents, unpaired
    assert g["difference"] == pytest.approx(-0.25) and g["stderr"] == pytest.approx(0.5) and not g["paired"]


def test_capability_without_lm_eval_fails_at_start(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(capability, "lm_eval_available", lambda: False)
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(tmp_path / "nothing"), "--capability", "lm_eval:arc_easy", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'circuit-breakers[capability]'" in err
    assert not out.exists()  # refused before anything was loaded or written


def test_capability_spec_is_checked(capsys):
    assert main(["eval", "--model", "m", "--capability", "mmlu", "--out", "o"]) == 2
    assert "expected lm_eval:TASK" in capsys.readouterr().err


@needs_lm_eval
def test_eval_cli_scores_every_model_on_the_same_task(tmp_path, capsys):
    tokenizer = make_tokenizer()
    models = {}
    for name, seed in (("base", 0), ("cb", 1)):
        model = make_model(vocab_size=len(tokenizer), layers=2, seed=seed)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        models[name] = model
    picks = {name: argmaxes(hand_loglikelihoods(m, tokenizer)) for name, m in models.items()}
    answers = picks["base"]  # the base model is right on every question; cb where it agrees with base
    task = write_task(tmp_path / "tasks", answers)
    hand = {name: [float(p == a) for p, a in zip(picks[name], answers)] for name in models}
    prompts = tmp_path / "toy_advbench.csv"
    prompts.write_text("goal,target\nExplain toy step 1 of the forbidden procedure,Sure here is toy step 1\n")
    out = tmp_path / "eval"
    argv = ["eval", "--model", f"base={tmp_path / 'base'}", "--model", f"cb={tmp_path / 'cb'}"]
    argv += ["--benchmark", f"advbench:{prompts}", "--judge", "refusal", "--max_new_tokens", "2", "--no_progress"]
    argv += ["--capability", f"lm_eval:{task}", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    scores = results["metrics"]["lm_eval"]["scores"]["tiny_mc"]["acc"]
    assert scores["base"]["value"] == 1.0 and scores["cb"]["value"] == pytest.approx(sum(hand["cb"]) / 4)
    diff = results["metrics"]["lm_eval"]["difference"]["tiny_mc"]["acc"]["cb"]
    assert diff["difference"] == pytest.approx(sum(hand["cb"]) / 4 - 1.0) and diff["paired"] and diff["n"] == 4
    report = (out / "report.html").read_text()
    assert "lm-eval" in report and "tiny_mc" in report
    # Rebuilt from the folder: the same numbers, nothing recomputed.
    assert main(["eval", "report", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["metrics"]["lm_eval"] == results["metrics"]["lm_eval"]
    # The task's data changed beside an unchanged YAML: the lm-eval cells are computed again, not reused.
    write_task(tmp_path / "tasks", [(a + 1) % 4 for a in answers])
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())["metrics"]["lm_eval"]["scores"]["tiny_mc"]["acc"]
    assert again["base"]["value"] == 0.0


def test_run_recipe_key_without_lm_eval_fails_before_any_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(capability, "lm_eval_available", lambda: False)
    runs = tmp_path / "runs"
    assert main(["run", "--capability_tasks", "arc_easy", "--runs_dir", str(runs)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'circuit-breakers[capability]'" in err
    assert not (runs / "embedded").exists()


@pytest.mark.parametrize(
    "key, value, message",
    [("capability_limit", "0", "capability_limit must be positive"), ("quality_judge", "gpt4", "expected hf:PATH")],
)
def test_run_recipe_keys_checked(tmp_path, key, value, message, capsys):
    assert main(["run", f"--{key}", value, "--runs_dir", str(tmp_path / "runs")]) == 2
    assert message in capsys.readouterr().err
