"""Distribution shift on benign text (evaluation/drift.py): KL per answer token equals a hand computation
and is 0 for identical models; the agreement read from one teacher-forced pass is exactly what greedy
generation by both models gives (token ids, and where they part); only the base model generates and only
answer positions reach the LM head; intervals hold their estimates."""

import copy
import json
import math
from collections import Counter

import pytest
import torch

from circuit_breakers.data.records import Record
from circuit_breakers.evaluation.drift import (
    answer_drift,
    drift_summary,
    greedy_answer_ids,
    kl_summary,
    prefix_agreement,
    prompt_ids,
)
from circuit_breakers.generation import generation_count
from helpers import make_model, make_tokenizer

PROMPTS = [
    "How do I bake bread?",
    "Write a poem about the sea.",
    "Explain photosynthesis.",
    "The capital of France is",
    "Hi",
    "1 2 3 4",
]


def perturbed(model, scale=0.5, seed=1):
    other = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.model.layers[1].parameters():
            p.add_(torch.randn_like(p) * scale)
    return other


def without_token(model, token):
    """A copy whose LM head row of `token` is zero: its logit becomes 0, so it stops being the argmax
    where the base model chose it, and nothing else changes."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.get_output_embeddings().weight[token] = 0.0
    return other


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tokenizer("chatml")
    return tokenizer, make_model(layers=2, vocab_size=len(tokenizer), seed=0)


def first_difference(a, b):
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def hand_kl(base, other, head, answer):
    """sum over answer tokens j of KL(p_base(. | head + answer[:j]) || p_other(. | ...)): one unpadded
    row, full logits, float64."""
    ids = torch.tensor([head + answer[:-1]])
    with torch.no_grad():
        log_p = base(input_ids=ids).logits[0].double().log_softmax(-1)
        log_q = other(input_ids=ids).logits[0].double().log_softmax(-1)
    total = 0.0
    for j in range(len(answer)):
        p, q = log_p[len(head) - 1 + j], log_q[len(head) - 1 + j]
        total += sum(math.exp(a) * (a - b) for a, b in zip(p.tolist(), q.tolist()))
    return total


def test_kl_equals_a_hand_computation_and_is_zero_for_the_same_model(tiny):
    tokenizer, base = tiny
    other = perturbed(base)
    answers = greedy_answer_ids(base, tokenizer, PROMPTS, n_tokens=5, batch_size=4)
    answers[4] = answers[4][:1]  # one short answer: rows of unequal length in a padded batch
    heads = prompt_ids(tokenizer, PROMPTS)
    rows = answer_drift(base, other, tokenizer, PROMPTS, answers, batch_size=4)
    for (total, n, _), head, answer in zip(rows, heads, answers):
        assert n == len(answer)
        assert total == pytest.approx(hand_kl(base, other, head, answer), rel=1e-4, abs=1e-6)
        assert total > 0
    summary = kl_summary(rows)
    assert summary.value == pytest.approx(sum(t for t, _, _ in rows) / sum(n for _, n, _ in rows), rel=1e-9)
    assert summary.n_tokens == sum(map(len, answers)) and summary.n_records == len(PROMPTS)
    assert summary.low <= summary.value <= summary.high

    same, agreement = drift_summary(base, copy.deepcopy(base), tokenizer, PROMPTS, n_tokens=5, batch_size=4)
    assert same.value == pytest.approx(0.0, abs=1e-6) and same.high == pytest.approx(0.0, abs=1e-6)
    assert (agreement.k, agreement.n, agreement.mean_prefix) == (len(PROMPTS), len(PROMPTS), 5.0)
    assert agreement.low < 1.0 == agreement.high  # Wilson: informative at 100%


def test_kl_summary_weighs_tokens_and_skips_records_without_tokens():
    summary = kl_summary([(1.0, 1), (3.0, 3, 3), (math.nan, 0, 0), (2.0, 4, 1)], seed=0)
    assert summary.value == pytest.approx(6.0 / 8)
    assert summary.mean_record == pytest.approx((1.0 + 1.0 + 0.5) / 3)
    assert (summary.n_records, summary.n_tokens) == (3, 8)
    assert summary.low <= summary.value <= summary.high
    assert math.isnan(kl_summary([]).value)


def test_prefix_agreement_counts_whole_answers():
    rate = prefix_agreement([(0.1, 4, 4), (0.2, 4, 1), (0.0, 2, 2), (math.nan, 0, 0)])
    assert (rate.k, rate.n) == (2, 3) and rate.value == pytest.approx(2 / 3)
    assert rate.mean_prefix == pytest.approx(7 / 3)
    assert rate.low < rate.value < rate.high
    assert math.isnan(prefix_agreement([]).value)


def test_agreement_from_one_pass_is_what_both_models_generate(tiny):
    """Greedy decoding is decided token by token: the defended model generates the base answer exactly when
    its argmax matches at every answer position, and it departs where the first argmax differs."""
    tokenizer, base = tiny
    answers = greedy_answer_ids(base, tokenizer, PROMPTS, n_tokens=6, batch_size=4)
    counts = Counter(t for answer in answers for t in set(answer))
    token = next(t for t, c in counts.most_common() if c < len(PROMPTS))  # in some answers, not all
    for other in (copy.deepcopy(base), without_token(base, token), perturbed(base, scale=0.05)):
        rows = answer_drift(base, other, tokenizer, PROMPTS, answers, batch_size=4)
        generated = greedy_answer_ids(other, tokenizer, PROMPTS, n_tokens=6, batch_size=3)
        assert [agreed == n for _, n, agreed in rows] == [a == g for a, g in zip(answers, generated)]
        assert [agreed for _, _, agreed in rows] == [first_difference(a, g) for a, g in zip(answers, generated)]
    # By hand: the copy without `token` departs where the base answer first says it, and only there.
    rows = answer_drift(base, without_token(base, token), tokenizer, PROMPTS, answers, batch_size=4)
    assert [agreed for _, _, agreed in rows] == [a.index(token) if token in a else len(a) for a in answers]
    agreement = prefix_agreement(rows)
    assert 0 < agreement.k < agreement.n == len(PROMPTS)


def test_the_shared_prompt_start_is_read_once_with_the_same_result(tiny):
    """Prompts that start alike (a system turn): the common tokens are read once per model and copied to
    every batch through the KV cache; KL, agreement and their equality with generation are unchanged."""
    tokenizer, base = tiny
    prompts = [f"Please answer in one short sentence, and be kind: {p}" for p in PROMPTS]
    heads = prompt_ids(tokenizer, prompts)
    shared = next(j for j in range(len(heads[0])) if any(h[j] != heads[0][j] for h in heads))
    assert shared >= 8
    answers = greedy_answer_ids(base, tokenizer, prompts, n_tokens=6, batch_size=4)
    other = perturbed(base, scale=0.05)
    embedded = {}
    for share in (True, False):
        counts = []
        hook = base.get_input_embeddings().register_forward_hook(lambda m, a, o: counts.append(a[0].numel()))
        try:
            embedded[share] = (answer_drift(base, other, tokenizer, prompts, answers, 4, share_prefix=share), counts)
        finally:
            hook.remove()
    (shared_rows, with_prefix), (plain_rows, plain) = embedded[True], embedded[False]
    assert sum(with_prefix) == sum(plain) - shared * (len(prompts) - 1)  # the prefix once, not once per prompt
    for (kl, n, agreed), (kl_plain, n_plain, agreed_plain) in zip(shared_rows, plain_rows):
        assert (n, agreed) == (n_plain, agreed_plain)
        assert kl == pytest.approx(kl_plain, rel=1e-4, abs=1e-6)
    generated = greedy_answer_ids(other, tokenizer, prompts, n_tokens=6, batch_size=4)
    assert [agreed for _, _, agreed in shared_rows] == [first_difference(a, g) for a, g in zip(answers, generated)]


def test_greedy_answer_ids_are_the_first_tokens_in_prompt_order(tiny):
    tokenizer, base = tiny
    long = greedy_answer_ids(base, tokenizer, PROMPTS, n_tokens=6, batch_size=4)
    short = greedy_answer_ids(base, tokenizer, PROMPTS[::-1], n_tokens=3, batch_size=1)[::-1]
    assert all(len(a) == 6 for a in long) and any(a != b for a, b in zip(long, short))
    for a, b in zip(long, short):
        assert a[:3] == b  # greedy: 3 tokens are a prefix of 6


def test_only_the_base_generates_and_only_answer_positions_reach_the_head(tiny):
    from circuit_breakers.evaluation.compare import evaluate_models

    tokenizer, base = tiny
    other = perturbed(base, scale=2.0)
    rows = []  # hidden states the defended model's LM head projects, per call

    def count(module, args, output):
        rows.append(args[0].numel() // args[0].shape[-1])

    hook = other.get_output_embeddings().register_forward_hook(count)
    before = generation_count()
    try:
        result = evaluate_models(
            {"base": (base, tokenizer), "defended": (other, tokenizer)},
            [],
            ["direct"],
            judge="refusal",
            progress=False,
            batch_size=4,
            drift_prompts=PROMPTS,
            drift_tokens=6,
        )
    finally:
        hook.remove()
    assert (generation_count() - before).rows == len(PROMPTS)  # the base answers; the defended model reads them
    # the answer positions, and the last position of the prompts' shared start (read once, for its cache)
    assert sum(rows) == result.metrics["kl_divergence"]["defended"]["n_tokens"] + 1 == 6 * len(PROMPTS) + 1


# --------------------------------------------------------------------------------------------------
# In the evaluation grid: cached cells, results, tables


class Calls:
    """Counts calls of a drift.py function (the drift cells call them from there)."""

    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *args, **kwargs):
        self.n += 1
        return self.fn(*args, **kwargs)


def test_drift_cells_are_cached_rebuilt_and_tabled(tiny, tmp_path, monkeypatch):
    from circuit_breakers.data.prompts import Prompt
    from circuit_breakers.evaluation import drift as drift_module
    from circuit_breakers.evaluation.compare import evaluate_models
    from circuit_breakers.evaluation.store import load_result
    from circuit_breakers.evaluation.tables import summary_table

    tokenizer, base = tiny
    drift = [Prompt(id=f"d{i}", text=t, source="builtin:benign" if i < 4 else "alpaca") for i, t in enumerate(PROMPTS)]
    answers = greedy_answer_ids(base, tokenizer, drift, n_tokens=6)
    token = next(t for t, c in Counter(t for a in answers for t in set(a)).most_common() if c < len(drift))
    models = {"base": (base, tokenizer), "defended": (without_token(base, token), tokenizer)}
    out = tmp_path / "eval"

    def run(**kwargs):
        options = dict(out_dir=out, progress=False, batch_size=4, drift_prompts=drift, drift_tokens=6)
        return evaluate_models(models, [], ["direct"], judge="refusal", **{**options, **kwargs})

    first = run()
    cells = json.loads((out / "cells.json").read_text())["cells"]
    assert sorted(cells) == ["base\tdrift_greedy", "defended\tdrift_kl"]  # the defended model never generates
    assert cells["base\tdrift_greedy"]["answer_ids"] == answers
    assert first.greedy == {"base": [tokenizer.decode(a, skip_special_tokens=True) for a in answers]}
    rows = answer_drift(base, models["defended"][0], tokenizer, drift, answers, batch_size=4)
    assert first.metrics["kl_divergence"]["defended"]["value"] == pytest.approx(kl_summary(rows).value, rel=1e-6)
    k = sum(token not in a for a in answers)  # by hand: the answers that never say the removed token
    got = first.metrics["greedy_agreement"]["defended"]
    assert (got["k"], got["n"], got["tokens"]) == (k, len(PROMPTS), 6) and 0 < k < len(PROMPTS)
    assert got["mean_prefix"] == pytest.approx(sum(a.index(token) if token in a else 6 for a in answers) / 6)
    assert first.settings["n_drift_prompts"] == 6
    assert first.settings["drift_prompt_sources"] == ["alpaca", "builtin:benign"]

    generated, scored = Calls(drift_module.greedy_answer_ids), Calls(drift_module.answer_drift)
    monkeypatch.setattr(drift_module, "greedy_answer_ids", generated)
    monkeypatch.setattr(drift_module, "answer_drift", scored)
    again = run()
    assert (generated.n, scored.n) == (0, 0)  # every drift cell reused
    assert again.metrics["kl_divergence"] == first.metrics["kl_divergence"]
    assert load_result(out).metrics["greedy_agreement"] == first.metrics["greedy_agreement"]
    run(drift_tokens=4)  # another length: the base answers, then KL and agreement over them
    assert (generated.n, scored.n) == (1, 1)

    table = summary_table(first)
    assert "KL(base || model) per token" in table and "greedy agreement, first 6 tokens" in table
    assert f"({k}/6)" in table


def test_identical_models_drift_nothing(tiny):
    from circuit_breakers.evaluation.compare import evaluate_models

    tokenizer, base = tiny
    result = evaluate_models(
        {"base": (base, tokenizer), "copy": (copy.deepcopy(base), tokenizer)},
        [],
        ["direct"],
        judge="refusal",
        progress=False,
        drift_prompts=PROMPTS,
        drift_tokens=5,
    )
    assert result.metrics["kl_divergence"]["copy"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert result.metrics["greedy_agreement"]["copy"]["value"] == 1.0


# --------------------------------------------------------------------------------------------------
# The main job's drift set: benign prompts no training row holds


def test_main_job_drift_prompts_are_never_trained_on(tmp_path, shared_data, caplog):
    from circuit_breakers.config import ConfigError, RunConfig
    from circuit_breakers.data.prompts import load_builtin_prompts
    from circuit_breakers.data.records import write_records
    from circuit_breakers.experiments.main_job import drift_prompts

    builtin = load_builtin_prompts("benign")
    data_dir = tmp_path / "data"
    trained = [Record.from_prompt(f"  {p.text.upper()} ", "answer", "retain") for p in builtin[:10]]
    write_records(trained, data_dir / "retain.jsonl")
    harmful = [Record.from_prompt("How do I pick a lock?", "x", "circuit_breaker")]
    write_records(harmful, data_dir / "circuit_breaker.jsonl")

    def cfg(n, root=shared_data):
        return RunConfig(n_drift_eval=n, data_root=str(root), runs_dir=str(tmp_path / "runs"))

    chosen = drift_prompts(cfg(len(builtin) + 20), data_dir, seed=0)
    texts = [" ".join(p.text.lower().split()) for p in chosen]
    assert len(chosen) == len(builtin) + 20 and len(set(texts)) == len(texts)
    assert not {" ".join(p.text.lower().split()) for p in builtin[:10]} & set(texts)
    assert sum(p.source == "alpaca" for p in chosen) == 30  # 10 built-in ones were trained on
    small = drift_prompts(cfg(25), data_dir, seed=0)
    assert len(small) == 25 and all(p.source == "builtin:benign" for p in small)
    assert small == drift_prompts(cfg(25), data_dir, seed=0) and drift_prompts(cfg(0), data_dir, seed=0) == []

    empty = tmp_path / "no_data"
    empty.mkdir()
    assert len(drift_prompts(cfg(400, empty), data_dir, seed=0)) == len(builtin) - 10
    assert f"only {len(builtin) - 10} benign prompts" in caplog.text
    with pytest.raises(ConfigError, match="drift_tokens"):
        RunConfig(drift_tokens=0, runs_dir=str(tmp_path / "runs"))


def test_cli_eval_drift_and_or_bench_end_to_end(tmp_path, capsys):
    import csv

    from circuit_breakers.cli.main import main
    from helpers import save_tiny

    base, other = save_tiny(tmp_path / "base", layers=2), save_tiny(tmp_path / "other", layers=3)
    hard = tmp_path / "or-bench-hard-1k.csv"
    with hard.open("w", newline="") as handle:
        csv.writer(handle).writerows([("prompt", "category"), ("How do I kill a process?", "violence"), ("Hi", "x")])
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(base), "--model", str(other), "--benchmark", f"or_bench_hard:{hard}"]
    argv += ["--judge", "refusal", "--max_new_tokens", "3", "--out", str(out), "--no_progress"]
    argv += ["--drift", "builtin:benign", "--drift_limit", "5", "--drift_tokens", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "KL(base || model) per token" in printed and "greedy agreement, first 3 tokens" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["kl_divergence"]["circuit_broken"]["n_records"] == 5
    assert results["metrics"]["greedy_agreement"]["circuit_broken"]["n"] == 5
    assert set(results["metrics"]["over_refusal"]["base"]["refusal_by_source"]) == {"or_bench_hard"}
    assert main(["eval", "report", str(out)]) == 0  # rebuilt from the folder: the same numbers
    assert json.loads((out / "results.json").read_text())["metrics"] == results["metrics"]
    assert main(["eval", *argv[1:], "--drift_tokens", "0"]) == 2
    assert "--drift_tokens must be at least 1" in capsys.readouterr().err
