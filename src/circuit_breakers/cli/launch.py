"""Relaunching `train` under `accelerate launch`: the launch flags, the launcher command, signal forwarding,
and leaving the process group when a launched worker is done."""

from __future__ import annotations

import sys

from .console import console

LAUNCH_FLAGS = {"--accelerate-config": "config", "--num-processes": "num_processes", "--main-process-port": "port"}
"""`train` flags that choose how to launch (hyphenated: they are not recipe keys, which use underscores)."""


def pop_launch_flags(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split the launch flags (`--flag value` or `--flag=value`) from the training arguments."""
    found: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in LAUNCH_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{flag} needs a value")
                value, i = argv[i + 1], i + 1
            found[LAUNCH_FLAGS[flag]] = value
        else:
            rest.append(argv[i])
        i += 1
    return found, rest


def accelerate_launch_command(
    config: str, train_argv: list[str], num_processes: int | None = None, port: int | None = None
) -> list[str]:
    """`python -m accelerate.commands.launch --config_file ... -m circuit_breakers.cli train ARGS`.

    A shipped config (ddp, fsdp2, deepspeed_zero2, deepspeed_zero3) runs one process per visible GPU
    unless `num_processes` is given; a config file of your own keeps its num_processes. On one machine
    the rendezvous port is a free one (port 0) unless the config or `port` names one.
    """
    import torch
    import yaml

    from ..config import ACCELERATE_CONFIGS_DIR
    from ..recipes import accelerate_config_path

    path = accelerate_config_path(config)
    settings = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if (
        num_processes is None
        and path.resolve().parent == ACCELERATE_CONFIGS_DIR.resolve()
        and torch.cuda.device_count()
    ):
        num_processes = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    if port is not None:
        cmd += ["--main_process_port", str(port)]
    elif "main_process_port" not in settings and int(settings.get("num_machines", 1) or 1) <= 1:
        cmd += ["--main_process_port", "0"]
    return [*cmd, "-m", "circuit_breakers.cli", "train", *train_argv]


def relaunch(cmd: list[str]) -> int:
    """Run the accelerate launcher, passing SIGTERM on to it (its workers then checkpoint and stop).
    SIGINT from a terminal reaches the workers directly, so this process only waits for them."""
    import os
    import signal
    import subprocess

    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # processes on CPU talk over gloo
    console.print(f"[bold]launching[/] {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, env=env)
    forwarded: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        forwarded.append(signum)
        proc.send_signal(signum)

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
    }
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if forwarded and code != 0:  # torchrun exits 1 with a traceback after its workers stopped on the signal
        return 128 + forwarded[0]
    return 128 - code if code < 0 else code


def leave_process_group() -> None:
    """A launched worker leaves its process group before it exits. Left to interpreter shutdown, gloo's
    threads can abort a finished worker ("terminate called without an active exception", once in CI)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
