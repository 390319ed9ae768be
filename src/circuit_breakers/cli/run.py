"""`run` and `sweep`: the main job once, or over a grid of recipe settings."""

from __future__ import annotations

import argparse

from .console import console
from .train import print_config_help


def run_command(argv: list[str]) -> int:
    """run [recipe.yaml] [--any_field value ...]: data -> train -> merge -> evaluate -> report"""
    from ..experiments.main_job import run_pipeline
    from ..recipes import parse_run_config

    if any(a in ("-h", "--help") for a in argv):
        print_config_help("circuit-breakers run [RECIPE]")
        return 0
    recipe = "embedded"
    if argv and not argv[0].startswith("--"):
        recipe, argv = argv[0], argv[1:]
    model_cfg, data_cfg, cb_cfg, run_cfg = parse_run_config(argv, recipe=None if "--config" in argv else recipe)
    root = run_pipeline(model_cfg, data_cfg, cb_cfg, run_cfg)
    console.print(f"[bold green]run folder[/] {root}")
    return 0


def sweep_command(argv: list[str]) -> int:
    """sweep [recipe.yaml] --grid KEY=V1|V2 [--grid ...] [--any_field value ...]: the main job over a grid, one table"""
    from ..experiments.sweep import GRID_HELP, parse_grid, run_sweep
    from ..recipes import settings_from_args

    parser = argparse.ArgumentParser(
        prog="circuit-breakers sweep",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="circuit-breakers sweep [RECIPE | --config RECIPE] --grid KEY=V1|V2|... [--grid ...] "
        "[--sweep_id NAME] [--strict] [--any_field value ...]",
        description="Ablations as one command: the main job (`run`) at every combination of the grid's values, "
        "then one table (ASR, over-refusal, benign loss change, rerouting cosine, train time).",
        epilog=GRID_HELP + "\nAny other --key value is a recipe override applied to every point, as `run` takes it.",
    )
    parser.add_argument("--config", help="recipe: a YAML file or a shipped name (default: embedded)")
    parser.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1|V2|...",
        help="a recipe key and its values, separated by |; repeat for more keys",
    )
    parser.add_argument("--sweep_id", help="folder under runs_dir (default: <run_id>-sweep-<grid keys>)")
    parser.add_argument("--strict", action="store_true", help="stop at the first failing point")
    parser.add_argument(
        "--data_from",
        metavar="RUN_DIR",
        help="take the data stage (and base-model cells) from this finished main-job folder when its "
        "data settings match a point's (checked), e.g. runs/embedded",
    )
    recipe = "embedded"
    if argv and not argv[0].startswith("-"):
        recipe, argv = argv[0], argv[1:]
    args, rest = parser.parse_known_args(argv)
    overrides = settings_from_args(rest)
    doc = run_sweep(parse_grid(args.grid), args.config or recipe, overrides, args.sweep_id, args.strict, args.data_from)
    console.print(f"[bold green]sweep folder[/] {doc['folder']}")
    return 1 if any(p["status"] == "failed" for p in doc["points"]) else 0
