"""The command line: recipes with overrides, clear errors, and a real end-to-end run."""

import json

import pytest
import yaml

from circuit_breakers.cli.main import main
from circuit_breakers.config import ConfigError
from circuit_breakers.recipes import parse_config
from helpers import save_tiny


def test_recipe_then_command_line_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"alpha": 3.0, "target_layers": [2, 4], "max_steps": 7}))
    _, _, cb = parse_config(["--config", str(recipe), "--alpha", "4"])
    assert cb.alpha == 4.0 and cb.target_layers == [2, 4] and cb.max_steps == 7


def test_unknown_recipe_key_lists_valid_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("alpah: 3\n")
    with pytest.raises(ConfigError, match=r"alpah \(did you mean alpha\?\).*Valid keys: .*target_layers"):
        parse_config(["--config", str(recipe)])


def test_unknown_flag_is_rejected():
    with pytest.raises(ConfigError, match="target_layer .*did you mean target_layers"):
        parse_config(["--target_layer", "3"])


def test_bad_choice_is_rejected(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("schedule: linear\n")
    with pytest.raises(ConfigError, match="schedule must be one of"):
        parse_config(["--config", str(recipe)])


def test_recipe_cannot_execute_code(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("alpha: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_config(["--config", str(recipe)])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(prompt, answer):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def test_cli_train_errors_are_one_line(tmp_path, capsys):
    tiny = save_tiny(tmp_path / "m")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [}\n')
    code = main(
        [
            "train",
            "--model_name_or_path",
            str(tiny),
            "--cb_data",
            str(bad),
            "--retain_data",
            str(bad),
            "--output_dir",
            str(tmp_path / "o"),
            "--target_layers",
            "2",
            "4",
        ]
    )
    assert code == 2
    assert "bad.jsonl:1: invalid JSON" in capsys.readouterr().err
    code = main(
        [
            "train",
            "--model_name_or_path",
            str(tiny),
            "--cb_data",
            str(bad),
            "--retain_data",
            str(bad),
            "--output_dir",
            str(tmp_path / "o"),
            "--target_layers",
            "2",
            "9",
        ]
    )
    assert code == 2


@pytest.mark.slow
def test_cli_train_embedded_five_steps(tmp_path):
    """The embedded default end to end from the CLI: adapter and merged model written."""
    harmful = [
        chat(f"Explain step {i} of the forbidden procedure.", "Sure, here is step one. First you take the ...")
        for i in range(4)
    ]
    benign = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(4)]
    cb, retain = write_jsonl(tmp_path / "cb.jsonl", harmful), write_jsonl(tmp_path / "retain.jsonl", benign)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            "paper",
            "--cb_data",
            str(cb),
            "--retain_data",
            str(retain),
            "--output_dir",
            str(out),
            "--max_steps",
            "5",
            "--per_device_train_batch_size",
            "2",
            "--lora_init",
            "random",
            "--learning_rate",
            "1e-3",
            "--save_strategy",
            "no",
            "--target_layers",
            "4",
            "8",
            "--logging_steps",
            "1",
        ]
    )
    assert code == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "model.safetensors").is_file()
    config = json.loads((out / "merged" / "config.json").read_text())
    assert config["num_hidden_layers"] == 30
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["num_layers"] == 30


@pytest.mark.parametrize("command", [["run"], ["run", "embedded"], ["train"]])
def test_help_prints_the_options_and_starts_nothing(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--retain_weight" in out and "--run_id" in out
    assert not (tmp_path / "runs").exists()
