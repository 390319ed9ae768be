"""torch_compile (issue 29) is refused when the recipe is read, and a failed export leaves no staging folder.

The rerouting step reads hidden states through hooks on the uncompiled decoder blocks and stops at the
deepest target layer, so a compiled model never ran: training went at the uncompiled speed and the export
then found no LoRA weight under the compiled module's `_orig_mod.` names."""

import pytest

from circuit_breakers.config import ConfigError
from circuit_breakers.data.records import Record
from circuit_breakers.recipes import parse_config
from circuit_breakers.training.run import train
from helpers import save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", layers=4)


def args(tiny, out, *extra):
    base = ["--model_name_or_path", str(tiny), "--output_dir", str(out), "--max_steps", "1"]
    base += ["--per_device_train_batch_size", "2", "--target_layers", "2", "--dataloader_num_workers", "0"]
    return [*base, *extra]


def rows(n=4):
    cb = [Record.from_prompt(f"How do I bake {i}?", "Sure, mix flour and water.", "circuit_breaker") for i in range(n)]
    retain = [Record.from_prompt(f"A poem about the sea {i}.", "The waves roll in.", "retain") for i in range(n)]
    return cb, retain


@pytest.mark.parametrize(
    "extra",
    [["--torch_compile", "true"], ["--torch_compile_backend", "eager"], ["--torch_compile_mode", "default"]],
)
def test_torch_compile_is_refused_when_the_recipe_is_read(tiny, tmp_path, extra):
    with pytest.raises(ConfigError) as err:
        parse_config(args(tiny, tmp_path / "run", *extra))
    message = str(err.value)
    assert "\n" not in message and "torch_compile" in message and "leave it unset" in message
    assert not (tmp_path / "run").exists()  # refused before anything is made


def staging_left(out):
    return sorted(p.name for p in out.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".tmp"))


def test_a_failed_adapter_export_leaves_no_staging_folder(tiny, tmp_path, monkeypatch):
    import circuit_breakers.training.run as run

    def broken_card(*_args, **_kwargs):
        raise RuntimeError("forced export failure")

    monkeypatch.setattr(run, "write_model_card", broken_card)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="forced export failure"):
        train(*parse_config(args(tiny, out, "--merge", "false")), *rows())
    assert staging_left(out) == [] and not (out / "adapter").exists()
    assert any(out.glob("checkpoint-*"))  # the trained step is kept to export again


def test_a_failed_merged_export_leaves_no_staging_folder(tiny, tmp_path, monkeypatch):
    import circuit_breakers.models as models

    def full_disk(path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(models, "umask_permissions", full_disk)  # save_model's last step inside its staging copy
    out = tmp_path / "run"
    with pytest.raises(Exception, match="could not finish writing"):
        train(*parse_config(args(tiny, out)), *rows())
    assert staging_left(out) == [] and not (out / "merged").exists()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
