"""`train`, `merge` and `interpolate`: make a circuit breaker, merge its adapter, or step back along the line
between two models within a capability budget."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..locks import folder_lock
from .console import console
from .data import add_device_arguments
from .launch import accelerate_launch_command, leave_process_group, pop_launch_flags, relaunch

OVERWRITE_HELP = (
    "replace OUT_DIR if it exists and holds anything (a model written earlier or other files): the whole folder "
    "is replaced. Without it such a folder is refused and nothing is deleted"
)


def print_config_help(prog: str) -> None:
    """Every recipe key as a `--key` option: `run` and `train` take the same ones."""
    from transformers import HfArgumentParser

    from ..recipes import CONFIG_CLASSES

    HfArgumentParser(CONFIG_CLASSES, prog=prog).print_help()


def train_command(argv: list[str]) -> int:
    """train --config recipe.yaml [--any_field value ...] [--accelerate-config ddp|fsdp2|deepspeed_zero2|deepspeed_zero3|PATH]"""  # noqa: E501
    from ..recipes import parse_config
    from ..training import CheckpointError, TrainingDiverged, TrainingInterrupted
    from ..training.run import train

    if argv and argv[0] in ("-h", "--help"):
        print_config_help("circuit-breakers train")
        print(
            "\nlaunch options:\n  --accelerate-config NAME|PATH  relaunch under `accelerate launch` (shipped: ddp, "
            "fsdp2, deepspeed_zero2, deepspeed_zero3)\n  --num-processes N              processes (default: visible "
            "GPUs)\n  --main-process-port P          rendezvous port (default: a free one)"
        )
        return 0
    launch, argv = pop_launch_flags(argv)
    model_cfg, data_cfg, cb_cfg = parse_config(argv)  # bad arguments fail here, once, before any launch
    from ..models import resolve_device

    resolve_device(model_cfg.device)  # a device that is not there: stop before any launch (each process then
    # trains on the device accelerate gives it; in one process `training.run.place_training` applies the setting)
    if launch.get("config"):
        n = int(launch["num_processes"]) if "num_processes" in launch else None
        port = int(launch["port"]) if "port" in launch else None
        return relaunch(accelerate_launch_command(launch["config"], argv, n, port))
    try:
        result = train(model_cfg, data_cfg, cb_cfg)
    except TrainingInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return err.exit_code
    except (CheckpointError, TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        leave_process_group()
    if cb_cfg.process_index != 0:
        return 0
    console.print(f"[bold green]adapter[/] {result.adapter_dir}")
    if result.merged_dir:
        console.print(f"[bold green]merged model[/] {result.merged_dir}")
    console.print_json(json.dumps({k: v for k, v in result.summary.items() if k != "masks"}, default=str))
    return 0


def merge_command(argv: list[str]) -> int:
    """merge ADAPTER_DIR OUT_DIR [--base MODEL] [--dtype DTYPE] [--overwrite]"""
    from ..adapters import export_merged
    from ..models import check_output_folder

    parser = argparse.ArgumentParser(
        prog="circuit-breakers merge", description="Merge an adapter into its full base model."
    )
    parser.add_argument("adapter_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--base", help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = parser.parse_args(argv)
    check_output_folder(args.out_dir, args.overwrite)  # before any work
    base = adapter_base_model(args.adapter_dir)  # also checks the adapter folder when --base is given
    base = args.base or base
    if not base:
        raise ValueError(f"{args.adapter_dir}'s adapter_config.json names no base model: pass it with --base")
    with folder_lock(args.out_dir, "output folder"):  # a second export into the same folder is refused
        out = export_merged(args.adapter_dir, base, args.out_dir, args.dtype, args.trust_remote_code, args.overwrite)
    console.print(f"[bold green]merged model[/] {out}")
    return 0


def adapter_base_model(adapter_dir: str) -> str | None:
    """The base model an adapter folder records, read here so that a missing folder or a broken
    adapter_config.json is one line naming it (peft would look the name up on the Hub, or say only
    "Expecting value"). A name that is no local path is left to peft (an adapter on the Hub)."""
    from ..models import hub_unreachable

    folder = Path(adapter_dir)
    config_file = folder / "adapter_config.json"
    if not folder.exists() and not folder.is_absolute() and adapter_dir.count("/") == 1 and hub_unreachable() is None:
        from peft import PeftConfig

        return PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    if not config_file.is_file():
        what = (
            f"adapter folder {folder} does not exist"
            if not folder.exists()
            else f"adapter {folder} is a file, not a folder"
            if folder.is_file()
            else f"adapter folder {folder} holds no adapter_config.json"
        )
        raise FileNotFoundError(f"{what}: give the adapter folder training wrote (OUTPUT_DIR/adapter)")
    try:
        settings = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}:{err.lineno}: invalid JSON ({err.msg})") from err
    base = settings.get("base_model_name_or_path") if isinstance(settings, dict) else None
    return base if isinstance(base, str) and base else None


def interpolate_command(argv: list[str]) -> int:
    """interpolate START END OUT --data VAL: the largest step from START towards END within a capability budget"""
    from ..data.records import read_records
    from ..experiments.interpolate import DEFAULT_GRID, interpolate_within_budget, save_interpolation
    from ..models import check_output_folder, placement

    parser = argparse.ArgumentParser(
        prog="circuit-breakers interpolate",
        description="Write START + w (END - START) for the largest w on a grid (from 1 down) whose teacher-forced "
        "loss on validation records is within --max_loss_change of the base model's; for example "
        "START the vanilla circuit breaker, END a hardened (RR + LAT) continuation of it.",
    )
    parser.add_argument("start", help="merged model training started from")
    parser.add_argument("end", help="merged model it was trained into (same architecture)")
    parser.add_argument("out_dir")
    parser.add_argument(
        "--data",
        required=True,
        help="validation records (chat records with answers), not the held-out set the result is reported on",
    )
    parser.add_argument("--base", default="embedded", help="the base model the loss change is measured against")
    parser.add_argument("--max_loss_change", type=float, default=0.05, help="relative budget (0.05: +5%%)")
    parser.add_argument("--grid", default=",".join(f"{w:g}" for w in DEFAULT_GRID), help="weights to try (comma list)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    placement(args.device, args.dtype)  # a device that is not there: stop before any work
    check_output_folder(args.out_dir, args.overwrite)  # before the models are loaded and compared
    grid = [float(w) for w in args.grid.split(",")]
    with folder_lock(args.out_dir, "output folder"):  # a second export into the same folder is refused
        model, result = interpolate_within_budget(
            args.start,
            args.end,
            read_records(args.data),
            args.base,
            args.max_loss_change,
            grid,
            device=args.device,
            dtype=args.dtype,
        )
        for weight, change in result.tried:
            console.print(f"  w {weight:<4g} loss {change:+.1%}")
        out = save_interpolation(model, result, args.out_dir, args.overwrite)
    console.print(f"[bold green]w = {result.weight:g}[/] (loss {result.loss_change:+.1%}): {out}")
    return 0
