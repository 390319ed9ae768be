"""Category-specific circuit breakers (issue 9): named adapters per category, switched and combined exactly,
and the category experiment end to end on a tiny model."""

import json

import pytest
import torch
from peft import PeftModel

from circuit_breakers.adapters import COMBINED, add_lora, combine_adapters, export_merged, load_adapters
from circuit_breakers.config import ConfigError, ModelConfig
from circuit_breakers.data.prompts import Prompt, read_prompts
from circuit_breakers.data.records import Record
from circuit_breakers.experiments.categories import (
    asr_matrix,
    by_category,
    category_experiment,
    category_sets,
    specificity,
)
from circuit_breakers.models import load_model
from circuit_breakers.recipes import parse_config
from helpers import save_tiny


def rec(text, category, kind="circuit_breaker"):
    return Record.from_prompt(f"request {text}", f"answer {text}", kind, category=category)


def test_category_sets_reroute_the_covered_and_retain_the_others():
    cb = [rec(1, "a"), rec(2, "b"), rec(3, "a"), rec(4, None)]
    retain = [rec(5, None, "retain")]
    assert list(by_category(cb)) == ["a", "b", "uncategorised"]
    rerouted, retained = category_sets(cb, retain, ["a"])
    assert [r.messages[0]["content"] for r in rerouted] == ["request 1", "request 3"]
    assert [r.messages[0]["content"] for r in retained] == ["request 5", "request 2", "request 4"]
    assert all(r.kind == "retain" for r in retained) and cb[1].kind == "circuit_breaker"  # copies, not edits
    assert category_sets(cb, retain, ["a"], retain_others=False)[1] == retain
    assert [r.category for r in category_sets(cb, retain, ["a", "b"])[0]] == ["a", "a", "b"]
    # continuing an adapter that covers "a" on "b": a's rows are neither rerouted nor retained
    rerouted, retained = category_sets(cb, retain, ["b"], kept=["a"])
    assert [r.category for r in rerouted] == ["b"] and [r.category for r in retained] == [None, None]
    with pytest.raises(ValueError, match="no circuit-breaker rows of category \\['c'\\]"):
        category_sets(cb, retain, ["c"])


def lora_dirs(tmp_path, tiny):
    """Two adapters with different random weights (both on blocks 0..2), saved."""
    dirs = {}
    for i, name in enumerate(["a", "b"]):
        torch.manual_seed(i)
        model = add_lora(
            load_model(str(tiny), dtype="float32"),
            ModelConfig(lora_r=2 + 2 * i, lora_alpha=4, lora_dropout=0.0, lora_init="random", lora_init_scale=0.3),
            range(3),
        )
        model.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    return dirs


def test_named_adapters_switch_and_combine_exactly(tmp_path):
    tiny = save_tiny(tmp_path / "model", layers=4)
    dirs = lora_dirs(tmp_path, tiny)
    ids = torch.randint(3, 250, (2, 9))

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits

    base = logits(load_model(str(tiny), dtype="float32"))
    alone = {
        n: logits(PeftModel.from_pretrained(load_model(str(tiny), dtype="float32"), str(d)).eval())
        for n, d in dirs.items()
    }
    model = load_adapters(load_model(str(tiny), dtype="float32"), dirs).eval()
    assert model.active_adapter == "a"
    torch.testing.assert_close(logits(model), alone["a"])
    model.set_adapter("b")
    torch.testing.assert_close(logits(model), alone["b"])
    assert not torch.allclose(alone["a"], alone["b"], atol=1e-3)

    # the combination's weight change is exactly the sum of the two adapters' changes (ranks 2 and 4)
    combine_adapters(model, ["a", "b"])
    assert model.active_adapter == COMBINED
    merged = {n: export_merged(d, str(tiny), tmp_path / f"merged-{n}", "float32") for n, d in dirs.items()}
    both = export_merged(list(dirs.values()), str(tiny), tmp_path / "merged-both", "float32")
    w = {n: load_model(str(p), dtype="float32").state_dict() for n, p in {**merged, "both": both}.items()}
    w0 = load_model(str(tiny), dtype="float32").state_dict()
    changed = [k for k in w0 if not torch.allclose(w["a"][k], w0[k])]
    assert changed and any(".mlp." in k for k in changed)
    for key in w0:
        torch.testing.assert_close(
            w["both"][key] - w0[key], (w["a"][key] - w0[key]) + (w["b"][key] - w0[key]), rtol=1e-4, atol=1e-6, msg=key
        )
    # the in-memory combination computes what the merged one does
    torch.testing.assert_close(logits(model), logits(load_model(str(both), dtype="float32")), rtol=1e-4, atol=1e-4)
    combine_adapters(model, ["a", "b"], [1.0, 0.0])  # weight 0: b switched off; re-adding replaces the old
    torch.testing.assert_close(logits(model), alone["a"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base, alone["a"], atol=1e-3)


def test_specificity_compares_own_drop_with_every_other():
    matrix = {"base": {"x": 1.0, "y": 0.8}, "x": {"x": 0.2, "y": 0.6}, "y": {"x": 0.1, "y": 0.5}}
    spec = specificity(matrix, "base", ["x", "y"])
    assert spec["x"] == {"drops": {"x": 80.0, "y": 20.0}, "specific": True}
    assert spec["y"] == {"drops": {"x": 90.0, "y": 30.0}, "specific": False}
    metrics = {"asr_by_category": {"direct": {"base": {"x": {"value": 0.5}}, "x": {"x": {"value": 0.0}}}}}
    assert asr_matrix(metrics) == {"base": {"x": 0.5}, "x": {"x": 0.0}}


def test_category_experiment_end_to_end(tmp_path):
    tiny = save_tiny(tmp_path / "model", layers=6)
    prompts = [
        Prompt(id=f"{c}{i}", text=f"Tell me about {c} number {i}", category=c)
        for c in ("alpha", "beta", "gamma")
        for i in range(5)
    ]
    prompts.append(Prompt(id="other", text="Unrelated request", category="delta"))
    retain = [rec(f"benign {i}", None, "retain") for i in range(4)]
    m, d, c = parse_config(
        [
            "--model_name_or_path",
            str(tiny),
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
            "10",
            "--max_length",
            "96",
            "--lora_init",
            "random",
        ]
    )
    out = tmp_path / "exp"
    args = (prompts, retain, out, m, d, c, ["alpha", "beta", "gamma"], 6)
    options = dict(completion_tokens=5, max_new_tokens=5, batch_size=4, judge="refusal")
    record = category_experiment(*args, **options)

    held = read_prompts(out / "data" / "prompts_eval.jsonl")
    trained = read_prompts(out / "data" / "prompts_train.jsonl")
    assert sorted(p.category for p in held) == ["alpha", "alpha", "beta", "beta", "gamma", "gamma"]
    assert {p.id for p in held}.isdisjoint({p.id for p in trained}) and "other" not in {p.id for p in trained}
    assert record["rows_per_category"] == {"alpha": 3, "beta": 3, "gamma": 3}
    for category in ("alpha", "beta", "gamma"):  # each reroutes its own 3 rows and retains 4 benign + 6 others
        summary = json.loads((out / "adapters" / category / "summary.json").read_text())
        assert summary["examples"] == {"circuit_breaker": 3, "retain": 10}
    continual = json.loads((out / "adapters" / "continual-alpha+beta" / "summary.json").read_text())
    assert continual["examples"] == {"circuit_breaker": 3, "retain": 7}  # beta alone; gamma retained, alpha kept
    run = json.loads((out / "adapters" / "continual-alpha+beta" / "training_run.json").read_text())
    assert str(out / "adapters" / "alpha" / "adapter") in json.dumps(run)  # it started from alpha's adapter
    models = {"base", "alpha", "beta", "gamma", COMBINED, "alpha+beta (continual)"}
    assert set(record["asr"]["direct"]) == models
    assert all(set(row) == {"alpha", "beta", "gamma"} for row in record["asr"]["direct"].values())
    assert set(record["specificity"]["direct"]) == {"alpha", "beta", "gamma"}
    assert set(record["continual"]["direct"]) == {
        "first_category_change_points",
        "second_category_drop_points",
        "kept_within_5_points",
    }
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]["asr_by_category"]["direct"]) == models
    table = (out / "categories-direct.md").read_text().splitlines()
    assert table[0] == "| model | alpha | beta | gamma |" and len(table) == 2 + len(models)

    # a second call reuses every adapter and evaluation cell
    stamp = (out / "adapters" / "alpha" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    again = category_experiment(*args, **options)
    assert again["asr"] == record["asr"]
    assert (out / "adapters" / "alpha" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    # other settings: the finished adapters are not silently reused
    m2, d2, c2 = parse_config(
        [
            "--model_name_or_path",
            str(tiny),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "2",
            "--target_layers",
            "2",
            "4",
            "--max_length",
            "96",
            "--lora_init",
            "random",
        ]
    )
    with pytest.raises(ConfigError, match="already holds a different run .*max_steps 2 -> 3"):
        category_experiment(prompts, retain, out, m2, d2, c2, ["alpha", "beta", "gamma"], 6, **options)
