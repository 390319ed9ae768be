"""Runs that survive interruption, full disks and bad input (issue 8).

- A run killed by SIGTERM (a real subprocess) saves a checkpoint and resumes to the uninterrupted result.
- Checkpoints are atomic: a disk that fills up mid-save leaves the previous checkpoint as the last one.
- Bad input stops with one line naming what and where, before anything is written or lost.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from circuit_breakers.cli.main import main
from circuit_breakers.config import ConfigError
from circuit_breakers.data.records import DataError
from circuit_breakers.models import ModelError, load_model
from circuit_breakers.recipes import parse_config
from circuit_breakers.training import CheckpointError, TrainingInterrupted
from circuit_breakers.training.run import RUN_FILE, layer_plan, train
from helpers import save_tiny

HARMFUL = "Sure, here is how to do it step by step. Mix flour, water, yeast and salt, then knead."
BENIGN = "The waves roll in, the gulls cry out. Plants turn light into sugar."
STEPS = 6


def chat(prompt, answer):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    model = save_tiny(root / "model")
    cb = write_jsonl(root / "cb.jsonl", [chat(f"How do I bake bread {i}?", HARMFUL) for i in range(8)])
    retain = write_jsonl(root / "retain.jsonl", [chat(f"Write a poem about the sea {i}.", BENIGN) for i in range(8)])
    return root, model, cb, retain


def args(setup, out, *extra):
    _, model, cb, retain = setup
    return [
        "--model_name_or_path",
        str(model),
        "--cb_data",
        cb,
        "--retain_data",
        retain,
        "--output_dir",
        str(out),
        "--max_steps",
        str(STEPS),
        "--per_device_train_batch_size",
        "2",
        "--target_layers",
        "2",
        "4",
        "--logging_steps",
        "1",
        "--save_steps",
        "100",
        "--seed",
        "0",
        "--dataloader_num_workers",
        "0",
        "--lora_init",
        "random",
        "--learning_rate",
        "2e-2",
        "--alpha",
        "5",
        "--representation",
        "centered",
        "--cb_mask_mode",
        "completion",
        "--merge",
        "false",
        "--disable_tqdm",
        "true",
        *extra,
    ]


def losses(log_history):
    return [(row["step"], round(row["loss"], 6)) for row in log_history if "loss" in row and "train_runtime" not in row]


def adapter(out):
    return load_file(Path(out) / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run every interrupted one must reproduce."""
    root = setup[0]
    result = train(*parse_config(args(setup, root / "reference")))
    assert [s for s, _ in losses(result.log_history)] == list(range(1, STEPS + 1))
    return losses(result.log_history), adapter(root / "reference"), root / "reference"


CHILD = textwrap.dedent("""
    import sys, time
    from transformers import TrainerCallback
    from circuit_breakers.recipes import parse_config
    from circuit_breakers.training.run import train
    from circuit_breakers.training import TrainingInterrupted

    class Pace(TrainerCallback):  # slow enough that the signal lands mid-run, never after the end
        def on_step_end(self, args, state, control, **kwargs):
            print(f"STEP {state.global_step}", flush=True)
            time.sleep(0.3)

    try:
        train(*parse_config(sys.argv[1:]), callbacks=[Pace()])
    except TrainingInterrupted as err:
        print(f"INTERRUPTED {err}", flush=True)
        sys.exit(err.exit_code)
    print("FINISHED", flush=True)
""")


def test_sigterm_mid_training_then_resume_equals_uninterrupted_run(setup, reference, tmp_path):
    want_losses, want_adapter, _ = reference
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args(setup, out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("STEP 2"):
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, "".join(lines[-30:])
    said = next(line for line in lines if line.startswith("INTERRUPTED"))
    step = int(said.split("at step ")[1].split(";")[0])
    assert 2 <= step < STEPS, said
    assert (out / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (out / "adapter").exists()  # an unfinished run exports nothing

    resumed = train(*parse_config(args(setup, out, "--resume_from_checkpoint", "last")))
    assert losses(resumed.log_history) == want_losses
    assert_same_adapter(adapter(out), want_adapter)


def test_sigint_saves_a_checkpoint_and_restores_handlers(setup, tmp_path):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(
        TrainingInterrupted, match=r"stopped by SIGINT at step 2; checkpoint .*checkpoint-2 written"
    ) as info:
        train(*parse_config(args(setup, tmp_path / "int", "--max_steps", "4")), callbacks=[Interrupt()])
    assert info.value.exit_code == 130
    assert (tmp_path / "int" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_disk_full_mid_checkpoint_keeps_the_previous_one_and_resume_finishes(setup, reference, tmp_path, monkeypatch):
    want_losses, want_adapter, _ = reference
    out = tmp_path / "full"
    real_save = torch.save

    def full_at_step_4(obj, f, *a, **kw):
        if "checkpoint-4" in str(f):  # after the adapter weights of checkpoint-4 are already written
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_at_step_4)
    with pytest.raises(CheckpointError) as info:
        train(*parse_config(args(setup, out, "--save_steps", "2", "--save_total_limit", "1")))
    message = str(info.value)
    assert "\n" not in message and "disk full" in message and "checkpoint-2 is intact" in message
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-2" in names and "checkpoint-4" not in names
    assert not [n for n in names if n.startswith(".tmp-")]  # the half-written one is gone
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and (out / "checkpoint-2" / "optimizer.pt").is_file()
    monkeypatch.setattr(torch, "save", real_save)

    # The final export fails too (disk full again): the checkpoint of the last step survives it.
    import peft.peft_model

    real_safe = peft.peft_model.safe_save_file

    def full_on_export(tensors, path, *a, **kw):
        if ".tmp-adapter" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_safe(tensors, path, *a, **kw)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_on_export)
    with pytest.raises(CheckpointError, match=rf"adapter: disk full .*checkpoint-{STEPS} is intact"):
        train(
            *parse_config(
                args(setup, out, "--save_steps", "2", "--save_total_limit", "1", "--resume_from_checkpoint", "last")
            )
        )
    monkeypatch.setattr(peft.peft_model, "safe_save_file", real_safe)
    assert not (out / "adapter").exists()

    done = train(
        *parse_config(
            args(setup, out, "--save_steps", "2", "--save_total_limit", "1", "--resume_from_checkpoint", "last")
        )
    )
    assert losses(done.log_history) == want_losses
    assert_same_adapter(adapter(out), want_adapter)


def test_disk_full_during_the_merged_export_keeps_the_adapter_and_leaves_no_half_model(
    setup, reference, tmp_path, monkeypatch
):
    import transformers.modeling_utils

    _, want_adapter, _ = reference
    out = tmp_path / "merge"
    real = transformers.modeling_utils.safe_save_file

    def full_on_merge(tensors, path, *a, **kw):
        if "merged.tmp" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_on_merge)
    with pytest.raises(CheckpointError) as info:
        train(*parse_config(args(setup, out, "--merge", "true")))
    message = str(info.value)
    assert "\n" not in message and "disk full" in message and "adapter" in message and "is complete" in message
    assert not (out / "merged").exists() and not (out / "merged.tmp").exists()
    assert_same_adapter(adapter(out), want_adapter)  # the adapter was written before the merge and is whole

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real)
    done = train(*parse_config(args(setup, out, "--merge", "true", "--resume_from_checkpoint", "last")))
    assert done.merged_dir is not None and (out / "merged" / "model.safetensors").is_file()
    assert_same_adapter(adapter(out), want_adapter)


def test_output_dir_holding_a_different_run_is_refused_unless_overwritten(setup, reference, tmp_path):
    _, _, ref_dir = reference
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint-6", "adapter"):  # the reference run's files, copied in
        os.system(f"cp -r {ref_dir / name} {run / name}")  # noqa: S605 - test fixture copy
    (run / RUN_FILE).write_text((ref_dir / RUN_FILE).read_text())
    (run / "notes.txt").write_text("mine")

    other = args(setup, run, "--learning_rate", "1e-2", "--max_steps", "1")
    with pytest.raises(
        ConfigError,
        match=r"already holds a different run \(.*learning_rate 0\.02 -> 0\.01.*"
        r"--overwrite_output_dir true",
    ):
        train(*parse_config(other))
    assert main(["train", *other]) == 2  # the CLI: one line, exit code 2

    result = train(*parse_config([*other, "--overwrite_output_dir", "true"]))
    assert result.summary["steps"] == 1
    names = sorted(p.name for p in run.iterdir())
    assert "checkpoint-6" not in names and "checkpoint-1" in names and "notes.txt" in names
    assert json.loads((run / RUN_FILE).read_text())["train"]["learning_rate"] == 0.01

    foreign = tmp_path / "foreign"
    (foreign / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(ConfigError, match=rf"holds a run without {RUN_FILE}"):
        train(*parse_config(args(setup, foreign)))


def test_same_run_in_the_same_dir_is_allowed(setup, reference):
    """Re-running (or resuming) the identical run in its folder is not 'a different run'."""
    _, _, ref_dir = reference
    from circuit_breakers.training.run import check_output_dir, read_labelled, run_identity

    m, d, c = parse_config(args(setup, ref_dir, "--logging_steps", "3", "--save_steps", "7"))
    identity = run_identity(
        m, d, c, [r for _, r in read_labelled(d.cb_data)], [r for _, r in read_labelled(d.retain_data)]
    )
    assert check_output_dir(ref_dir, identity, overwrite=False) is False


def test_a_setting_added_later_at_its_default_is_the_same_run(setup, reference, tmp_path):
    """A run recorded by a version without `lat_positions` is the same run when the setting is at its
    default (which reproduces the old behaviour), and a different one when it is not."""
    _, _, ref_dir = reference
    from circuit_breakers.training.run import check_output_dir, read_labelled, run_identity

    old = tmp_path / "old"
    (old / "adapter").mkdir(parents=True)
    recorded = json.loads((ref_dir / RUN_FILE).read_text())
    del recorded["train"]["lat_positions"]
    (old / RUN_FILE).write_text(json.dumps(recorded))
    m, d, c = parse_config(args(setup, old))
    cb, retain = [r for _, r in read_labelled(d.cb_data)], [r for _, r in read_labelled(d.retain_data)]
    assert check_output_dir(old, run_identity(m, d, c, cb, retain), overwrite=False) is False
    m, d, c = parse_config(args(setup, old, "--lat_positions", "prompt"))
    with pytest.raises(ConfigError, match=r"lat_positions None -> 'prompt'"):
        check_output_dir(old, run_identity(m, d, c, cb, retain), overwrite=False)


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [
                '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
                '{"messages": [',
            ],
            r"cb\.jsonl:2: invalid JSON",
        ),
        ([chat("a", "b"), {"prompt": "no messages here"}], r"cb\.jsonl:2: row needs a `messages` list"),
        (
            [chat("a", "b"), {"messages": [{"role": "user", "content": "only a question"}]}],
            r"cb\.jsonl:2: .*no assistant turn",
        ),
        ([chat("a", "b"), chat("c", "")], r"cb\.jsonl:2: empty completion \(the assistant turn has no text\)"),
        (
            [chat("a", "b"), chat("c", "word " * 80)],
            r"cb\.jsonl:2: completion is \d+ tokens, longer than max_length 48",
        ),
    ],
)
def test_bad_rows_stop_with_file_and_line(setup, tmp_path, capsys, rows, message):
    root, model, _, retain = setup
    cb = write_jsonl(tmp_path / "cb.jsonl", rows)
    cfg = args(setup, tmp_path / "out", "--max_length", "48")
    cfg[cfg.index("--cb_data") + 1] = cb
    with pytest.raises(DataError, match=message):
        train(*parse_config(cfg))
    assert main(["train", *cfg]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cb.jsonl:2: " in errors[0]  # one line, never a traceback
    assert not (tmp_path / "out" / "adapter").exists()
    assert not (tmp_path / "out" / RUN_FILE).exists()  # not claimed: the corrected retry is not "a different run"


def test_bad_rows_skip_drops_and_counts(setup, tmp_path):
    cb = write_jsonl(tmp_path / "cb.jsonl", [chat("a", HARMFUL), chat("c", ""), chat("d", HARMFUL)])
    cfg = args(setup, tmp_path / "out", "--bad_rows", "skip", "--max_steps", "1", "--save_strategy", "no")
    cfg[cfg.index("--cb_data") + 1] = cb
    result = train(*parse_config(cfg))
    assert result.summary["examples"]["circuit_breaker"] == 2
    report = json.loads((tmp_path / "out" / "mask_report.json").read_text())
    assert json.dumps(report).count("empty_completion") >= 1


def test_target_layers_out_of_range(setup):
    m, _, c = parse_config(args(setup, "unused", "--target_layers", "2", "9"))
    with pytest.raises(ModelError, match=r"target_layers \[9\] out of range: this model has 6 layers"):
        layer_plan(6, c, m)


def test_retain_layers_above_the_cut_need_the_full_model(setup):
    m, _, c = parse_config(args(setup, "unused", "--target_layers", "2", "--retain_layers", "2,5"))
    with pytest.raises(ModelError, match=r"retain_layers \[5\] lie above the deepest target layer \(2\)"):
        layer_plan(6, c, m)
    m, _, c = parse_config(
        args(setup, "unused", "--target_layers", "2", "--retain_layers", "2,5", "--truncate_layers", "false")
    )
    assert layer_plan(6, c, m)[:2] == ([2], [2, 5])


@pytest.mark.parametrize(
    "line, message",
    [
        ("max_steps: ten", r"max_steps must be an integer, got 'ten'"),
        ("target_layers: 3", r"target_layers must be a list of integers, got 3"),
        ("merge: maybe", r"merge must be true or false, got 'maybe'"),
        ("lora_init: gaussian", r"lora_init must be one of \['zero', 'random'\], got 'gaussian'"),
        ("bad_rows: ignore", r"bad_rows must be one of \['error', 'skip'\]"),
    ],
)
def test_mistyped_recipe_values_are_refused(tmp_path, line, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(line + "\n")
    with pytest.raises(ConfigError, match=message):
        parse_config(["--config", str(recipe)])


def test_remote_code_is_not_run_unless_the_recipe_says_so(tmp_path):
    """Model folders whose config points at their own Python code: loading must not execute that code."""
    folder = save_tiny(tmp_path / "m")
    marker = tmp_path / "pwned"
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    assert parse_config([])[0].trust_remote_code is False  # the default
    # A known architecture with code beside it: the built-in class loads, the file is never imported.
    assert type(load_model(str(folder)).config).__name__ == "LlamaConfig"
    assert not marker.exists()
    # An architecture transformers does not know: refused with a clear message, still nothing run.
    (folder / "config.json").write_text(
        json.dumps({**config, "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}})
    )
    with pytest.raises(ModelError, match=r"needs its own model code .*trust_remote_code: true"):
        load_model(str(folder))
    assert not marker.exists()
    with pytest.raises(Exception):
        load_model(str(folder), trust_remote_code=True)  # the recipe said so: now (and only now) it runs
    assert marker.read_text() == "ran"


def test_weights_we_write_are_safetensors(reference):
    """Adapter and checkpoint weights are safetensors; the only torch files are the Trainer's own optimizer,
    scheduler and RNG states (loaded back with weights_only=True) and its training_args.bin."""
    _, _, out = reference
    adapter_files = {p.name for p in (out / "adapter").iterdir()}
    assert "adapter_model.safetensors" in adapter_files
    assert not [n for n in adapter_files if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    checkpoint = out / f"checkpoint-{STEPS}"
    torch_files = {p.name for p in checkpoint.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")}
    assert torch_files <= {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}, torch_files
    assert (checkpoint / "adapter_model.safetensors").is_file()
