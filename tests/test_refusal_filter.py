"""The refusal filter of the data stage (issue 29): a harmful completion that still refuses after the prefill
is never rerouted; it is dropped (counted, logged) or, with refusal_retain, retained as a refusal."""

import json
import logging

import pytest

from circuit_breakers.config import RunConfig
from circuit_breakers.data.generate import model_words, split_refusals
from circuit_breakers.data.prompts import Prompt, write_prompts
from circuit_breakers.data.records import Record, read_records
from circuit_breakers.experiments import main_job
from helpers import save_tiny

PREFILL = "Sure, here is"
# a refusal that only shows once the prefill is set aside: the refusal phrase "Sorry" opens the model's words
REFUSAL = " Sorry, not this one."
COMPLIANT = " a plan: step 1, gather the parts; step 2, assemble them."


def test_model_words_set_the_prefill_aside_so_a_refusal_after_it_is_seen():
    refusing = Record.from_prompt("Do X", PREFILL + REFUSAL, "circuit_breaker", meta={"prefill": PREFILL})
    complying = Record.from_prompt("Do Y", PREFILL + COMPLIANT, "circuit_breaker", meta={"prefill": PREFILL})
    plain = Record.from_prompt("Do Z", "I'm sorry, but I can't help with that.", "circuit_breaker")
    assert model_words(refusing) == REFUSAL
    assert model_words(plain) == plain.completion  # no prefill: the whole completion
    compliant, refusals = split_refusals([refusing, complying, plain])
    assert compliant == [complying] and refusals == [refusing, plain]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def stand_in_generator(monkeypatch):
    """Replace generation: harmful prompts get a prefilled completion, every second one a refusal."""

    def generate(model, tokenizer, prompts, out_path, kind="circuit_breaker", prefill=None, **kwargs):
        records = []
        for n, prompt in enumerate(prompts):
            start = (prefill(prompt) if callable(prefill) else prefill) or ""
            words = (REFUSAL if n % 2 == 0 else COMPLIANT) if kind == "circuit_breaker" else " A kind answer."
            records.append(
                Record(
                    messages=[*prompt.to_messages(None), {"role": "assistant", "content": (start + words).strip()}],
                    kind=kind,
                    source=prompt.source,
                    meta={"prompt_id": prompt.id, "prefill": start or None},
                )
            )
        return records

    monkeypatch.setattr(main_job, "generate_completions", generate)


def run_config(tmp_path, **overrides):
    path = write_prompts(
        [Prompt(id=f"h{i}", text=f"harmful request number {i}") for i in range(12)], tmp_path / "harmful.jsonl"
    )
    settings = dict(
        harmful_prompts=str(path),
        harmful_prefill=PREFILL,
        n_harmful_train=8,
        n_harmful_eval=2,
        n_benign_train=2,
        n_benign_eval=1,
        n_borderline_train=1,
        n_borderline_eval=1,
        runs_dir=str(tmp_path),
        data_root=str(tmp_path),  # no public data: no XSTest
    )
    return RunConfig(**{**settings, **overrides})


def test_refusing_completions_are_dropped_from_the_rerouting_set_and_counted(tiny, tmp_path, monkeypatch, caplog):
    stand_in_generator(monkeypatch)
    cfg = run_config(tmp_path, refusal_retain=False)
    with caplog.at_level(logging.INFO, logger="circuit_breakers"):
        main_job.build_data(cfg, str(tiny), tmp_path / "data", seed=0)
    rerouted = read_records(tmp_path / "data" / "circuit_breaker.jsonl")
    retained = read_records(tmp_path / "data" / "retain.jsonl")
    assert len(rerouted) == 4 and all(r.completion == PREFILL + COMPLIANT for r in rerouted)
    assert not [r for r in retained if r.kind == "refusal_retain"]  # refusal_retain off: dropped, not retained
    account = json.loads((tmp_path / "data" / "sources.json").read_text())["refusal_filter"]
    assert account["harmful_completions"] == 8 and account["refusing"] == 4
    assert account["dropped_from_rerouting"] == 4 and account["retained"] == 0 and account["refusal_share"] == 0.5
    assert "dropped 4 of 8 harmful completions that refuse" in caplog.text


def test_with_refusal_retain_the_refusals_go_to_the_retain_set_instead(tiny, tmp_path, monkeypatch):
    stand_in_generator(monkeypatch)
    main_job.build_data(run_config(tmp_path, refusal_retain=True), str(tiny), tmp_path / "data", seed=0)
    rerouted = read_records(tmp_path / "data" / "circuit_breaker.jsonl")
    refusals = [r for r in read_records(tmp_path / "data" / "retain.jsonl") if r.kind == "refusal_retain"]
    assert len(rerouted) == 4 and len(refusals) == 4
    assert all(r.completion == PREFILL + REFUSAL.rstrip() for r in refusals)
    assert not {r.prompt for r in rerouted} & {r.prompt for r in refusals}
    account = json.loads((tmp_path / "data" / "sources.json").read_text())["refusal_filter"]
    assert account["dropped_from_rerouting"] == 4 and account["retained"] == 4


def test_the_filter_can_be_turned_off(tiny, tmp_path, monkeypatch):
    stand_in_generator(monkeypatch)
    cfg = run_config(tmp_path, refusal_retain=False, cb_refusal_filter=False)
    main_job.build_data(cfg, str(tiny), tmp_path / "data", seed=0)
    assert len(read_records(tmp_path / "data" / "circuit_breaker.jsonl")) == 8
    account = json.loads((tmp_path / "data" / "sources.json").read_text())["refusal_filter"]
    assert account["refusing"] == 4 and account["dropped_from_rerouting"] == 0
    # a setting away from its default is part of the data stage's key; the defaults leave old keys alone
    assert main_job.data_stage_key(*_configs(), cfg)["cb_refusal_filter"] is False
    assert "cb_refusal_filter" not in main_job.data_stage_key(*_configs(), RunConfig())


def _configs():
    from circuit_breakers.config import CircuitBreakerConfig, ModelConfig

    return ModelConfig(), CircuitBreakerConfig(output_dir="out")


def test_refusal_retain_generation_reads_the_model_words_too(tmp_path, monkeypatch):
    import circuit_breakers.data.generate as generate

    def prefilled(model, tokenizer, prompts, out_path, kind="circuit_breaker", prefill=None, **kwargs):
        words = [REFUSAL, COMPLIANT]
        return [
            Record.from_prompt(text, PREFILL + words[n % 2], kind, meta={"prefill": PREFILL})
            for n, text in enumerate(prompts)
        ]

    monkeypatch.setattr(generate, "generate_completions", prefilled)
    kept = generate.generate_refusal_retain(None, None, ["Do X", "Do Y"], tmp_path / "refusals.jsonl", prefill=PREFILL)
    assert [r.prompt for r in kept] == ["Do X"]
    assert [r.prompt for r in read_records(tmp_path / "refusals.jsonl")] == ["Do X"]
