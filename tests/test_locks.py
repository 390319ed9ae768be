"""One writer per folder (issue 30, item 2): a second `train` on an output folder, a second `run` on a run
folder, a second sweep, merge or interpolation into one folder is refused at once, in one line naming the
holder; a lock left by a killed process blocks nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from transformers import TrainerCallback

import circuit_breakers.experiments.main_job as main_job
import circuit_breakers.experiments.sweep as sweep
from circuit_breakers.cli.main import main
from circuit_breakers.locks import LOCK_FILE, FolderLocked, folder_lock
from circuit_breakers.models import check_output_folder
from circuit_breakers.recipes import parse_config
from circuit_breakers.training.run import RUN_FILE, train
from helpers import save_tiny

HARMFUL = "Sure, here is how to do it step by step. Mix flour, water, yeast and salt, then knead."
BENIGN = "The waves roll in, the gulls cry out. Plants turn light into sugar."


def chat(prompt, answer):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("locks")
    model = save_tiny(root / "model", layers=4)
    cb, retain = root / "cb.jsonl", root / "retain.jsonl"
    cb.write_text("".join(json.dumps(chat(f"How do I bake bread {i}?", HARMFUL)) + "\n" for i in range(4)))
    retain.write_text("".join(json.dumps(chat(f"A poem about the sea {i}.", BENIGN)) + "\n" for i in range(4)))
    return root, model, str(cb), str(retain)


def train_args(tiny, out, *extra):
    _, model, cb, retain = tiny
    return [
        *("--model_name_or_path", str(model), "--cb_data", cb, "--retain_data", retain, "--output_dir", str(out)),
        *("--per_device_train_batch_size", "2", "--target_layers", "2", "--logging_steps", "1", "--seed", "0"),
        *("--save_steps", "1", "--lora_init", "random", "--merge", "false", "--disable_tqdm", "true"),
        *("--dataloader_num_workers", "0", "--report_to", "none", "--max_steps", "2"),
        *extra,
    ]


def refusal(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    line = err.splitlines()[-1]
    assert line.startswith("error: ") and f"pid {os.getpid()} on " in line and "in use by another process" in line
    return line


# --- the lock itself ----------------------------------------------------------------------------------


def test_a_held_lock_refuses_a_second_holder_at_once_and_is_free_after(tmp_path):
    with folder_lock(tmp_path / "out", "output folder") as folder:
        assert (folder / LOCK_FILE).is_file()
        with pytest.raises(FolderLocked, match=rf"folder .*out is in use by another process \(pid {os.getpid()}"):
            with folder_lock(tmp_path / "out"):
                pass
    with folder_lock(tmp_path / "out"):  # released when the block ends
        pass
    with pytest.raises(RuntimeError, match="boom"):  # and when it fails
        with folder_lock(tmp_path / "out"):
            raise RuntimeError("boom")
    with folder_lock(tmp_path / "out"):
        pass


def test_a_lock_held_in_another_thread_refuses_this_one(tmp_path):
    taken, done = threading.Event(), threading.Event()

    def hold():
        with folder_lock(tmp_path):
            taken.set()
            done.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert taken.wait(10)
        with pytest.raises(FolderLocked):
            with folder_lock(tmp_path):
                pass
    finally:
        done.set()
        thread.join()


HOLDER = textwrap.dedent("""
    import sys, time
    from circuit_breakers.locks import folder_lock
    with folder_lock(sys.argv[1]):
        print("LOCKED", flush=True)
        time.sleep(60)
""")


def test_the_lock_of_a_killed_process_blocks_nothing(tmp_path):
    """SIGKILL runs no cleanup: the lock file stays, with the dead holder's details, and must not block."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "out"), "circuit-breakers", "train"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "LOCKED"
        with pytest.raises(FolderLocked, match=rf"pid {child.pid} on .*started .*running `.*circuit-breakers train`"):
            with folder_lock(tmp_path / "out"):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert json.loads((tmp_path / "out" / LOCK_FILE).read_text())["pid"] == child.pid  # left behind
    with folder_lock(tmp_path / "out"):
        assert json.loads((tmp_path / "out" / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_the_lock_file_alone_does_not_make_a_folder_occupied(tmp_path):
    with folder_lock(tmp_path / "out"):
        check_output_folder(tmp_path / "out")  # an export may write into it


def test_a_file_where_the_folder_should_be_is_one_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        with folder_lock(tmp_path / "f"):
            pass


# --- the commands that hold it ------------------------------------------------------------------------


def test_train_into_a_folder_another_run_holds_is_refused_naming_it(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    with folder_lock(out):
        assert main(["train", *train_args(tiny, out)]) == 2
        refusal(capsys)
    assert not (out / RUN_FILE).exists() and not (out / "adapter").exists()


def test_a_second_train_while_one_trains_is_refused_and_the_first_finishes(tiny, tmp_path):
    """The checkpoint rename race of two runs on one folder: the second (a real process, started while the
    first is between checkpoints) is refused before it loads anything; the first finishes untouched."""
    out = tmp_path / "out"
    second = []

    class Intruder(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:  # a checkpoint is written at every step
                command = [sys.executable, "-m", "circuit_breakers.cli", "train", *train_args(tiny, out)]
                second.append(subprocess.run(command, capture_output=True, text=True, timeout=300))

    result = train(*parse_config(train_args(tiny, out)), callbacks=[Intruder()])
    (refused,) = second
    assert refused.returncode == 2, refused.stderr[-2000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert "Traceback" not in refused.stderr and line.startswith("error: output_dir ")
    assert f"in use by another process (pid {os.getpid()} on " in line
    assert result.summary["steps"] == 2 and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_run_on_a_run_folder_another_run_holds_runs_no_stage(tmp_path, capsys, monkeypatch):
    def fail(*_a, **_k):
        raise AssertionError("a stage ran")

    monkeypatch.setattr(main_job, "build_data", fail)
    monkeypatch.setattr(main_job, "_train_stage", fail)
    runs = tmp_path / "runs"
    with folder_lock(runs / "mine"):
        assert main(["run", "--runs_dir", str(runs), "--run_id", "mine", "--judge", "refusal"]) == 2
        refusal(capsys)
    assert not (runs / "mine" / "stages.json").exists()


def test_sweep_on_a_folder_another_sweep_holds_runs_no_point(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "run_pipeline", lambda *a: calls.append(a))
    with folder_lock(tmp_path / "s"):
        assert main(["sweep", "--grid", "alpha=1|2", "--sweep_id", "s", "--runs_dir", str(tmp_path)]) == 2
        refusal(capsys)
    assert calls == [] and not (tmp_path / "s" / "sweep.json").exists()


def test_merge_into_a_folder_another_process_holds_is_refused(tiny, tmp_path, capsys):
    root, model, _, _ = tiny
    out, adapter = tmp_path / "merged", tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model)}))
    with folder_lock(out):
        assert main(["merge", str(adapter), str(out)]) == 2
        refusal(capsys)
        code = main(["interpolate", str(model), str(model), str(out), "--data", tiny[2], "--base", str(model)])
        assert code == 2
        refusal(capsys)
    assert not out.exists()  # the refused commands wrote nothing; the holder left no trace


def test_a_folder_the_lock_made_is_removed_when_the_job_leaves_it_empty(tmp_path):
    with pytest.raises(RuntimeError, match="no model"):
        with folder_lock(tmp_path / "new" / "out"):
            raise RuntimeError("no model")
    assert not (tmp_path / "new" / "out").exists()  # as before the job: nothing to mistake for an output
    (tmp_path / "kept").mkdir()
    with folder_lock(tmp_path / "kept"):
        pass
    assert [p.name for p in (tmp_path / "kept").iterdir()] == [LOCK_FILE]  # a folder the user made stays
    with folder_lock(tmp_path / "made"):
        (tmp_path / "made" / "model.safetensors").write_text("x")
    assert (tmp_path / "made" / "model.safetensors").is_file()
