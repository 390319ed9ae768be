"""Distributed training through accelerate: 2 CPU processes (gloo) equal 1 process with the same global batch.

The launch is the real one: `circuit-breakers train --accelerate-config ddp --num-processes 2` relaunches
itself under `accelerate launch` (torchrun underneath); nothing here fakes a process group.
"""

import json
import os

import pytest
import yaml
from safetensors.torch import load_file

from circuit_breakers.cli.launch import accelerate_launch_command
from circuit_breakers.cli.main import main
from circuit_breakers.config import ACCELERATE_CONFIGS_DIR, ConfigError
from circuit_breakers.recipes import accelerate_config_path, parse_config
from circuit_breakers.training.run import train
from helpers import save_tiny

SHIPPED = ["ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat(prompt, answer):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def data_files(tmp_path):
    # Rows of different lengths, so the two processes get different numbers of loss tokens: equality with
    # one process then needs the global token normalisation, not just averaged gradients.
    cb = [
        chat(f"How do I bake bread {i}?", "Sure, here is how to do it step by step." + " Mix flour" * (i % 3))
        for i in range(8)
    ]
    retain = [
        chat(f"Write a poem about the sea {i}.", "The waves roll in." + " The gulls cry out." * (i % 4))
        for i in range(8)
    ]
    return write_jsonl(tmp_path / "cb.jsonl", cb), write_jsonl(tmp_path / "retain.jsonl", retain)


def args(model, cb, retain, out, batch):
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
        "3",
        "--per_device_train_batch_size",
        str(batch),
        "--target_layers",
        "2",
        "4",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
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
        "--lora_dropout",
        "0",
        "--merge",
        "false",
        "--stall_check_steps",
        "0",
    ]


def step_losses(rows):
    return {row["step"]: row["loss"] for row in rows if "loss" in row and "train_runtime" not in row}


# FSDP2 and DeepSpeed need GPUs: accelerate 1.15 turns FSDP on only for GPU-like devices (a CPU launch
# with the fsdp2 config runs as MULTI_CPU, which `summary["distributed"]` would show), so only DDP runs here.
LEARNED_AND_LAT = [
    "--layer_weights",
    "learned",
    "--layer_weight_lr",
    "0.2",
    "--lat_epsilon",
    "0.5",
    "--lat_steps",
    "2",
    "--lat_layer",
    "1",
]


SUFFIX_LAT = [
    "--lat_epsilon",
    "2",
    "--lat_steps",
    "2",
    "--lat_positions",
    "suffix",
    "--lat_suffix_init",
    "x x x",
    "--lat_step_size",
    "0.2",
]


@pytest.mark.parametrize(
    "engine,chunk_tokens,extra",
    [("ddp", "0", []), ("ddp", "48", []), ("ddp", "0", LEARNED_AND_LAT), ("ddp", "0", SUFFIX_LAT)],
    ids=["ddp", "ddp-chunked", "ddp-learned-weights-lat", "ddp-lat-suffix"],
)
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(
    tmp_path, monkeypatch, engine, chunk_tokens, extra
):
    """chunk_tokens 48: each process runs its rows in chunks, gradient sync deferred to the last one. extra:
    the layer-weight logits live outside the DDP model (their gradient is averaged by hand) and the RR + LAT
    adversary runs on each process's own rows; the universal soft suffix (lat_positions=suffix) moves with the
    gradient averaged over processes, so it stays one suffix, the one a single process finds."""
    model = save_tiny(tmp_path / "model")
    cb, retain = data_files(tmp_path)
    single = train(*parse_config([*args(model, cb, retain, tmp_path / "one", batch=4), *extra]))

    # Each child process gets one thread: two of them on two cores, no oversubscription.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = main(
        [
            "train",
            "--accelerate-config",
            engine,
            "--num-processes",
            "2",
            *args(model, cb, retain, tmp_path / "two", batch=2),
            "--max_chunk_tokens",
            chunk_tokens,
            *extra,
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    one, two = step_losses(single.log_history), step_losses(rows)
    chunks = [row["chunks"] for row in rows if "chunks" in row]
    assert chunks and all(c > 1 if chunk_tokens != "0" else c == 1 for c in chunks), chunks
    assert sorted(two) == [1, 2, 3] and sorted(one) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), (step, one, two)
    assert one[3] != pytest.approx(one[1], abs=1e-3)  # training moved the loss: the comparison means something

    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    # Float sums in another order differ by ~1e-7; Adam divides each gradient by its own size, so for a
    # near-zero gradient that noise can reach a visible fraction of one step (lr 2e-2). Bound it there.
    for key in a:
        diff = (a[key] - b[key]).abs()
        assert diff.max() < 5e-4 and diff.mean() < 1e-5, (key, diff.max(), diff.mean())
    lora_b = [t for k, t in b.items() if "lora_B" in k]
    assert lora_b and all(t.norm() > 0 for t in lora_b)  # the export holds real weights, not placeholders
    # only rank 0 wrote: one log, one summary, no stray temporary folders
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["distributed"]["processes"] == 2
    assert summary["distributed"]["type"] == "MULTI_CPU"
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.startswith(".tmp-")]
    if "learned" in extra:
        weights = summary["layer_weights"]
        assert abs(weights["2"] - 0.5) > 1e-3  # they moved, and identically to one process
        for layer, value in single.summary["layer_weights"].items():
            assert weights[layer] == pytest.approx(value, abs=1e-4)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = accelerate_config_path(name)
    config = load_config_from_file(str(path))
    expected = {"ddp": "MULTI_GPU", "fsdp2": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}
    assert config.distributed_type.name == expected[name]
    raw = yaml.safe_load(path.read_text())
    if name == "fsdp2":
        assert raw["fsdp_config"]["fsdp_version"] == 2
        assert raw["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # export gathers on rank 0
    if name.startswith("deepspeed"):
        assert raw["deepspeed_config"]["zero_stage"] == int(name[-1])
    if name == "deepspeed_zero3":
        assert raw["deepspeed_config"]["zero3_save_16bit_model"] is True  # export consolidates the shards


@pytest.mark.parametrize("name", SHIPPED)
def test_accelerate_launcher_accepts_the_shipped_configs(name):
    """accelerate's own argument validation (what `accelerate launch` runs first) accepts each config.
    DeepSpeed is not installed here, so the DeepSpeed configs stop at this check."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    cmd = accelerate_launch_command(name, ["--max_steps", "1"], num_processes=2)
    i = cmd.index("accelerate.commands.launch")
    launch_args = launch_command_parser().parse_args(cmd[i + 1 :])
    validated, defaults, _ = _validate_launch_command(launch_args)
    assert validated.num_processes == 2
    assert validated.module and validated.training_script == "circuit_breakers.cli"
    assert validated.training_script_args[:3] == ["train", "--max_steps", "1"]
    assert defaults.distributed_type.name in ("MULTI_GPU", "FSDP", "DEEPSPEED")


def test_launch_command_uses_a_free_port_and_rejects_unknown_configs(tmp_path):
    cmd = accelerate_launch_command("ddp", ["--alpha", "3"], num_processes=2)
    assert cmd[cmd.index("--main_process_port") + 1] == "0"  # accelerate picks a free port
    assert cmd[-3:] == ["train", "--alpha", "3"] and "--accelerate-config" not in cmd
    own = tmp_path / "mine.yaml"
    own.write_text((ACCELERATE_CONFIGS_DIR / "ddp.yaml").read_text() + "main_process_port: 29999\n")
    cmd = accelerate_launch_command(str(own), [])
    assert "--main_process_port" not in cmd and "--num_processes" not in cmd  # the file's own values hold
    with pytest.raises(ConfigError, match="accelerate config 'fsdp3' not found .*shipped one: .*fsdp2"):
        accelerate_config_path("fsdp3")


@pytest.mark.parametrize("rank,level", [(None, "INFO"), ("0", "INFO"), ("1", "WARNING")])
def test_only_the_main_process_logs_info(monkeypatch, rank, level):
    import logging

    from circuit_breakers.cli.main import configure_logging

    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    logger = logging.getLogger("circuit_breakers")
    monkeypatch.setattr(logger, "level", logger.level)  # restored after the test
    configure_logging()
    assert logging.getLevelName(logger.getEffectiveLevel()) == level


def test_sigterm_stops_every_process_at_one_step_and_resume_matches_one_process(tmp_path):
    """SIGTERM to `circuit-breakers train --accelerate-config ddp` reaches both workers (through the
    launcher); they agree on a step, checkpoint it and exit 143; resuming finishes with the losses of an
    uninterrupted single-process run with the same global batch."""
    import signal
    import subprocess
    import sys

    model = save_tiny(tmp_path / "model")
    cb, retain = data_files(tmp_path)
    steps = 40
    longer = ["--max_steps", str(steps), "--save_strategy", "steps", "--save_steps", "1000", "--disable_tqdm", "true"]
    single = train(*parse_config([*args(model, cb, retain, tmp_path / "one", batch=4), *longer]))

    out = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "circuit_breakers.cli",
        "train",
        "--accelerate-config",
        "ddp",
        "--num-processes",
        "2",
        *args(model, cb, retain, out, batch=2),
        *longer,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, logged = [], 0
    for line in proc.stdout:
        lines.append(line)
        logged += "'loss'" in line
        if logged == 2:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=180) == 128 + signal.SIGTERM, "".join(lines[-40:])
    checkpoints = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert len(checkpoints) == 1, checkpoints  # one agreed step, written once (not one per rank)
    stopped = int(checkpoints[0].split("-")[1])
    assert 2 <= stopped < steps
    said = [line for line in lines if "interrupted: stopped by SIGTERM" in line]
    assert said and all(f"at step {stopped};" in line for line in said), said
    assert not (out / "adapter").exists()

    code = main(
        [
            "train",
            "--accelerate-config",
            "ddp",
            "--num-processes",
            "2",
            *args(model, cb, retain, out, batch=2),
            *longer,
            "--resume_from_checkpoint",
            "last",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    one, two = step_losses(single.log_history), step_losses(rows)
    assert sorted(two) == list(range(1, steps + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), (step, one[step], two[step])
