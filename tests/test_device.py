"""The `device` and `dtype` settings (issue 29): one resolution in `models`, honoured by every command that loads
a model, checked before any stage runs, and recorded where each stage ran. Runs on the CPU: a CUDA device is
only ever pretended (torch.cuda's answers monkeypatched), never needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from circuit_breakers import models
from circuit_breakers.cli.main import main
from circuit_breakers.config import ConfigError, ModelConfig
from circuit_breakers.data.prompts import Prompt, write_prompts
from circuit_breakers.models import ModelError, load_model, resolve_device, resolve_dtype
from helpers import save_tiny

NO_GPU = "device cuda asked for but torch.cuda.is_available() is false; use --device cpu or auto"


@pytest.fixture
def no_accelerator(monkeypatch):
    """This machine as it is (no GPU), stated, so the tests mean the same on a machine that has one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def pretend_cuda(monkeypatch):
    """A CUDA device with bf16 support, as torch.cuda reports one (nothing is placed on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("device") / "model", "llama", "chatml", layers=4)


@pytest.fixture
def loads(monkeypatch):
    """Every model `models.load_model` returns in this test: (device asked for, parameters' devices, dtype)."""
    seen: list[tuple[object, set[str], torch.dtype]] = []
    real = models.load_model

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        params = list(model.parameters())
        asked = kwargs.get("device")
        where = None if asked is None else resolve_device(asked)
        seen.append((where, {str(p.device) for p in params}, params[0].dtype))
        return model

    monkeypatch.setattr(models, "load_model", spy)
    return seen


def test_auto_and_cpu_resolve_to_the_cpu_without_an_accelerator(no_accelerator):
    assert resolve_device("auto") == resolve_device("cpu") == resolve_device(None) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


def test_cuda_without_a_gpu_is_one_clear_line(no_accelerator):
    with pytest.raises(ModelError) as err:
        resolve_device("cuda")
    assert str(err.value) == NO_GPU
    with pytest.raises(ModelError, match="device cuda:1 asked for"):
        resolve_device("cuda:1")
    with pytest.raises(ModelError, match="device mps asked for"):
        resolve_device("mps")


def test_a_device_index_past_the_visible_gpus_is_refused(pretend_cuda):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ModelError, match=r"cuda:2 asked for but only 2 CUDA devices \(0\.\.1\)"):
        resolve_device("cuda:2")


def test_unknown_device_names_are_refused_in_the_config():
    with pytest.raises(ConfigError, match="device 'gpu' is not one of auto, cpu, cuda, cuda:N, mps"):
        ModelConfig(device="gpu")
    assert ModelConfig(device="cuda:3").device == "cuda:3"  # presence is checked where the model is placed


def test_dtype_auto_is_float32_on_cpu_and_bf16_on_a_gpu_that_supports_it(no_accelerator, monkeypatch):
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto") == torch.float32  # device auto: the CPU here
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16  # explicit values still taken
    assert resolve_dtype("float16") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float32  # an older GPU: fp32, not fp16
    with pytest.raises(ModelError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")


def test_dtype_auto_follows_the_auto_device(pretend_cuda):
    assert resolve_dtype("auto") == torch.bfloat16


def test_load_model_puts_the_weights_on_the_device_in_the_dtype(tiny, no_accelerator):
    model = load_model(str(tiny), dtype="bfloat16", device="cpu")
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ModelError, match="device cuda asked for"):
        load_model(str(tiny), device="cuda")


def cli_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cuda_without_a_gpu_stops_each_command_at_the_start(tiny, tmp_path, capsys, no_accelerator, loads):
    prompts = tmp_path / "prompts.jsonl"
    write_prompts([Prompt(id="p1", text="Hello there")], prompts)
    records = tmp_path / "records.jsonl"
    records.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}) + "\n"
    )
    commands = [
        ["run", "--model_name_or_path", str(tiny), "--runs_dir", str(tmp_path / "runs"), "--device", "cuda"],
        ["train", "--model_name_or_path", str(tiny), "--cb_data", str(records), "--retain_data", str(records),
         "--output_dir", str(tmp_path / "train"), "--device", "cuda"],
        ["data", "generate", "--model", str(tiny), "--prompts", str(prompts), "--out", str(tmp_path / "g.jsonl"),
         "--device", "cuda"],
        ["eval", "--model", str(tiny), "--out", str(tmp_path / "eval"),
         "--judge", "refusal", "--device", "cuda"],
        ["probe", "train", "--model", str(tiny), "--harmful", str(records), "--benign", str(records),
         "--out", str(tmp_path / "probe"), "--device", "cuda"],
        ["serve", "--model", str(tiny), "--device", "cuda"],
        ["interpolate", str(tiny), str(tiny), str(tmp_path / "interp"), "--data", str(records), "--base", str(tiny),
         "--device", "cuda"],
        ["agents", "experiment", str(records), "--out", str(tmp_path / "agents.json"), "--model_name_or_path",
         str(tiny), "--device", "cuda"],
        ["categories", "experiment", "--benchmark", f"file:{prompts}", "--categories", "a,b", "--retain_data",
         str(records), "--out", str(tmp_path / "cat"), "--model_name_or_path", str(tiny), "--device", "cuda"],
    ]  # fmt: skip
    for argv in commands:
        assert main(argv) == 2, argv[0]
        assert cli_error(capsys) == f"error: {NO_GPU}", argv[0]
    assert loads == []  # no model was loaded first
    assert not (tmp_path / "runs").exists() and not (tmp_path / "train").exists()


def test_data_generate_and_probe_and_interpolate_place_the_model(tiny, tmp_path, capsys, no_accelerator, loads):
    prompts = tmp_path / "prompts.jsonl"
    write_prompts([Prompt(id="p1", text="Hello there")], prompts)
    argv = ["data", "generate", "--model", str(tiny), "--prompts", str(prompts), "--out", str(tmp_path / "g.jsonl")]
    assert main([*argv, "--max_new_tokens", "2", "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert loads == [(torch.device("cpu"), {"cpu"}, torch.bfloat16)]

    from circuit_breakers.guard.server import load_served_model

    loads.clear()
    load_served_model(str(tiny), None, "auto", device="auto")
    assert loads == [(torch.device("cpu"), {"cpu"}, torch.float32)]

    from circuit_breakers.data.records import Record
    from circuit_breakers.experiments.interpolate import interpolate_within_budget

    loads.clear()
    records = [
        Record(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], kind="retain")
    ]
    model, result = interpolate_within_budget(tiny, tiny, records, str(tiny), 0.5, [1.0], device="cpu")
    assert result.weight == 1.0 and {p.device for p in model.parameters()} == {torch.device("cpu")}
    # the base model is read on the device; start and end weights are read on the CPU in float32 (the sums are
    # made there) and the model then moved to the device
    assert [device for device, _, _ in loads] == [torch.device("cpu"), None, None]


def test_probe_training_places_the_model(tiny, tmp_path, no_accelerator, loads):
    from circuit_breakers.data.records import Record
    from circuit_breakers.guard.probes import train_probe_for_model

    def rec(text: str) -> Record:
        return Record(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": text}])

    harmful = [rec(f"Sure, here is how {i}") for i in range(6)]
    benign = [rec(f"The capital of France is Paris {i}") for i in range(6)]
    train_probe_for_model(str(tiny), harmful, benign, tmp_path / "probe", epochs=1, device="cpu")
    assert loads == [(torch.device("cpu"), {"cpu"}, torch.float32)]


TOY = (
    "--harmful_prompts harmbench --n_xstest 2 --n_xstest_retain 0 --n_harmful_train 4 --n_harmful_eval 2 "
    "--n_benign_train 4 --n_benign_eval 2 --n_borderline_train 2 --n_borderline_eval 2 --completion_tokens 4 "
    "--generation_batch_size 4 --eval_max_new_tokens 4 --judge refusal --attacks direct --max_steps 1 "
    "--per_device_train_batch_size 2 --target_layers 2 --logging_steps 1 --save_steps 1 --max_length 96 "
    "--n_drift_eval 2 --drift_tokens 2"
).split()


def test_run_places_every_stage_and_records_where(tiny, tmp_path, no_accelerator, loads):
    """`run` with device auto (the CPU here) and dtype auto: every model a stage loads for its own use is asked
    for the device and lands there; training's model is placed by the Trainer; stages.json and results.json
    say where each stage ran."""
    args = ["run", "--model_name_or_path", str(tiny), "--runs_dir", str(tmp_path), "--run_id", "toy", *TOY]
    assert main([*args, "--device", "auto", "--dtype", "auto"]) == 0
    cpu = torch.device("cpu")
    # data, evaluate (base, defended, the base again for drift KL), trigger rate (base, defended): placed;
    # training and the merged export load without a device (the Trainer places the model)
    assert [asked for asked, _, _ in loads].count(cpu) == 6, loads
    assert {asked for asked, _, _ in loads} == {cpu, None}
    assert all(devices == {"cpu"} and dtype == torch.float32 for _, devices, dtype in loads)
    ledger = json.loads((tmp_path / "toy" / "stages.json").read_text())
    for stage in ("data", "train", "evaluate"):
        assert (ledger[stage]["device"], ledger[stage]["dtype"]) == ("cpu", "float32"), stage
    assert "device" not in ledger["model"]  # resolving the model's path loads nothing
    results = json.loads((tmp_path / "toy" / "results.json").read_text())
    assert (results["settings"]["device"], results["settings"]["dtype"]) == ("cpu", "float32")


def test_where_a_stage_runs_is_not_part_of_its_key(tiny, tmp_path, no_accelerator, monkeypatch):
    """The same run with device cpu instead of auto reuses every finished stage: where it ran is recorded,
    not a different run."""
    import circuit_breakers.experiments.main_job as main_job

    args = ["run", "--model_name_or_path", str(tiny), "--runs_dir", str(tmp_path), "--run_id", "toy", *TOY]
    assert main([*args, "--n_drift_eval", "0", "--device", "auto"]) == 0

    def fail(*a, **k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(main_job, "build_data", fail)
    monkeypatch.setattr(main_job, "evaluate_stage", fail)
    assert main([*args, "--n_drift_eval", "0", "--device", "cpu"]) == 0


@pytest.mark.parametrize("experiment", ["agents", "categories"])
def test_experiments_place_their_first_model(experiment, tiny, tmp_path, no_accelerator, loads, monkeypatch):
    """agents and categories load the base model on the recipe's device (stopped right after that load)."""
    from circuit_breakers.recipes import parse_config

    class Stop(Exception):
        pass

    spy = models.load_model

    def load_then_stop(*args, **kwargs):
        spy(*args, **kwargs)
        raise Stop

    monkeypatch.setattr(models, "load_model", load_then_stop)
    recipe = ["--model_name_or_path", str(tiny), "--target_layers", "2", "--output_dir", str(tmp_path / "run")]
    if experiment == "agents":
        from circuit_breakers.experiments.agents import agent_experiment
        from test_agents import make_case

        cases = [
            make_case(suite, f"u{u}", f"i{i}", attack)
            for suite in ("bank", "mail")
            for u in range(4)
            for i in range(5)
            for attack in (None, "important_instructions", "tool_knowledge")
        ]
        configs = parse_config(["--config", "agent-embedded", *recipe, "--device", "cpu", "--dtype", "bfloat16"])
        with pytest.raises(Stop):
            agent_experiment(cases, *configs, n_train_cb=4, n_eval=2)
    else:
        from circuit_breakers.experiments.categories import category_experiment

        prompts = [Prompt(id=f"{c}{i}", text=f"Tell me about {c} {i}", category=c) for c in "ab" for i in range(4)]
        configs = parse_config([*recipe, "--device", "cpu", "--dtype", "bfloat16"])
        with pytest.raises(Stop):
            category_experiment(prompts, [], tmp_path / "exp", *configs, ["a", "b"], 2, judge="refusal")
    assert loads == [(torch.device("cpu"), {"cpu"}, torch.bfloat16)]
