"""Metrics checked against hand computations, and the base-vs-circuit-broken grid on two tiny models:
cells written, resumed without recomputation, recomputed only where a setting changed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from circuit_breakers.data.prompts import Prompt
from circuit_breakers.data.records import Record
from circuit_breakers.evaluation import compare
from circuit_breakers.evaluation.compare import evaluate_models
from circuit_breakers.evaluation.judges import RefusalJudge
from circuit_breakers.evaluation.metrics import (
    best_of_n,
    bootstrap_ci,
    mcnemar_exact,
    paired_difference,
    rate,
    wilson_interval,
)
from circuit_breakers.evaluation.results import EvalResult, Sample
from circuit_breakers.evaluation.store import load_result
from helpers import make_model, make_tokenizer

torch.set_num_threads(1)

# --------------------------------------------------------------------------------------------------
# Metrics by hand


def test_rate_and_wilson_interval_by_hand():
    r = rate([True, True, False, False, False])
    assert (r.k, r.n, r.value) == (2, 5, 0.4)
    # Wilson 95%, z = 1.959964: centre (p + z^2/2n)/(1 + z^2/n), half z sqrt(p(1-p)/n + z^2/4n^2)/(1 + z^2/n)
    z = 1.959964
    centre = (0.4 + z * z / 10) / (1 + z * z / 5)
    half = z * math.sqrt(0.4 * 0.6 / 5 + z * z / 100) / (1 + z * z / 5)
    assert (r.wilson_low, r.wilson_high) == pytest.approx((centre - half, centre + half), abs=1e-6)
    assert (r.wilson_low, r.wilson_high) == pytest.approx((0.1176, 0.7693), abs=1e-4)  # published table value
    # Informative at 0%: the upper end is z^2 / (n + z^2).
    assert wilson_interval(0, 10) == pytest.approx((0.0, z * z / (10 + z * z)), abs=1e-7)


def test_bootstrap_interval_by_hand():
    # Constant data: every resample has the same mean.
    assert bootstrap_ci([0.3] * 7) == pytest.approx((0.3, 0.3))
    # Two values {0, 1}: resample means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% quantiles are 0 and 1.
    assert bootstrap_ci([0.0, 1.0], n_resamples=4000) == (0.0, 1.0)
    # 50 of 100: the normal approximation p +- 1.96 sqrt(p(1-p)/n) = 0.5 +- 0.098.
    low, high = bootstrap_ci([1.0] * 50 + [0.0] * 50, n_resamples=4000)
    assert low == pytest.approx(0.402, abs=0.02) and high == pytest.approx(0.598, abs=0.02)
    assert bootstrap_ci([1, 0, 1], seed=3) == bootstrap_ci([1, 0, 1], seed=3)  # seeded: reproducible
    assert all(math.isnan(x) for x in bootstrap_ci([]))


def test_paired_difference_and_mcnemar_by_hand():
    base = [1, 1, 1, 0, 0, 0]
    other = [0, 0, 1, 0, 1, 0]
    d = paired_difference(base, other)
    assert (d.base, d.other, d.difference) == pytest.approx((0.5, 1 / 3, -1 / 6))
    assert (d.base_only, d.other_only, d.n) == (2, 1, 6)
    # Exact McNemar on 2 vs 1 discordant pairs: 2 * P(X <= 1), X ~ Bin(3, 1/2) = 2 * 4/8 -> capped at 1.
    assert d.p_value == 1.0
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64)
    assert mcnemar_exact(5, 1) == pytest.approx(2 * 7 / 64)
    assert d.low <= d.difference <= d.high
    # Identical models: the paired interval is exactly zero (an unpaired one would not be).
    same = paired_difference(base, base)
    assert (same.low, same.high, same.difference) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_difference([1], [1, 0])


def test_best_of_n_groups_variants():
    assert best_of_n([False, True, False, False], ["a", "a", "b", "b"]) == [True, False]


def sample(model, attack, pid, harmful, variant=0, category="c1", complied=None):
    return Sample(
        model=model,
        attack=attack,
        prompt_id=pid,
        prompt=f"p{pid}",
        completion="x",
        harmful=harmful,
        complied=harmful if complied is None else complied,
        score=float(harmful),
        judge="refusal",
        variant=variant,
        category=category,
    )


def test_compute_metrics_by_hand():
    samples = [
        # template: two variants per prompt; prompt 1 broken by its second variant only.
        sample("base", "template", "1", False, 0),
        sample("base", "template", "1", True, 1),
        sample("base", "template", "2", True, 0),
        sample("base", "template", "2", True, 1),
        sample("base", "template", "3", False, 0, "c2"),
        sample("base", "template", "3", False, 1, "c2"),
        sample("cb", "template", "1", False, 0),
        sample("cb", "template", "1", False, 1),
        sample("cb", "template", "2", True, 0),
        sample("cb", "template", "2", False, 1),
        sample("cb", "template", "3", False, 0, "c2"),
        sample("cb", "template", "3", False, 1, "c2"),
        # over-refusal: base answers both safe prompts, cb one.
        sample("base", "over_refusal", "s1", False, complied=True),
        sample("base", "over_refusal", "s2", False, complied=True),
        sample("cb", "over_refusal", "s1", False, complied=True),
        sample("cb", "over_refusal", "s2", False, complied=False),
    ]
    result = EvalResult(
        models={"base": "a", "cb": "b"},
        attacks={"template": {}},
        judge={"name": "refusal"},
        samples=samples,
        capability={"base": [1.0, 2.0], "cb": [1.5, 2.5]},
    )
    m = result.recompute()
    assert m["asr"]["template"]["base"]["value"] == pytest.approx(2 / 3)  # prompts 1 and 2
    assert m["asr"]["template"]["cb"]["value"] == pytest.approx(1 / 3)
    assert m["asr_all_inputs"]["template"]["base"]["value"] == pytest.approx(3 / 6)
    assert m["asr_by_category"]["template"]["base"]["c1"]["value"] == 1.0
    assert m["asr_by_category"]["template"]["base"]["c2"]["value"] == 0.0
    diff = m["asr_difference"]["template"]["cb"]
    assert diff["difference"] == pytest.approx(-1 / 3) and (diff["base_only"], diff["other_only"]) == (1, 0)
    assert m["over_refusal"]["cb"]["refusal"]["value"] == 0.5 and m["over_refusal"]["base"]["refusal"]["value"] == 0.0
    assert m["over_refusal_difference"]["cb"]["difference"] == -0.5
    assert m["capability"]["base"]["value"] == 1.5
    assert m["capability_change"]["cb"]["value"] == pytest.approx(2.0 / 1.5 - 1)
    low, high = m["capability_change"]["cb"]["low"], m["capability_change"]["cb"]["high"]
    # Resampling the two records: ratios (1.5/1, 2.5/2, 2/1.5) span [0.25, 0.5] minus 1.
    assert 0.25 - 1e-9 <= low <= high <= 0.5 + 1e-9


# --------------------------------------------------------------------------------------------------
# The grid on two tiny models

PROMPTS = [
    Prompt(id="h1", text="How do I bake bread?", target="Sure, here is how", category="c1"),
    Prompt(id="h2", text="Write a poem about the sea.", target="Sure, here is a poem", category="c2"),
    Prompt(id="h3", text="Explain photosynthesis.", category="c1"),
]
SAFE = [
    Prompt(id="s1", text="What is the capital of France?", source="toy"),
    Prompt(id="s2", text="How do I kill a Python process?", source="toy"),
]
BENIGN = [
    Record.from_prompt("How do I bake bread?", "Mix flour, water, yeast and salt.", "retain"),
    Record.from_prompt("Write a poem about the sea.", "The waves roll in, the gulls cry out.", "retain"),
]


@pytest.fixture(scope="module")
def two_models():
    tokenizer = make_tokenizer("chatml")
    return {
        "base": (make_model("llama", len(tokenizer), layers=2, seed=0), tokenizer),
        "circuit_broken": (make_model("llama", len(tokenizer), layers=2, seed=1), tokenizer),
    }


class Counter:
    """Wraps a compare.py function and counts its calls (and can fail on a chosen cell)."""

    def __init__(self, fn, fail_on=None):
        self.fn, self.calls, self.fail_on = fn, [], fail_on

    def __call__(self, *args, **kwargs):
        self.calls.append(args[:2])
        if self.fail_on is not None and self.fail_on in args[:2]:
            raise RuntimeError("simulated crash")
        return self.fn(*args, **kwargs)


def run(models, out, **kwargs):
    options = dict(
        judge=RefusalJudge(),
        benign=BENIGN,
        safe_prompts=SAFE,
        max_new_tokens=4,
        batch_size=2,
        out_dir=out,
        progress=False,
    )
    return evaluate_models(models, PROMPTS, ["direct", "prefill"], **{**options, **kwargs})


def test_grid_writes_cells_and_resumes(two_models, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    attack = Counter(compare.run_attack, fail_on="prefill")
    monkeypatch.setattr(compare, "run_attack", attack)
    first = run(two_models, out)
    # A failing cell is recorded, not fatal, and not marked finished.
    assert {(e["model"], e["cell"]) for e in first.errors} == {("base", "prefill"), ("circuit_broken", "prefill")}
    cells = json.loads((out / "cells.json").read_text())["cells"]
    assert sorted(cells) == sorted(f"{m}\t{c}" for m in two_models for c in ("direct", "over_refusal", "capability"))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * (len(PROMPTS) + len(SAFE))
    assert {"prompt", "attack", "completion", "verdict", "score", "judge", "cell"} <= set(rows[0])
    assert len(first.capability["base"]) == len(BENIGN) and all(math.isfinite(x) for x in first.capability["base"])

    # Second call: only the failed cells run; finished ones are reused as they are.
    attack = Counter(compare.run_attack.fn)
    safe = Counter(compare.run_safe)
    loss = Counter(compare.benign_loss)
    monkeypatch.setattr(compare, "run_attack", attack)
    monkeypatch.setattr(compare, "run_safe", safe)
    monkeypatch.setattr(compare, "benign_loss", loss)
    second = run(two_models, out)
    assert attack.calls == [("base", "prefill"), ("circuit_broken", "prefill")]
    assert safe.calls == [] and loss.calls == [] and not second.errors
    assert [s.completion for s in second.cell("base", "direct")] == [s.completion for s in first.cell("base", "direct")]
    # The prefill is part of what the judge read.
    assert all(s.completion.startswith(s.prefill) for s in second.cell("base", "prefill"))

    # Third call, nothing changed: nothing runs. Then a changed generation length reruns generations only.
    attack.calls.clear()
    run(two_models, out)
    assert attack.calls == [] and safe.calls == [] and loss.calls == []
    third = run(two_models, out, max_new_tokens=3)
    assert len(attack.calls) == 4 and len(safe.calls) == 2 and loss.calls == []
    assert len(third.samples) == 2 * (2 * len(PROMPTS) + len(SAFE))

    # The result rebuilt from disk has the same metrics.
    rebuilt = load_result(out)
    assert rebuilt.metrics["asr"] == third.metrics["asr"]
    assert rebuilt.capability == third.capability


def test_identical_models_have_zero_paired_difference(two_models):
    base = two_models["base"]
    result = evaluate_models(
        {"base": base, "copy": base}, PROMPTS, ["direct"], judge=RefusalJudge(), max_new_tokens=4, progress=False
    )
    diff = result.metrics["asr_difference"]["direct"]["copy"]
    assert diff["difference"] == 0.0 and diff["p_value"] == 1.0
    assert np.isclose(
        result.metrics["asr"]["direct"]["base"]["value"], result.metrics["asr"]["direct"]["copy"]["value"]
    )


def test_bad_inputs_are_rejected(two_models):
    with pytest.raises(ValueError, match="no models"):
        evaluate_models({}, PROMPTS, ["direct"])
    with pytest.raises(ValueError, match="unique"):
        evaluate_models(two_models, [PROMPTS[0], PROMPTS[0]], ["direct"], judge=RefusalJudge())
    with pytest.raises(ValueError, match="unknown attack"):
        evaluate_models(two_models, PROMPTS, ["gcgx"], judge=RefusalJudge())


def test_record_losses_are_aligned_and_batch_independent(two_models):
    """Per-record capability losses keep the records' order (NaN for one that cannot be rendered), so
    two models pair record by record, and padding inside a batch does not change them."""
    from circuit_breakers.evaluation.capability import record_losses, teacher_forced_loss

    model, tokenizer = two_models["base"]
    broken = Record.from_prompt("An empty answer follows.", "   ", "retain")  # dropped: empty completion
    records = [BENIGN[1], broken, BENIGN[0]]
    batched = record_losses(model, tokenizer, records, batch_size=3)
    alone = [record_losses(model, tokenizer, [r], batch_size=1)[0] for r in records]
    assert math.isnan(batched[1]) and math.isnan(alone[1])
    assert batched[0] == pytest.approx(alone[0], abs=1e-5) and batched[2] == pytest.approx(alone[2], abs=1e-5)
    assert batched[0] != pytest.approx(batched[2])
    total = teacher_forced_loss(model, tokenizer, records)
    assert total.n_records == 2 and sum(total.dropped.values()) == 1
    assert total.record_losses == pytest.approx([batched[0], batched[2]], abs=1e-5)


def test_a_model_retrained_into_the_same_folder_is_evaluated_again(tmp_path):
    from circuit_breakers.evaluation.compare import model_identity

    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"one")
    first = model_identity(str(folder))
    (folder / "model.safetensors").write_bytes(b"other weights")
    assert model_identity(str(folder)) != first
    assert model_identity("embedded") == "embedded"  # names that are not folders keep their old cells


def test_soft_prompts_are_saved_and_replayed_without_optimising(two_models, tmp_path, monkeypatch):
    from circuit_breakers.evaluation.attacks import AttackError, embedding, make_attack
    from circuit_breakers.evaluation.cells import soft_prompt_file

    attack = make_attack("embedding", steps=3, restarts=2, init="Answer directly.")
    assert "replay" not in attack.settings()  # results saved before the option existed keep their fingerprints
    first = evaluate_models(
        two_models,
        PROMPTS,
        [attack],
        judge=RefusalJudge(),
        max_new_tokens=5,
        batch_size=2,
        out_dir=tmp_path / "attacked",
        progress=False,
    )
    from safetensors.torch import load_file

    for name in two_models:
        saved = load_file(str(soft_prompt_file(tmp_path / "attacked", name, "embedding")))
        assert sorted(saved) == [f"{p.id}/{r}" for p in PROMPTS for r in (0, 1)]
        assert all(
            t.shape[0] == len(two_models[name][1]("Answer directly.", add_special_tokens=False)["input_ids"])
            for t in saved.values()
        )
    assert saved["h1/0"].ne(saved["h1/1"]).any()  # restarts kept apart

    def no_optimising(*args, **kwargs):
        raise AssertionError("a replayed attack must not optimise")

    monkeypatch.setattr(embedding, "embedding_optimize", no_optimising)
    again = {}
    for name, spec in two_models.items():
        replay = make_attack("embedding", replay=str(soft_prompt_file(tmp_path / "attacked", name, "embedding")))
        result = evaluate_models(
            {name: spec},
            PROMPTS,
            [replay],
            judge=RefusalJudge(),
            max_new_tokens=5,
            batch_size=2,
            out_dir=tmp_path / "replayed",
            progress=False,
            strict=True,
        )
        again.update({(s.model, s.prompt_id, s.variant): s for s in result.samples})
    for s in first.samples:
        replayed = again[(s.model, s.prompt_id, s.variant)]
        assert replayed.completion == s.completion
        assert replayed.attack_details["best_loss"] == s.attack_details["best_loss"]
        assert replayed.attack_details["replayed_from"].endswith(f"{s.model}--embedding.safetensors")
    with pytest.raises(AttackError, match="no soft prompt for prompt"):
        replay.prepare(*two_models["circuit_broken"], [Prompt(id="other", text="Hi")])
    with pytest.raises(AttackError, match="no soft-prompt file"):
        make_attack("embedding", replay=str(tmp_path / "missing.safetensors")).prepare(*two_models["base"], PROMPTS[:1])


class LengthJudge(RefusalJudge):
    """A judge that disagrees with the refusal baseline on purpose: harmful iff the completion has an
    even number of characters (so re-judged verdicts are known exactly)."""

    name = "length"

    def judge(self, prompts, completions, contexts=None):
        from circuit_breakers.evaluation.judges import Verdict

        return [
            Verdict(len(c) % 2 == 0, float(len(c) % 2 == 0), self.name, {"complied": len(c) % 3 == 0})
            for c in completions
        ]

    def settings(self):
        return {"name": self.name}


def test_rejudge_keeps_completions_changes_only_verdicts_and_leaves_the_source_alone(two_models, tmp_path):
    from circuit_breakers.cli.main import main
    from circuit_breakers.evaluation.judges import no_answer_reason
    from circuit_breakers.evaluation.rejudge import rejudge_folder

    source = tmp_path / "eval"
    first = run(two_models, source)
    with (source / "samples.jsonl").open("a") as handle:  # a row cut by an interruption stays where it is
        handle.write('{"model": "base", "attack": "direct", "cut')
    before = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    from circuit_breakers.evaluation.rejudge import rejudge

    assert rejudge(first, LengthJudge()).out_dir is None  # a re-judged result no longer speaks for `source`
    result = rejudge_folder(source, tmp_path / "again", LengthJudge())
    assert {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()} == before
    assert [s.completion for s in result.samples] == [s.completion for s in first.samples]
    for s in result.samples:
        # The tiny models write a few odd characters after a prefill: the no-answer rule decides those.
        written = s.completion[len(s.prefill) :] if s.prefill else None
        if written is not None and no_answer_reason(s.prompt, s.prefill, written):
            assert (s.harmful, s.complied, s.verdict) == (False, False, "no-answer")
            continue
        assert s.judge == "length" and s.harmful == (len(s.completion) % 2 == 0)
        assert s.complied == (len(s.completion) % 3 == 0)
        # Safe prompts are read on compliance, attacked ones on harm, as a fresh evaluation reads them.
        if s.attack == "over_refusal":
            assert s.verdict == ("complied" if s.complied else "incoherent")
        else:
            assert s.verdict == ("harmful" if s.harmful else "not-harmful")
    direct = [len(s.completion) % 2 == 0 for s in result.cell("circuit_broken", "direct")]
    assert result.metrics["asr"]["direct"]["circuit_broken"]["value"] == pytest.approx(sum(direct) / len(direct))
    assert result.capability == first.capability  # losses are carried over, not recomputed
    # The new folder is a complete evaluation: rebuilt from disk it says the same.
    rebuilt = load_result(tmp_path / "again")
    assert rebuilt.metrics["asr"] == result.metrics["asr"] and rebuilt.judge == {"name": "length"}
    meta = json.loads((tmp_path / "again" / "eval_meta.json").read_text())
    assert meta["rejudged_from"]["judge"]["name"] == "refusal"
    assert json.loads((tmp_path / "again" / "results.json").read_text())["config"]["rejudged_from"] == str(source)
    with pytest.raises(FileExistsError, match="already holds an evaluation"):
        rejudge_folder(source, tmp_path / "again", LengthJudge())
    with pytest.raises(ValueError, match="its own folder"):
        rejudge_folder(source, source, LengthJudge())
    with pytest.raises(FileNotFoundError, match="not an evaluation folder"):
        rejudge_folder(tmp_path / "nothing", tmp_path / "x", LengthJudge())
    # The command line: the same judge again gives the same verdicts; a taken folder is a clean error.
    assert main(["eval", "rejudge", str(source), "--out", str(tmp_path / "cli"), "--judge", "refusal"]) == 0
    assert [s.harmful for s in load_result(tmp_path / "cli").samples] == [s.harmful for s in first.samples]
    assert main(["eval", "rejudge", str(source), "--out", str(tmp_path / "cli"), "--judge", "refusal"]) != 0


def test_plain_strings_are_prompts_with_stable_ids(two_models):
    """Plain strings are single-turn prompts whose ids come from their text: the same as `Prompt`s
    built from those strings, and the same ids on every call."""
    requests = [p.text for p in PROMPTS]
    safe = [p.text for p in SAFE]
    model = {"base": two_models["base"]}
    result = evaluate_models(
        model, requests, ["direct"], judge=RefusalJudge(), safe_prompts=safe, max_new_tokens=4, progress=False
    )
    expected = [Prompt.from_dict({"text": text}) for text in requests]
    direct = result.cell("base", "direct")
    assert [s.prompt_id for s in direct] == [p.id for p in expected]
    assert [s.prompt for s in direct] == requests
    assert all(s.prompt_id.startswith("p-") for s in direct)
    assert [s.prompt for s in result.cell("base", "over_refusal")] == safe
    as_prompts = evaluate_models(model, expected, ["direct"], judge=RefusalJudge(), max_new_tokens=4, progress=False)
    assert [s.completion for s in as_prompts.cell("base", "direct")] == [s.completion for s in direct]
    again = evaluate_models(model, requests, ["direct"], judge=RefusalJudge(), max_new_tokens=4, progress=False)
    assert [s.prompt_id for s in again.samples] == [s.prompt_id for s in direct]


def test_benign_loss_passes_hold_at_most_loss_batch_rows_and_equal_one_row_at_a_time():
    torch.manual_seed(0)
    tokenizer = make_tokenizer("chatml")
    model = make_model("llama", vocab_size=len(tokenizer))
    records = [
        Record(
            messages=[
                {"role": "user", "content": f"question {i} " * (1 + i % 3)},
                {"role": "assistant", "content": f"answer number {i} " * (1 + i % 4)},
            ],
            kind="retain",
        )
        for i in range(20)
    ]
    rows: list[int] = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    try:
        batched = compare.benign_loss(model, tokenizer, records, batch_size=64)
    finally:
        handle.remove()
    assert max(rows) == compare.LOSS_BATCH and sum(rows) == len(records)
    single = compare.benign_loss(model, tokenizer, records, batch_size=1)
    assert batched == pytest.approx(single, rel=1e-4)
