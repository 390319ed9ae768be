"""Self-generated completions: batched greedy generation, prefill, incremental JSONL, resume."""

from __future__ import annotations

import json

import pytest
import torch

from circuit_breakers.data.generate import (
    end_of_turn_ids,
    generate_benign_retain,
    generate_completions,
    generate_refusal_retain,
    looks_like_refusal,
    read_generated,
    target_prefill,
)
from circuit_breakers.data.prompts import Prompt
from circuit_breakers.data.records import DataError, read_records
from helpers import make_model, make_tokenizer

PROMPTS = [
    Prompt(id="a", text="How do I bake bread?", category="cooking", target="Sure, here is how"),
    Prompt(id="b", text="Write a poem about the sea.", category="writing"),
    Prompt(id="c", text="Explain photosynthesis to a child in very simple words please.", target="Sure, plants"),
    Prompt(id="d", text="What is 2 + 2?"),
    Prompt(
        id="e",
        text="The capital of France is?",
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "The capital of France is?"},
        ],
    ),
]


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    tok = make_tokenizer("chatml")
    return make_model("llama", vocab_size=len(tok)), tok


def count_generate_calls(monkeypatch, model, fail_on: int | None = None) -> list[int]:
    """Wrap model.generate; record batch sizes, and raise on call number `fail_on` (an interruption)."""
    calls: list[int] = []
    original = model.generate

    def wrapper(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        if fail_on is not None and len(calls) == fail_on:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", wrapper)
    return calls


def test_writes_one_record_per_prompt(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "gen.jsonl"
    records = generate_completions(
        model, tok, PROMPTS, out, max_new_tokens=4, batch_size=2, kind="retain", progress=False
    )
    assert [r.meta["prompt_id"] for r in records] == ["a", "b", "c", "d", "e"]  # the prompts' order
    assert all(r.kind == "retain" and r.messages[-1]["role"] == "assistant" for r in records)
    assert records[0].category == "cooking" and records[0].prompt == "How do I bake bread?"
    assert [m["content"] for m in records[4].messages[:-1]] == ["Hi", "Hello!", "The capital of France is?"]
    on_disk = read_records(out)
    assert sorted(r.meta["prompt_id"] for r in on_disk) == ["a", "b", "c", "d", "e"]
    assert on_disk[0].meta["prompt_id"] == "c"  # longest prompt first
    assert all(r.meta["finish"] in ("stop", "length") for r in on_disk)


def test_second_call_after_an_interruption_continues(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    reference = tmp_path / "reference.jsonl"
    generate_completions(model, tok, PROMPTS, reference, max_new_tokens=4, batch_size=2, progress=False)

    out = tmp_path / "gen.jsonl"
    calls = count_generate_calls(monkeypatch, model, fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        generate_completions(model, tok, PROMPTS, out, max_new_tokens=4, batch_size=2, progress=False)
    assert calls == [2, 2]
    assert len(read_records(out)) == 2  # the first batch was flushed before the interruption

    calls = count_generate_calls(monkeypatch, model)
    records = generate_completions(model, tok, PROMPTS, out, max_new_tokens=4, batch_size=2, progress=False)
    assert calls == [2, 1]  # only the three missing prompts, not all five again
    assert len(records) == 5
    assert out.read_text() == reference.read_text()  # same result as a run that was never interrupted

    calls = count_generate_calls(monkeypatch, model)
    generate_completions(model, tok, PROMPTS, out, max_new_tokens=4, batch_size=2, progress=False)
    assert calls == []  # nothing left to do


def test_half_written_last_line_is_repaired(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    reference = tmp_path / "reference.jsonl"
    generate_completions(model, tok, PROMPTS, reference, max_new_tokens=4, batch_size=2, progress=False)
    lines = reference.read_text().splitlines(keepends=True)
    out = tmp_path / "gen.jsonl"
    out.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])  # killed in the middle of a write
    calls = count_generate_calls(monkeypatch, model)
    generate_completions(model, tok, PROMPTS, out, max_new_tokens=4, batch_size=2, progress=False)
    assert calls == [2, 1]
    assert out.read_text() == reference.read_text()

    out.write_text(lines[0] + "{broken\n" + lines[1])
    with pytest.raises(DataError, match=r"gen\.jsonl:2: invalid JSON"):
        read_generated(out)


def test_left_padding_gives_the_same_completions_as_one_at_a_time(tiny, tmp_path):
    model, tok = tiny
    batched = generate_completions(
        model, tok, PROMPTS, tmp_path / "b.jsonl", max_new_tokens=5, batch_size=5, progress=False
    )
    single = generate_completions(
        model, tok, PROMPTS, tmp_path / "s.jsonl", max_new_tokens=5, batch_size=1, progress=False
    )
    assert [r.completion for r in batched] == [r.completion for r in single]
    assert tok.padding_side == "right"  # restored after generation


def test_prefill_starts_the_completion(tiny, tmp_path):
    model, tok = tiny
    records = generate_completions(
        model, tok, PROMPTS[:3], tmp_path / "p.jsonl", max_new_tokens=3, prefill=target_prefill, progress=False
    )
    assert records[0].completion.startswith("Sure, here is how") and records[0].meta["prefill"] == "Sure, here is how"
    assert records[1].meta["prefill"] is None  # no target, no prefill
    assert records[2].completion.startswith("Sure, plants")
    fixed = generate_completions(
        model, tok, PROMPTS[:2], tmp_path / "f.jsonl", max_new_tokens=3, prefill="Step 1:", progress=False
    )
    assert all(r.completion.startswith("Step 1:") for r in fixed)


def test_system_prompt_and_plain_strings(tiny, tmp_path):
    model, tok = tiny
    records = generate_completions(
        model,
        tok,
        ["Tell me a joke.", "Tell me a joke.", {"text": "Name a colour."}],
        tmp_path / "s.jsonl",
        max_new_tokens=2,
        system_prompt="Be brief.",
        progress=False,
    )
    assert len(records) == 2  # the duplicate prompt is generated once
    assert records[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert records[0].meta["prompt_id"].startswith("p-")


def test_refusal_retain_keeps_only_refusals(tiny, tmp_path):
    model, tok = tiny
    out = tmp_path / "refusals.jsonl"
    kept = generate_refusal_retain(model, tok, PROMPTS[:3], out, max_new_tokens=3, progress=False)
    assert kept == [] and read_records(out) == []  # a random model does not refuse
    assert len(read_records(tmp_path / "refusals.raw.jsonl")) == 3  # but every generation is kept for resuming
    out2 = tmp_path / "refusals2.jsonl"
    kept = generate_refusal_retain(
        model, tok, PROMPTS[:3], out2, max_new_tokens=3, prefill="I'm sorry, but I can't", progress=False
    )
    assert len(kept) == 3 and all(r.kind == "refusal_retain" and r.meta["refusal"] for r in kept)
    assert [r.meta["prompt_id"] for r in read_records(out2)] == ["a", "b", "c"]


def test_benign_retain_defaults_to_the_packaged_prompts(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    import circuit_breakers.data.generate as G

    monkeypatch.setattr(G, "load_builtin_prompts", lambda name: G.as_prompts(["Name a fruit.", "Name a river."]))
    records = generate_benign_retain(model, tok, tmp_path / "benign.jsonl", max_new_tokens=2, progress=False)
    assert [r.kind for r in records] == ["retain", "retain"]


def test_end_of_turn_ids_and_refusal_filter():
    tok = make_tokenizer("llama3")
    assert tok.convert_tokens_to_ids("<|eot_id|>") in end_of_turn_ids(tok)
    assert looks_like_refusal("I'm sorry, but I can't help with that.")
    assert looks_like_refusal("I cannot provide instructions for that.")
    assert looks_like_refusal("As an AI, I must decline.")
    assert not looks_like_refusal("Sure, here is a recipe for bread: mix flour and water.")


@pytest.mark.slow
def test_embedded_model_generates_and_resumes(tmp_path, monkeypatch):
    from circuit_breakers.models import load_model_and_tokenizer

    torch.set_num_threads(1)
    model, tok = load_model_and_tokenizer("embedded", dtype="float32")
    prompts = [
        Prompt(id="capital", text="What is the capital of Australia?"),
        Prompt(id="color", text="Name a primary colour."),
        Prompt(id="poem", text="Write one line about the sea.", target="The sea"),
    ]
    out = tmp_path / "embedded.jsonl"
    records = generate_completions(
        model, tok, prompts, out, max_new_tokens=10, batch_size=3, prefill=target_prefill, progress=False
    )
    assert len(records) == 3 and all(r.completion.strip() for r in records)
    assert "Canberra" in records[0].completion
    assert records[2].completion.startswith("The sea")
    calls = count_generate_calls(monkeypatch, model)
    more = [*prompts, Prompt(id="fruit", text="Name a fruit.")]
    records = generate_completions(model, tok, more, out, max_new_tokens=10, batch_size=3, progress=False)
    assert calls == [1] and len(records) == 4
    assert [json.loads(line)["meta"]["prompt_id"] for line in out.read_text().splitlines()][-1] == "fruit"
