"""Issue 30, items 1, 3 and 18: nothing a user keeps is deleted without --overwrite, non-finite weights are
never written, written files and the model cache get the umask's permissions, checkpoints ask no Hub."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from circuit_breakers.adapters import add_lora
from circuit_breakers.cli.main import main
from circuit_breakers.config import ConfigError, ModelConfig
from circuit_breakers.fileio import current_umask
from circuit_breakers.models import ModelError, convert_gguf, load_model, save_model
from circuit_breakers.recipes import parse_config
from circuit_breakers.training import TrainingDiverged
from circuit_breakers.training.run import train
from helpers import make_model, make_tokenizer, save_tiny

HARMFUL = "Sure, here is how to do it step by step. Mix flour, water, yeast and salt, then knead."
BENIGN = "The waves roll in, the gulls cry out. Plants turn light into sugar."


def chat(prompt, answer):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    model = save_tiny(root / "model")
    cb, retain = root / "cb.jsonl", root / "retain.jsonl"
    cb.write_text("".join(json.dumps(chat(f"How do I bake bread {i}?", HARMFUL)) + "\n" for i in range(4)))
    retain.write_text("".join(json.dumps(chat(f"A poem about the sea {i}.", BENIGN)) + "\n" for i in range(4)))
    # an adapter with non-zero weights, as training leaves one
    base = load_model(str(model), dtype=torch.float32)
    peft_model = add_lora(base, ModelConfig(model_name_or_path=str(model), lora_init="random"), [0, 1])
    peft_model.save_pretrained(root / "adapter")
    return root, model, str(cb), str(retain)


def train_args(tiny, out, *extra):
    _, model, cb, retain = tiny
    return [
        *("--model_name_or_path", str(model), "--cb_data", cb, "--retain_data", retain, "--output_dir", str(out)),
        *("--per_device_train_batch_size", "2", "--target_layers", "2", "--logging_steps", "1", "--seed", "0"),
        *("--save_steps", "100", "--lora_init", "random", "--merge", "false", "--disable_tqdm", "true"),
        *("--dataloader_num_workers", "0", "--report_to", "none"),
        *extra,
    ]


# --- item 1: an existing output folder is never deleted without --overwrite ---------------------------
def test_merge_refuses_a_folder_holding_other_files_unless_overwrite(tiny, capsys):
    root, model, _, _ = tiny
    out = root / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my own work")
    assert main(["merge", str(root / "adapter"), str(out), "--base", str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(out) in err and "--overwrite" in err
    assert (out / "notes.txt").read_text() == "my own work" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    assert main(["merge", str(root / "adapter"), str(out), "--base", str(model), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()


def test_merge_refuses_to_replace_an_earlier_model_unless_overwrite_and_writes_into_an_empty_folder(tiny, capsys):
    root, model, _, _ = tiny
    out = root / "merged"
    out.mkdir()  # empty: written into
    assert main(["merge", str(root / "adapter"), str(out), "--base", str(model)]) == 0
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["merge", str(root / "adapter"), str(out), "--base", str(model)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    a_file = root / "a_file"
    a_file.write_text("x")
    assert main(["merge", str(root / "adapter"), str(a_file), "--base", str(model), "--overwrite"]) == 2
    assert a_file.read_text() == "x"


def test_save_model_refuses_an_occupied_folder_and_keeps_its_files(tmp_path):
    tokenizer, model = make_tokenizer(), make_model(layers=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_model(model, tokenizer, out)
    assert (out / "keep.txt").read_text() == "keep" and len(list(out.iterdir())) == 1
    save_model(model, tokenizer, out, overwrite=True)
    assert (out / "model.safetensors").is_file()


# --- item 3: non-finite settings refused when parsed; non-finite weights never written ------------------
@pytest.mark.parametrize(
    "line, message",
    [
        ("learning_rate: .inf", r"r.yaml: learning_rate must be a finite number, got inf"),
        ("alpha: .nan", r"r.yaml: alpha must be a finite number, got nan"),
        ("lora_dropout: -.inf", r"r.yaml: lora_dropout must be a finite number, got -inf"),
    ],
)
def test_non_finite_recipe_values_are_refused_naming_the_key(tmp_path, line, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(line + "\n")
    with pytest.raises(ConfigError, match=message):
        parse_config(["--config", str(recipe)])


def test_non_finite_command_line_values_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"--learning_rate must be a finite number, got inf"):
        parse_config(["--learning_rate", "inf"])
    with pytest.raises(ConfigError, match=r"--stall_margin must be a finite number, got nan"):
        parse_config(["--stall_margin", "nan"])


def test_save_model_refuses_non_finite_weights(tmp_path):
    tokenizer, model = make_tokenizer(), make_model(layers=2)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(ModelError, match="non-finite"):
        save_model(model, tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_diverged_step_exports_nothing(tiny, tmp_path):
    # 1e39 is a finite float that overflows float32: after the one optimizer step every LoRA weight is inf
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as info:
        train(*parse_config(train_args(tiny, out, "--learning_rate", "1e39", "--max_steps", "1", "--merge", "true")))
    message = str(info.value)
    assert "\n" not in message and "non-finite" in message and "learning_rate" in message
    assert not (out / "adapter").exists() and not (out / "merged").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_divergence_without_a_checkpoint_does_not_claim_one_is_intact(tiny, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as info:
        train(*parse_config(train_args(tiny, out, "--learning_rate", "1e39", "--max_steps", "3")))
    message = str(info.value)
    assert "intact" not in message and "no checkpoint" in message, message
    assert not (out / "adapter").exists()


# --- item 18: permissions of what we write, and no Hub lookup at a save -------------------------------
def test_the_gguf_conversion_cache_and_merged_models_get_the_umask_permissions(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = make_tokenizer(), make_model(layers=2)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    old = os.umask(0o022)
    try:
        converted = convert_gguf(gguf, tmp_path / "cache" / "m-converted")
        merged = save_model(model, tokenizer, tmp_path / "merged")
    finally:
        os.umask(old)
    for folder in (converted, merged):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        for file in folder.iterdir():
            assert stat.S_IMODE(file.stat().st_mode) == 0o644, file
    assert (converted / "config.json").is_file()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name != "m-converted"]


def test_checkpoints_and_the_adapter_export_ask_no_hub(tiny, tmp_path, monkeypatch):
    import peft.utils.other
    import peft.utils.save_and_load

    calls = []

    def no_hub(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        raise AssertionError(f"hub lookup of {repo_id}/{filename}")

    monkeypatch.setattr(peft.utils.save_and_load, "check_file_exists_on_hf_hub", no_hub)
    monkeypatch.setattr(peft.utils.other, "check_file_exists_on_hf_hub", no_hub)
    # a base model name that is no local folder (as `embedded` or a hub id is): peft would ask the Hub about it
    import circuit_breakers.models

    _, model, _, _ = tiny
    real = circuit_breakers.models.resolve_model_path
    monkeypatch.setattr(
        circuit_breakers.models,
        "resolve_model_path",
        lambda name, gguf_file=None: str(model) if name == "someone/tiny" else real(name, gguf_file),
    )
    run = tmp_path / "run"
    configs = parse_config(train_args(tiny, run, "--max_steps", "2", "--save_steps", "1"))
    configs[0].model_name_or_path = "someone/tiny"
    result = train(*configs)
    assert calls == []
    for path in (run / "checkpoint-1" / "adapter_model.safetensors", result.adapter_dir / "adapter_model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~current_umask(), path
    assert (run / "checkpoint-1").is_dir() and (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "someone/tiny"
    )
