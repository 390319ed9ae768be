"""Retain sources (issue 29): the recipe key and its check, conversation sets read from local files with every
turn, a seeded share of them that never holds a held-out prompt, and the data stage's retain mix and counts."""

import json

import pytest

from circuit_breakers.config import ConfigError, RunConfig, parse_retain_sources
from circuit_breakers.data.mix import retain_conversations
from circuit_breakers.data.prompts import Prompt, write_prompts
from circuit_breakers.data.records import Record, read_records
from circuit_breakers.data.render import render
from circuit_breakers.data.sources import load_retain_conversations
from circuit_breakers.experiments import main_job
from helpers import make_tokenizer, save_tiny


def chat(i):
    """A two-exchange conversation in UltraChat's layout (`prompt`, `messages`)."""
    return {
        "prompt": f"Tell me about topic {i}.",
        "prompt_id": str(i),
        "messages": [
            {"role": "user", "content": f"Tell me about topic {i}."},
            {"role": "assistant", "content": f"Topic {i} is about bread."},
            {"role": "user", "content": "And more?"},
            {"role": "assistant", "content": f"More on topic {i}: bake it."},
        ],
    }


def ultrachat_file(path, n=10):
    path.write_text("".join(json.dumps(chat(i)) + "\n" for i in range(n)))
    return path


def test_the_key_is_parsed_and_an_unknown_source_names_the_choices():
    assert parse_retain_sources("ultrachat=10000, xstest, refusals") == {
        "ultrachat": 10000,
        "xstest": None,
        "refusals": None,
    }
    assert parse_retain_sources("data/chats.jsonl=5, owner/set") == {"data/chats.jsonl": 5, "owner/set": None}
    with pytest.raises(ConfigError) as err:
        RunConfig(retain_sources="benign, ultrachta")
    message = str(err.value)
    assert "\n" not in message and "'ultrachta'" in message
    assert all(name in message for name in ("benign", "borderline", "xstest", "refusals", "ultrachat", "alpaca"))
    for bad, said in [("benign=-2", "whole number"), ("xstest, xstest", "named twice"), (",", "empty")]:
        with pytest.raises(ConfigError, match=said):
            RunConfig(retain_sources=bad)
    with pytest.raises(ConfigError, match="refusal_retain is false"):
        RunConfig(retain_sources="benign, refusals", refusal_retain=False)
    assert RunConfig().retain_sources == "benign, borderline"  # the default: the built-in prompts, as before


def test_conversations_from_a_local_file_keep_their_turns_and_skip_held_out_prompts(tmp_path):
    path = ultrachat_file(tmp_path / "ultrachat.jsonl")
    rows = load_retain_conversations(str(path), 4, None, seed=1, exclude=["TELL me about   topic 3."])
    assert len(rows) == 4 and all(r.kind == "retain" and r.source == str(path) for r in rows)
    assert "Tell me about topic 3." not in {m["content"] for r in rows for m in r.messages}
    assert all([m["role"] for m in r.messages] == ["user", "assistant", "user", "assistant"] for r in rows)
    assert load_retain_conversations(str(path), 4, None, seed=1, exclude=["Tell me about topic 3."]) == rows  # seeded
    assert len(load_retain_conversations(str(path), None, None)) == 10  # no count: every row
    # rendered with the chat template: the earlier turns are context, the loss sees the last answer
    example = render(make_tokenizer("chatml"), rows[0], "completion", max_length=256)
    text = make_tokenizer("chatml").decode(example.input_ids)
    assert text.count("<|im_start|>assistant") == 2 and "And more?" in text
    seen = make_tokenizer("chatml").decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])
    assert seen.startswith(rows[0].completion) and "Topic" not in seen.replace(rows[0].completion, "")


def test_alpaca_rows_come_from_the_data_folder(tmp_path):
    folder = tmp_path / "llamafactory-demo"
    folder.mkdir()
    items = [{"instruction": f"Name fruit {i}.", "input": "", "output": f"Fruit {i}: apple."} for i in range(5)]
    (folder / "alpaca_en_demo.json").write_text(json.dumps(items))
    rows = load_retain_conversations("alpaca", 3, tmp_path, seed=0)
    assert len(rows) == 3 and {r.source for r in rows} == {"alpaca"}
    assert all(r.completion.startswith("Fruit") for r in rows)
    from circuit_breakers.data.sources import SourceUnavailable

    with pytest.raises(SourceUnavailable, match="alpaca_en_demo.json"):
        load_retain_conversations("alpaca", 3, None)


def test_the_data_stage_builds_the_retain_set_from_the_named_sources(tmp_path, monkeypatch):
    tiny = save_tiny(tmp_path / "model")
    chats = ultrachat_file(tmp_path / "ultrachat.jsonl")
    harmful = write_prompts([Prompt(id=f"h{i}", text=f"harmful request {i}") for i in range(8)], tmp_path / "h.jsonl")

    def generate(model, tokenizer, prompts, out_path, kind="circuit_breaker", prefill=None, **kwargs):
        refusing = kind == "circuit_breaker"
        return [
            Record(
                messages=[
                    *p.to_messages(None),
                    {"role": "assistant", "content": "I'm sorry, but I can't help with that." if refusing else "Ok."},
                ],
                kind=kind,
                source=p.source,
                meta={"prompt_id": p.id},
            )
            for p in prompts
        ]

    monkeypatch.setattr(main_job, "generate_completions", generate)
    cfg = RunConfig(
        harmful_prompts=str(harmful),
        n_harmful_train=6,
        n_harmful_eval=2,
        n_benign_train=5,
        n_benign_eval=1,
        n_borderline_eval=1,
        runs_dir=str(tmp_path),
        data_root=str(tmp_path),
        retain_sources=f"benign=2, {chats}=3, refusals",
    )
    main_job.build_data(cfg, str(tiny), tmp_path / "data", seed=0)
    retained = read_records(tmp_path / "data" / "retain.jsonl")
    by_kind = {k: [r for r in retained if r.kind == k] for k in ("retain", "refusal_retain")}
    conversations = [r for r in by_kind["retain"] if r.source == str(chats)]
    assert len(conversations) == 3 and all(len(r.messages) == 4 for r in conversations)
    assert len(by_kind["retain"]) == 2 + 3  # two benign answers (borderline not named), three conversations
    assert len(by_kind["refusal_retain"]) == 6  # every training prompt was refused: all retained, none rerouted
    assert read_records(tmp_path / "data" / "circuit_breaker.jsonl") == []
    account = json.loads((tmp_path / "data" / "sources.json").read_text())["retain"]
    assert account["rows"] == {"benign": 2, "borderline": 0, "xstest": 0, "refusals": 6, str(chats): 3}
    assert account["skipped"] == {}
    # the data stage key carries the setting (its default does not change old runs' keys)
    from circuit_breakers.config import CircuitBreakerConfig, ModelConfig

    model_cfg, cb_cfg = ModelConfig(), CircuitBreakerConfig(output_dir="o")
    assert main_job.data_stage_key(model_cfg, cb_cfg, cfg)["retain_sources"] == cfg.retain_sources
    assert "retain_sources" not in main_job.data_stage_key(model_cfg, cb_cfg, RunConfig())


def test_an_unreachable_dataset_is_skipped_and_listed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = RunConfig(runs_dir=str(tmp_path), data_root=str(tmp_path), retain_sources="benign, nobody/no-such-set=5")
    rows, skipped = retain_conversations(parse_retain_sources(cfg.retain_sources), cfg, 0, [])
    assert rows == [] and list(skipped) == ["nobody/no-such-set"]
