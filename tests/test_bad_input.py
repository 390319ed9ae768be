"""Bad input refused early, in one line naming file and line (issue 30, items 14-17 and 10)."""

from __future__ import annotations

import json

import pytest

from circuit_breakers.cli.main import main
from circuit_breakers.config import ConfigError
from circuit_breakers.data.readers import json_items
from circuit_breakers.data.records import DataError, iter_jsonl, read_records
from circuit_breakers.recipes import parse_config, parse_run_config
from helpers import save_tiny


def chat(prompt, answer):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines[-1].startswith("error: ")
    return lines[-1]


# --- item 17: accepted silently --------------------------------------------------------------------


def test_duplicate_recipe_key_is_refused_naming_key_and_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("alpha: 5\nmax_steps: 3\nalpha: 10\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:3: .*duplicate key 'alpha'"):
        parse_config(["--config", str(recipe)])


def test_empty_target_layers_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target_layers: []\n")
    with pytest.raises(ConfigError, match="target_layers is empty"):
        parse_config(["--config", str(recipe)])


def test_same_file_for_both_data_sets_is_refused(tmp_path, capsys):
    tiny = save_tiny(tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", [chat("hi", "hello there")] * 4)
    out = tmp_path / "o"
    code = main(
        [
            "train",
            "--model_name_or_path",
            str(tiny),
            "--cb_data",
            str(data),
            "--retain_data",
            str(tmp_path / "." / "d.jsonl"),
            "--output_dir",
            str(out),
            "--target_layers",
            "2",
            "--max_steps",
            "1",
        ]
    )
    assert code == 2
    assert "cb_data and retain_data are the same file" in one_line_error(capsys)
    assert not (out / "adapter").exists()


def test_assistant_first_chat_is_refused_with_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            chat("hi", "hello"),
            {
                "messages": [
                    {"role": "assistant", "content": "I start"},
                    {"role": "user", "content": "then me"},
                    {"role": "assistant", "content": "answer"},
                ]
            },
        ],
    )
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*starts with an assistant turn"):
        read_records(path)
    # the paper's augmentation (a completion alone, no user turn) stays allowed
    alone = write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])
    assert len(read_records(alone)) == 1


# --- item 16: checked too late ---------------------------------------------------------------------


def test_run_with_unknown_attack_or_judge_is_refused_before_any_stage(tmp_path, capsys, monkeypatch):
    import circuit_breakers.experiments.main_job as main_job

    def fail(*_a, **_k):
        raise AssertionError("a stage ran")

    monkeypatch.setattr(main_job, "build_data", fail)
    monkeypatch.setattr(main_job, "resolve_model_path", fail, raising=False)
    runs = tmp_path / "runs"
    code = main(["run", "--runs_dir", str(runs), "--attacks", "direct,dirct"])
    assert code == 2
    assert "unknown attack 'dirct'" in one_line_error(capsys)
    code = main(["run", "--runs_dir", str(runs), "--judge", "ofline"])
    assert code == 2
    assert "unknown judge 'ofline'" in one_line_error(capsys)
    code = main(["run", "--runs_dir", str(runs), "--attack_budget", "huge"])
    assert code == 2
    assert "attack_budget" in one_line_error(capsys)
    assert not runs.exists()


@pytest.mark.parametrize("flag", ["--batch_size", "--max_new_tokens"])
def test_eval_zero_batch_or_tokens_is_refused(tmp_path, capsys, flag):
    out = tmp_path / "e"
    code = main(["eval", "--model", "embedded", "--out", str(out), "--limit", "1", "--no_progress", flag, "0"])
    assert code == 2
    assert f"{flag} must be at least 1" in one_line_error(capsys)
    assert not out.exists()


# --- item 14: raw tracebacks -----------------------------------------------------------------------


def test_deeply_nested_json_names_file_and_line(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat("a", "b")) + "\n" + deep + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*nested too deeply"):
        read_records(path)
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*nested too deeply"):
        list(iter_jsonl(path))
    as_json = tmp_path / "d.json"
    as_json.write_text("[\n" + deep + "\n]")
    with pytest.raises(DataError, match=r"d\.json:2: .*nested too deeply"):
        json_items(as_json)


def test_deeply_nested_yaml_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("alpha: " + "[" * 20_000 + "]" * 20_000 + "\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: .*nested too deeply"):
        parse_config(["--config", str(recipe)])


def test_gradient_accumulation_steps_zero_is_refused_at_parse_time():
    with pytest.raises(ConfigError, match="gradient_accumulation_steps must be at least 1"):
        parse_config(["--gradient_accumulation_steps", "0"])


def test_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir .*f is a file, not a folder"):
        parse_config(["--output_dir", str(tmp_path / "f" / "out")])
    with pytest.raises(ConfigError, match=r"runs_dir .*f is a file, not a folder"):
        parse_run_config(["--runs_dir", str(tmp_path / "f" / "runs")])


# --- item 15: huge or undecodable values -----------------------------------------------------------

BOMB = (
    'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "alpha: [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
)


def test_yaml_anchor_bomb_is_refused_in_a_short_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BOMB)
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", str(recipe)])
    assert len(str(err.value)) < 600
    assert "aliases" in str(err.value)


def test_long_bad_value_is_shortened_in_the_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: " + "x" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="max_steps must be an integer") as err:
        parse_config(["--config", str(recipe)])
    assert len(str(err.value)) < 400


def test_non_utf8_and_huge_integers_name_file_and_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"alpha: 5\nmax_steps: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:2: not UTF-8 text"):
        parse_config(["--config", str(recipe)])
    recipe.write_text("alpha: 5\nmax_steps: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:2: "):
        parse_config(["--config", str(recipe)])
    data = tmp_path / "d.jsonl"
    data.write_bytes(json.dumps(chat("a", "b")).encode() + b'\n{"messages": "\xff"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8 text"):
        read_records(data)
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8 text"):
        list(iter_jsonl(data))
    data.write_text(json.dumps(chat("a", "b")) + "\n" + '{"n": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: "):
        list(iter_jsonl(data))


def test_directory_as_data_file_says_it_is_a_directory(tmp_path):
    folder = tmp_path / "d.jsonl"
    folder.mkdir()
    for read in (read_records, lambda p: list(iter_jsonl(p)), json_items):
        with pytest.raises(DataError, match=r"d\.jsonl: is a directory, not a file"):
            read(folder)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max_steps", "0"], "max_steps must be at least 1"),
        (["--max_steps", "-1"], "max_steps must be at least 1"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be at least 1"),
        (["--lat_epsilon", "0.1", "--lat_layer", "3"], "lat_layer 3 must lie below the deepest target layer 2"),
    ],
)
def test_recipe_errors_come_before_the_output_folder_is_claimed(tmp_path, capsys, extra, message):
    """These were found only after training_run.json and mask_report.json were written (issue 30, item 16)."""
    data = write_jsonl(tmp_path / "cb.jsonl", [chat(f"q{i}", f"bad answer {i}") for i in range(2)])
    retain = write_jsonl(tmp_path / "rt.jsonl", [chat(f"r{i}", f"good answer {i}") for i in range(2)])
    out = tmp_path / "o"
    code = main(
        ["train", "--model_name_or_path", str(tmp_path / "no-model"), "--cb_data", str(data)]
        + ["--retain_data", str(retain), "--output_dir", str(out), "--target_layers", "2", *extra]
    )
    assert code == 2
    assert message in one_line_error(capsys)
    assert not out.exists()


def test_unwritable_output_folder_is_refused_at_parse_time(tmp_path, monkeypatch):
    import os

    # root may write anywhere, so the permission check is shown with os.access answering as for a user
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    with pytest.raises(ConfigError, match=r"output_dir .*out: cannot create it, .* is not writable"):
        parse_config(["--output_dir", str(tmp_path / "out")])


def test_model_path_that_is_a_text_file_is_one_line(tmp_path, capsys):
    text = tmp_path / "model.txt"
    text.write_text("hello\n")
    with pytest.raises(ConfigError, match=r"model\.txt is a file, not a model folder"):
        parse_config(["--model_name_or_path", str(text)])
    out = tmp_path / "e"
    assert main(["eval", "--model", str(text), "--out", str(out), "--limit", "1", "--no_progress"]) == 2
    assert "model.txt is a file, not a model folder" in one_line_error(capsys)
    assert not out.exists()


def test_non_utf8_csv_and_huge_command_line_integer_are_named(tmp_path):
    from circuit_breakers.data.readers import read_csv

    path = tmp_path / "h.csv"
    path.write_bytes(b"Behavior,BehaviorID\nfine,1\nbad \xff,2\n")
    with pytest.raises(DataError, match=r"h\.csv:3: not UTF-8 text"):
        list(read_csv(path, ["Behavior"]))
    with pytest.raises(ConfigError, match=r"invalid command line: --max_steps 999") as err:
        parse_config(["--max_steps", "9" * 5000])
    assert len(str(err.value)) < 400


def test_huge_integer_in_command_line_settings_names_the_key():
    from circuit_breakers.recipes import settings_from_args

    with pytest.raises(ConfigError, match=r"--max_steps: not a valid value") as err:
        settings_from_args(["--max_steps", "9" * 5000])
    assert len(str(err.value)) < 400
