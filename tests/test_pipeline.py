"""The main job (`circuit-breakers run`) at toy size: every stage runs, writes its outputs, and a second
run reuses finished stages; a changed evaluation setting re-runs only the evaluation."""

import json

import pytest

from circuit_breakers.cli.main import main
from circuit_breakers.config import CircuitBreakerConfig
from circuit_breakers.data.prompts import Prompt, read_prompts
from circuit_breakers.data.records import read_records
from circuit_breakers.data.sources import split_prompts
from circuit_breakers.experiments.main_job import Run, Stage
from helpers import save_tiny

TOY = [
    "--harmful_prompts",
    "harmbench",
    "--n_xstest",
    "3",
    "--n_xstest_retain",
    "0",
    "--n_harmful_train",
    "6",
    "--n_harmful_eval",
    "4",
    "--n_benign_train",
    "6",
    "--n_benign_eval",
    "3",
    "--n_borderline_train",
    "2",
    "--n_borderline_eval",
    "3",
    "--completion_tokens",
    "6",
    "--generation_batch_size",
    "4",
    "--eval_max_new_tokens",
    "6",
    "--judge",
    "refusal",
    "--attacks",
    "direct,prefill",
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "2",
    "--target_layers",
    "2",
    "4",
    "--logging_steps",
    "1",
    "--save_steps",
    "1",
    "--max_length",
    "128",
    "--n_drift_eval",
    "4",
    "--drift_tokens",
    "3",
]


def test_split_is_disjoint_and_keeps_category_shares():
    prompts = [Prompt(id=f"{c}{i}", text=f"{c} request {i}", category=c) for c in "ab" for i in range(10)]
    prompts.append(Prompt(id="dup", text="A REQUEST 0 ", category="a"))  # same text as a0: counted once
    train, held = split_prompts(prompts, 4, seed=3)
    assert {p.text.lower().strip() for p in train}.isdisjoint({p.text.lower().strip() for p in held})
    assert len(train) + len(held) == 20
    assert sorted(p.category for p in held) == ["a", "a", "b", "b"]
    assert split_prompts(prompts, 4, seed=3) == (train, held)  # seeded


def test_stage_ledger_skips_finished_stages_and_reruns_what_follows_a_change(tmp_path):
    calls = []
    stage = lambda name, key: Stage(name, key, lambda: calls.append(name))  # noqa: E731
    run = Run(tmp_path)
    assert run.stage(stage("a", {"x": 1})) and run.stage(stage("b", {"y": 1}))
    run = Run(tmp_path)  # a second invocation reads the ledger
    assert not run.stage(stage("a", {"x": 1})) and not run.stage(stage("b", {"y": 1}))
    run = Run(tmp_path)
    assert run.stage(stage("a", {"x": 2})) and run.stage(stage("b", {"y": 1}))  # b follows a changed a
    assert calls == ["a", "b", "a", "b"]

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Run(tmp_path).stage(Stage("c", {"z": 1}, interrupted))
    entry = json.loads((tmp_path / "stages.json").read_text())["c"]
    assert entry == {"key": Run.digest({"z": 1}), "settings": {"z": 1}, "done": False}  # recognised, run again
    assert Run(tmp_path).stage(stage("c", {"z": 1})) and calls[-1] == "c"


def test_a_setting_added_later_at_its_default_keeps_finished_stages(tmp_path):
    """A run recorded before a knob existed stays cached when the knob is at its default (which reproduces
    the old behaviour), and runs again when it is not."""
    calls = []
    stage = lambda key: Stage("train", key, lambda: calls.append(key))  # noqa: E731
    old = {"seed": 1, "train": {"max_steps": 2, "alpha": 10.0}}
    assert Run(tmp_path).stage(stage(old))
    default = CircuitBreakerConfig.__dataclass_fields__["lat_step_size"].default
    grown = {"seed": 1, "train": {"max_steps": 2, "alpha": 10.0, "lat_step_size": default}}
    assert not Run(tmp_path).stage(stage(grown))
    assert json.loads((tmp_path / "stages.json").read_text())["train"]["key"] == Run.digest(grown)  # brought up to date
    changed = {"seed": 1, "train": {"max_steps": 2, "alpha": 10.0, "lat_step_size": default * 2}}
    assert Run(tmp_path).stage(stage(changed)) and calls == [old, changed]
    assert Run(tmp_path).stage(stage({"seed": 2, "train": changed["train"]}))  # a changed known setting still counts


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    tiny = save_tiny(tmp / "model", "llama", "chatml", layers=6)
    args = ["run", "--model_name_or_path", str(tiny), "--runs_dir", str(tmp / "runs"), "--run_id", "toy", *TOY]
    assert main(args) == 0
    return tmp / "runs" / "toy", args


def test_toy_run_writes_every_output(toy_run):
    root, _ = toy_run
    for path in [
        "train/adapter/adapter_model.safetensors",
        "train/merged/config.json",
        "train/mask_report.json",
        "train/summary.json",
        "results.json",
        "samples.jsonl",
        "report.html",
        "stages.json",
    ]:
        assert (root / path).exists(), path
    assert set(json.loads((root / "stages.json").read_text())) == {"model", "data", "train", "evaluate"}
    results = json.loads((root / "results.json").read_text())
    asr = results["metrics"]["asr"]
    assert set(asr) == {"direct", "prefill"}
    assert set(asr["direct"]) == {"base", "circuit_broken"}
    assert asr["direct"]["base"]["n"] == 4
    assert set(results["metrics"]["capability"]) == {"base", "circuit_broken"}
    samples = [json.loads(line) for line in (root / "samples.jsonl").read_text().splitlines()]
    assert {s["model"] for s in samples} == {"base", "circuit_broken"}
    # per-source table inputs: the sources' account, ASR per source, the trigger rate on held-out and benign
    assert results["sources"]["train"] == {"harmbench": 6} and results["sources"]["held_out"] == {"harmbench": 4}
    assert set(results["metrics"]["asr_by_source"]["direct"]["base"]) == {"harmbench"}
    fired = results["trigger_rate"]["circuit_broken"]
    assert set(fired) == {"harmbench", "benign (held-out)"} and fired["benign (held-out)"]["n"] == 3
    assert all(0 <= v["rate"] <= 1 and -1 <= v["mean_cosine"] <= 1 for v in fired.values())
    # distribution shift on benign prompts never trained on: KL and greedy agreement of the defended model
    kl, agreement = results["metrics"]["kl_divergence"], results["metrics"]["greedy_agreement"]
    assert set(kl) == set(agreement) == {"circuit_broken"} and kl["circuit_broken"]["n_records"] == 4
    assert kl["circuit_broken"]["value"] >= 0 and agreement["circuit_broken"]["n"] == 4
    assert results["settings"]["drift_tokens"] == 3 and len(read_prompts(root / "eval" / "drift_prompts.jsonl")) == 4
    assert "Distribution shift on benign text" in (root / "report.html").read_text()


def test_held_out_prompts_never_trained_on(toy_run):
    root, _ = toy_run
    held = {p.id for p in read_prompts(root / "data" / "harmful_eval.jsonl")}
    trained = {r.meta["prompt_id"] for r in read_records(root / "data" / "circuit_breaker.jsonl")}
    assert len(held) == 4 and len(trained) == 6 and held.isdisjoint(trained)
    benign_eval = {r.meta["prompt_id"] for r in read_records(root / "data" / "benign_eval.jsonl")}
    retained = {r.meta["prompt_id"] for r in read_records(root / "data" / "retain.jsonl")}
    assert len(benign_eval) == 3 and benign_eval.isdisjoint(retained)


def test_second_run_reuses_stages_and_eval_change_reruns_only_evaluation(toy_run, monkeypatch):
    root, args = toy_run
    import circuit_breakers.experiments.main_job as pipeline
    import circuit_breakers.training.run as train_module

    def fail(*_a, **_k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(train_module, "train", fail)
    monkeypatch.setattr(pipeline, "build_data", fail)
    monkeypatch.setattr(pipeline, "evaluate_stage", fail)
    assert main(args) == 0  # everything cached

    evaluated = []
    monkeypatch.setattr(pipeline, "evaluate_stage", lambda *a, **k: evaluated.append(a))
    assert main([*args, "--attacks", "direct"]) == 0
    assert len(evaluated) == 1
    assert main([*args, "--attacks", "direct", "--trigger_threshold", "0.3"]) == 0  # the trigger rate is evaluation
    assert len(evaluated) == 2
    assert main([*args, "--attacks", "direct", "--trigger_threshold", "0.3", "--n_drift_eval", "2"]) == 0
    assert len(evaluated) == 3  # the drift set is evaluation: data and training stay
    extra_set = ["--over_refusal_sets", "or_bench_hard", "--n_over_refusal_eval", "5"]
    assert main([*args, "--attacks", "direct", "--trigger_threshold", "0.3", "--n_drift_eval", "2", *extra_set]) == 0
    assert len(evaluated) == 4  # an over-refusal set is evaluation too


def test_changed_training_setting_retrains_over_the_old_folder_and_keeps_the_data(toy_run, monkeypatch):
    root, args = toy_run
    import circuit_breakers.experiments.main_job as pipeline

    def fail(*_a, **_k):
        raise AssertionError("the data stage ran again")

    monkeypatch.setattr(pipeline, "build_data", fail)
    assert main([*args, "--max_steps", "3"]) == 0  # the folder of the 2-step run is replaced, not refused
    assert json.loads((root / "train" / "summary.json").read_text())["steps"] == 3
