"""benchmarks/gpu_check.py, the GPU acceptance script, kept from rotting: its --cpu-smoke mode runs every part
(training step, `run` end to end, merged == base + adapter, generation) on the CPU at toy sizes (issue 29)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_cpu_smoke_passes_every_part(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--work", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "gpu_check: ok", done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0
    out = done.stdout
    for part in ("train step:", "stages.json: data on cpu", "classifier judge: loaded", "merged vs base + adapter"):
        assert part in out, part
    assert "0 still held" in out and "hf ours" in out and "hf plain" in out
    assert (tmp_path / "work" / "runs" / "gpu-check" / "train" / "merged" / "config.json").is_file()


def test_a_failing_part_is_named_in_the_last_line(tmp_path, capsys):
    gpu_check = load_benchmark("gpu_check")
    code = gpu_check.main(["--cpu-smoke", "--skip", "train_step,run,generation", "--work", str(tmp_path / "work")])
    assert code == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == "gpu_check: FAILED: merged: no run"


def test_without_a_gpu_it_fails_in_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert load_benchmark("gpu_check").main([]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        "gpu_check: FAILED: no CUDA device (torch.cuda.is_available() is false); --cpu-smoke runs on the CPU"
    ]
