"""Mask report, `inspect`, the paper's augmentations and the packaged prompt sets."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from circuit_breakers.data.augment import (
    as_refusal_retain,
    drop_user_turns,
    without_user_turn,
    xstest_refusal_retain,
)
from circuit_breakers.data.prompts import BUILTIN_PROMPT_SETS, load_builtin_prompts
from circuit_breakers.data.records import DataError, Record, write_records
from circuit_breakers.data.render import render, render_all
from circuit_breakers.data.report import (
    MASK_STYLE,
    example_segments,
    highlighted_example,
    inspect,
    mask_report,
    print_mask_report,
    save_mask_report,
)
from helpers import make_tokenizer

PROMPT = "How do I bake bread?"
COMPLETION = "Mix flour, water, yeast and salt."


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("chatml")


def test_report_figures_are_exact(tok):
    good = Record.from_prompt(PROMPT, COMPLETION, "retain")
    long = Record.from_prompt(PROMPT, " ".join(["Knead the dough."] * 30), "retain")
    limit = len(render(tok, good)) + 20
    retain = render_all(tok, [good, long, Record.from_prompt(PROMPT, "", "retain")], "completion", max_length=limit)
    cb = render_all(tok, [Record.from_prompt(PROMPT, COMPLETION, "circuit_breaker")], "full", max_length=limit)
    modes = {"circuit_breaker": "full", "retain": "completion"}
    report = mask_report(tok, {"circuit_breaker": cb, "retain": retain}, modes, limit)

    e_good, e_long = retain.examples
    r = report["sets"]["retain"]
    assert (r["records"], r["examples"], r["dropped"], r["truncated"]) == (3, 2, {"empty_completion": 1}, 1)
    assert r["tokens"] == len(e_good) + len(e_long) == limit + len(e_good) and r["max_length"] == limit
    assert r["loss_tokens"] == sum(e_good.loss_mask) + sum(e_long.loss_mask)
    assert r["mask_fraction"] == round(r["loss_tokens"] / r["tokens"], 4)
    full_long = render(tok, long, max_length=10_000)
    kept = (e_good.completion_end - e_good.completion_start) + (e_long.completion_end - e_long.completion_start)
    total = (e_good.completion_end - e_good.completion_start) + (len(full_long) - full_long.completion_start)
    assert r["completion_tokens"] == kept and r["completion_coverage"] == round(kept / total, 4) < 1
    c = report["sets"]["circuit_breaker"]
    assert c["mask_mode"] == "full" and c["loss_tokens"] == c["tokens"] and c["mask_fraction"] == 1.0
    # the example shows the prompt unmasked and exactly the completion plus end-of-turn masked
    assert r["example"]["segments"][-1] == [COMPLETION + "<|im_end|>", True]
    assert r["example"]["marked"].endswith("<|im_start|>assistant\n\u27e6" + COMPLETION + "<|im_end|>\u27e7")
    assert report["warnings"] == [
        f"retain: truncation kept only {r['completion_coverage']:.0%} of completion tokens; raise max_length"
    ]
    json.dumps(report)  # JSON-ready


def test_example_window_of_a_long_example(tok):
    record = Record.from_prompt(PROMPT * 30, COMPLETION, "retain")
    example = render(tok, record, max_length=10_000)
    segments = example_segments(tok, example, max_tokens=40, context_tokens=10)
    assert segments[0] == ("…", False) and segments[-1][1] is True
    assert segments[-1][0].startswith(COMPLETION[:10])
    assert not any(text == "…" for text, _ in segments[1:])  # the window reaches the end


def test_warnings_flag_sets_the_losses_would_misuse(tok):
    empty = render_all(tok, [Record.from_prompt(PROMPT, "", "retain")] * 3)
    long_record = Record.from_prompt(PROMPT, " ".join(["Knead the dough."] * 60), "circuit_breaker")
    long = render_all(tok, [long_record], max_length=40)
    report = mask_report(tok, {"retain": empty, "circuit_breaker": long})
    assert report["sets"]["retain"]["examples"] == 0 and "example" not in report["sets"]["retain"]
    assert any(w.startswith("retain: no usable examples") for w in report["warnings"])
    assert any(w.startswith("retain: more than half of the rows were dropped") for w in report["warnings"])
    assert any(w.startswith("circuit_breaker: truncation kept only") for w in report["warnings"])


def test_print_highlights_loss_tokens_and_save_round_trips(tok, tmp_path):
    result = render_all(tok, [Record.from_prompt(PROMPT, COMPLETION, "retain")])
    report = mask_report(tok, {"retain": result}, "completion", 512)
    console = Console(record=True, width=100)
    print_mask_report(report, console)
    assert "examples / rows" in console.export_text()
    text = highlighted_example(report["sets"]["retain"]["example"]["segments"])
    assert [text.plain[s.start : s.end] for s in text.spans if s.style == MASK_STYLE] == [COMPLETION + "<|im_end|>"]
    path = save_mask_report(report, tmp_path / "run" / "mask_report.json")
    assert json.loads(path.read_text()) == report


def test_inspect_a_records_file(tok, tmp_path):
    path = write_records(
        [
            Record.from_prompt(PROMPT, "Sure, here is how.", "circuit_breaker"),
            Record.from_prompt(PROMPT, COMPLETION, "retain"),
            Record.from_prompt(PROMPT, "", "retain"),
            Record.from_prompt(PROMPT, "I can't help with that.", "refusal_retain"),
        ],
        tmp_path / "mixed.jsonl",
    )
    with path.open("a") as handle:
        handle.write('{"messages": [{"role": "user", "content": "no answer"}]}\n{broken\n')
    console = Console(record=True, width=100)
    report = inspect(path, tok, {"circuit_breaker": "full"}, max_length=256, console=console)
    assert list(report["sets"]) == ["circuit_breaker", "retain", "refusal_retain"]
    assert report["sets"]["circuit_breaker"]["mask_mode"] == "full"
    assert report["sets"]["retain"]["mask_mode"] == "completion"
    assert report["sets"]["retain"]["dropped"] == {"empty_completion": 1}
    assert (report["rows"], report["unreadable_rows"]) == (6, 2)
    assert any("2 unreadable row(s)" in w for w in report["warnings"])
    assert "refusal_retain" in console.export_text()
    with pytest.raises(DataError, match="unknown mask mode"):
        inspect(path, tok, "everything", show=False)


# ----------------------------------------------------------------------------------- augmentations


def test_without_user_turn_keeps_system_and_completion(tok):
    record = Record(
        messages=[
            {"role": "system", "content": "S"},
            {"role": "user", "content": PROMPT},
            {"role": "assistant", "content": COMPLETION},
        ],
        kind="circuit_breaker",
        category="c",
        meta={"x": 1},
    )
    stripped = without_user_turn(record)
    assert stripped.messages == [{"role": "system", "content": "S"}, {"role": "assistant", "content": COMPLETION}]
    assert stripped.meta == {"x": 1, "augmentation": "no_user_turn"} and record.meta == {"x": 1}
    assert [m["role"] for m in without_user_turn(record, "empty").messages] == ["system", "user", "assistant"]
    example = render(tok, stripped)
    assert tok.decode([i for i, m in zip(example.input_ids, example.loss_mask) if m]) == COMPLETION + "<|im_end|>"
    assert PROMPT not in tok.decode(example.input_ids)


def test_drop_user_turns_fraction_is_seeded():
    records = [Record.from_prompt(f"p{i}", f"c{i}", "circuit_breaker") for i in range(10)]
    replaced = drop_user_turns(records, fraction=0.3, seed=1)
    assert len(replaced) == 10 and sum(r.meta.get("augmentation") == "no_user_turn" for r in replaced) == 3
    assert [r.completion for r in replaced] == [r.completion for r in records]
    assert [r.meta for r in drop_user_turns(records, 0.3, seed=1)] == [r.meta for r in replaced]
    added = drop_user_turns(records, fraction=0.5, add=True)
    assert len(added) == 15 and added[:10] == records
    with pytest.raises(DataError):
        drop_user_turns(records, fraction=1.5)


def test_refusal_retain_from_refusal_data():
    records = [
        Record.from_prompt("bad", "I'm sorry, but I can't help.", "circuit_breaker"),
        Record.from_prompt("bad", "Sure, here.", "circuit_breaker"),
    ]
    assert [r.kind for r in as_refusal_retain(records)] == ["refusal_retain", "refusal_retain"]
    assert [r.completion for r in as_refusal_retain(records, only_refusals=True)] == ["I'm sorry, but I can't help."]
    assert records[0].kind == "circuit_breaker"  # copies, not the originals


def test_xstest_refusal_retain(shared_data):
    from circuit_breakers.data.loaders import load_xstest_completions

    records = load_xstest_completions(shared_data / "xstest/xstest_v2_completions_gpt4.csv")
    refusals = xstest_refusal_retain(records)
    expected = sum(r.meta["label"] == "unsafe" and r.meta["final_label"] == "2_full_refusal" for r in records)
    assert len(refusals) == expected > 150 and all(r.kind == "refusal_retain" for r in refusals)


# ------------------------------------------------------------------------------ packaged prompts


def test_builtin_benign_prompts():
    prompts = load_builtin_prompts("benign")
    assert len(prompts) >= 300
    categories = {p.category for p in prompts}
    assert {"writing", "coding", "math", "advice", "trivia", "science", "cooking", "multi_turn"} <= categories
    multi = [p for p in prompts if p.category == "multi_turn"]
    assert len(multi) >= 20
    assert all(p.messages and p.messages[-1]["role"] == "user" and p.messages[-1]["content"] == p.text for p in multi)
    assert all(len(p.messages) >= 3 for p in multi)
    assert len({p.id for p in prompts}) == len(prompts) and len({p.text for p in prompts}) == len(prompts)
    assert all(p.source == "builtin:benign" for p in prompts)


def test_builtin_borderline_prompts():
    prompts = load_builtin_prompts("borderline")
    assert 90 <= len(prompts) <= 120
    counts = {c: sum(p.category == c for p in prompts) for c in {p.category for p in prompts}}
    assert set(counts) == {
        "homonyms",
        "figurative_language",
        "safe_targets",
        "safe_contexts",
        "definitions",
        "historical_events",
        "privacy_public",
    }
    assert min(counts.values()) >= 10
    assert all(p.meta["label"] == "safe" for p in prompts)
    assert len({p.text for p in prompts}) == len(prompts)
    with pytest.raises(DataError, match="unknown built-in prompt set"):
        load_builtin_prompts("harmful")
    assert BUILTIN_PROMPT_SETS == ("benign", "borderline")


def test_builtin_prompts_render_with_every_template():
    from circuit_breakers.data.generate import as_prompts

    for style in ("chatml", "llama3", "mistral"):
        tokenizer = make_tokenizer(style)
        for prompt in as_prompts(load_builtin_prompts("benign")[-3:]):
            text = tokenizer.apply_chat_template(prompt.to_messages(), tokenize=False, add_generation_prompt=True)
            assert prompt.text in text


def test_builtin_prompts_share_no_text_with_public_sets(shared_data):
    """Written for this project: no prompt is a copy of an XSTest or Alpaca-demo row."""
    import csv

    mine = {p.text.strip().lower() for name in BUILTIN_PROMPT_SETS for p in load_builtin_prompts(name)}
    with (shared_data / "xstest/xstest_prompts.csv").open(encoding="utf-8", newline="") as handle:
        xstest = {row["prompt"].strip().lower() for row in csv.DictReader(handle)}
    alpaca_rows = json.loads((shared_data / "llamafactory-demo/alpaca_en_demo.json").read_text())
    alpaca = {row["instruction"].strip().lower() for row in alpaca_rows}
    assert not mine & xstest and not mine & alpaca
