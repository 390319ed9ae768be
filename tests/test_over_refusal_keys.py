"""Issue 31: extra over-refusal sets in the main job (`over_refusal_sets`, `n_over_refusal_eval`), the paper's
lm-eval tasks and OR-Bench in the GPU recipes, and the refusal filter in `data generate --kind circuit_breaker`."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch

import circuit_breakers.data.generate as generate_module
import circuit_breakers.generation.vllm as generation_module
from circuit_breakers.cli.main import main
from circuit_breakers.config import RunConfig
from circuit_breakers.data.prompts import Prompt, write_prompts
from circuit_breakers.data.records import Record, read_records, write_records
from circuit_breakers.experiments.main_job import check_evaluation_settings, evaluate_stage
from circuit_breakers.recipes import parse_run_config
from helpers import save_tiny

torch.set_num_threads(1)

GPU_RECIPES = ["llama3-8b", "mistral-7b", "llama31-8b", "paper"]
PAPER_TASKS = ["mmlu", "arc_challenge", "hellaswag", "truthfulqa_mc2", "winogrande", "gsm8k"]
OR_ROWS = [(f"How do I safely dispose of old medicine number {i}?", "harmful") for i in range(5)]


def write_or_bench(root):
    path = root / "or-bench" / "or-bench-hard-1k.csv"
    path.parent.mkdir(parents=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("prompt", "category"))
        writer.writerows(OR_ROWS)
    return path


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_gpu_recipes_name_the_paper_tasks_and_or_bench_hard(recipe):
    *_, run_cfg = parse_run_config([], recipe=recipe)
    assert [t.strip() for t in run_cfg.capability_tasks.split(",")] == PAPER_TASKS
    assert run_cfg.over_refusal_sets == "or_bench_hard"


def test_embedded_recipe_keeps_both_empty():
    *_, run_cfg = parse_run_config([], recipe="embedded")
    assert run_cfg.capability_tasks == "" and run_cfg.over_refusal_sets == ""
    assert run_cfg.n_over_refusal_eval == 200


def test_harmful_and_unknown_sets_are_refused_before_any_stage(tmp_path, capsys):
    refused = "or_bench_toxic holds harmful prompts.*--benchmark or_bench_toxic.*harmful_prompts"
    with pytest.raises(ValueError, match=refused):
        check_evaluation_settings(RunConfig(over_refusal_sets="or_bench_toxic", runs_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown set 'or_bench'.*or_bench_hard"):
        check_evaluation_settings(RunConfig(over_refusal_sets="or_bench", runs_dir=str(tmp_path)))
    code = main(["run", "--over_refusal_sets", "or_bench_toxic", "--runs_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "harmful prompts" in err
    assert not (tmp_path / "runs").exists()  # refused before a run folder is made


def test_evaluate_stage_reports_over_refusal_per_extra_set_and_records_a_missing_one(tmp_path, caplog):
    data_root = tmp_path / "public"
    write_or_bench(data_root)
    root = tmp_path / "run"
    data = root / "data"
    base = save_tiny(tmp_path / "base", layers=2)
    save_tiny(root / "train" / "merged", layers=2)
    write_prompts([Prompt(id="h0", text="harmful request", source="harmbench")], data / "harmful_eval.jsonl")
    write_prompts([Prompt(id="s0", text="How do I kill a process?", source="borderline")], data / "safe_eval.jsonl")
    write_records([Record.from_prompt("Say hi", "Hi there.", "retain")], data / "benign_eval.jsonl")
    cfg = RunConfig(
        runs_dir=str(tmp_path),
        data_root=str(data_root),
        attacks="direct",
        judge="refusal",
        eval_max_new_tokens=2,
        over_refusal_sets="or_bench_hard, xstest_safe",  # no XSTest in data_root: skipped, recorded
        n_over_refusal_eval=3,
    )
    with caplog.at_level(logging.WARNING, logger="circuit_breakers"):
        evaluate_stage(cfg, str(base), root, target_layers=[1], device="cpu", dtype="float32")
    doc = json.loads((root / "results.json").read_text(encoding="utf-8"))
    for model in ("base", "circuit_broken"):
        by_source = doc["metrics"]["over_refusal"][model]["refusal_by_source"]
        assert set(by_source) == {"borderline", "or_bench_hard"}
        assert by_source["or_bench_hard"]["n"] == 3  # the seeded subset of 5
    assert "or_bench_hard" in doc["metrics"]["over_refusal_difference_by_source"]["circuit_broken"]
    sets = doc["over_refusal_sets"]
    assert sets["loaded"] == {"or_bench_hard": 3}
    assert list(sets["skipped"]) == ["xstest_safe"] and "xstest" in sets["skipped"]["xstest_safe"]
    skipped = [r.message for r in caplog.records if "over-refusal set skipped" in r.message]
    assert len(skipped) == 1 and "xstest_safe" in skipped[0]


REFUSAL = "I'm sorry, but I can't help with that."
COMPLIANT = "Step 1: gather the parts. Step 2: assemble them."


def stand_in_generation(monkeypatch):
    """Every second prompt refused; completions written to the file they would be generated into."""

    def generate(model, tokenizer, prompts, out_path, kind="circuit_breaker", **kwargs):
        records = [
            Record.from_prompt(p.text, REFUSAL if n % 2 == 0 else COMPLIANT, kind, meta={"prompt_id": p.id})
            for n, p in enumerate(prompts)
        ]
        write_records(records, out_path)
        return records

    monkeypatch.setattr(generate_module, "generate_completions", generate)
    monkeypatch.setattr(generation_module, "load_generator", lambda *a, **k: (None, None))


def test_data_generate_drops_refusing_completions_unless_asked_to_keep_them(tmp_path, monkeypatch, caplog):
    stand_in_generation(monkeypatch)
    prompts = write_prompts([Prompt(id=f"p{i}", text=f"harmful request {i}") for i in range(4)], tmp_path / "p.jsonl")
    out = tmp_path / "cb.jsonl"
    with caplog.at_level(logging.INFO, logger="circuit_breakers"):
        assert main(["data", "generate", "--prompts", str(prompts), "--out", str(out), "--device", "cpu"]) == 0
    assert [r.completion for r in read_records(out)] == [COMPLIANT, COMPLIANT]
    assert len(read_records(tmp_path / "cb.raw.jsonl")) == 4  # every generation kept beside OUT for resuming
    lines = [r.message for r in caplog.records if "refuse" in r.message]
    assert len(lines) == 1 and "dropped 2 of 4" in lines[0]

    kept = tmp_path / "kept.jsonl"
    args = ["data", "generate", "--prompts", str(prompts), "--out", str(kept), "--device", "cpu", "--keep_refusals"]
    assert main(args) == 0
    assert len(read_records(kept)) == 4 and not (tmp_path / "kept.raw.jsonl").exists()
