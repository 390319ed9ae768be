"""`categories`: the category experiment, one circuit-breaker adapter per harm category (issue 9)."""

from __future__ import annotations

import argparse
import json

from .console import console


def categories_command(argv: list[str]) -> int:
    """categories experiment: one circuit-breaker adapter per harm category, combined and continued (issue 9)"""
    parser = argparse.ArgumentParser(prog="circuit-breakers categories")
    sub = parser.add_subparsers(dest="action", required=True)
    exp = sub.add_parser(
        "experiment",
        help="train one adapter per category (+ continual, + combined) and report ASR "
        "per category for each; recipe options (--config, --max_steps, ...) apply",
    )
    exp.add_argument(
        "--benchmark",
        default="harmbench_standard",
        help="NAME[:PATH] of categorised harmful prompts (HarmBench: SemanticCategory), as `eval` takes",
    )
    exp.add_argument("--data_dir", help="data folder laid out like ../shared/data")
    exp.add_argument("--categories", required=True, help="comma list; the first two also make the continual run")
    exp.add_argument(
        "--retain_data", required=True, help="records JSONL of benign answers (e.g. runs/<id>/data/retain.jsonl)"
    )
    exp.add_argument("--out", required=True, help="experiment folder (resumable)")
    exp.add_argument("--n_eval", type=int, default=40, help="held-out prompts, shared out by category size")
    exp.add_argument(
        "--retain_others",
        choices=["true", "false"],
        default="true",
        help="retain the other categories' completions, so each adapter stays specific",
    )
    exp.add_argument("--no_continual", action="store_true")
    exp.add_argument(
        "--replay",
        action="store_true",
        help="continual run: reroute the first category's rows again beside the second's (default: the second's alone)",
    )
    exp.add_argument("--continual_steps", type=int, help="continual run's steps (default: the recipe's max_steps)")
    exp.add_argument("--attacks", default="direct")
    args, rest = parser.parse_known_args(argv)
    from ..data.benchmarks import load_benchmark, split_spec
    from ..data.records import read_records
    from ..experiments.categories import category_experiment, table_markdown
    from ..recipes import parse_config

    model_cfg, data_cfg, cb_cfg = parse_config(rest if "--config" in rest else ["--config", "embedded", *rest])
    from ..training.run import place_training

    place_training(model_cfg, cb_cfg)  # a device that is not there: stop before any work
    name, path = split_spec(args.benchmark)
    prompts = load_benchmark(name, path, data_dir=args.data_dir)
    record = category_experiment(
        prompts,
        read_records(args.retain_data, "retain"),
        args.out,
        model_cfg,
        data_cfg,
        cb_cfg,
        [c.strip() for c in args.categories.split(",") if c.strip()],
        args.n_eval,
        args.retain_others == "true",
        not args.no_continual,
        args.replay,
        args.continual_steps,
        [a for a in args.attacks.split(",") if a],
    )
    for matrix in record.get("asr", {}).values():
        console.print(table_markdown(matrix, record["categories"]), markup=False)
    console.print_json(json.dumps({k: record.get(k) for k in ("specificity", "continual")}, default=str))
    return 0
